"""The `factory` command line: thin wrappers that validate, then call the library."""

from __future__ import annotations

import functools
import json
import logging
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from .errors import FactoryError

app = typer.Typer(
    name="factory",
    help=(
        "Simulate two-photon laser-scanning microscopy of diffusing nanoparticles, "
        "build training sets (HDF5 or Zarr), and inspect them."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


class Format(str, Enum):
    hdf5 = "hdf5"
    zarr = "zarr"


def user_errors(fn):
    """Turn a FactoryError into one line on stderr and exit status 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FactoryError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


@app.command()
@user_errors
def build(
    config: Path = typer.Argument(..., help="Datasets YAML file (see `factory schema`)."),
    out: Path = typer.Option(Path("data"), "--out", "-o", help="Output folder for the stores."),
    fmt: Format = typer.Option(Format.hdf5, "--format", "-f", help="Store format: <out>/<name>.h5 or <out>/<name>.zarr."),
    only: Optional[List[str]] = typer.Option(None, "--only", help="Build only this dataset (repeatable)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace stores that already exist."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Build the datasets of CONFIG into chunked, compressed stores.

    Each image is simulated from its own random stream (seed, dataset, index), so the
    same config gives the same bytes on any number of threads.  Stores are written
    under a temporary name and renamed when complete.
    """
    from .build import build as build_stores
    from .config import load_config

    cfg = load_config(config)
    results = build_stores(cfg, out, fmt.value, only, overwrite, progress=not quiet)
    for r in results:
        typer.echo(f"{r.path}: {r.n_images} images, {r.bytes_on_disk / 1e6:.1f} MB, {r.seconds:.2f} s")


@app.command()
@user_errors
def inspect(
    path: Path = typer.Argument(..., help="A store (.h5 / .zarr) or a folder of stores."),
    brief: bool = typer.Option(False, "--brief", help="One line per store."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show shapes, generation parameters and photon statistics of stores."""
    from .inspect_store import find_stores, format_summary, summarize

    summaries = [summarize(p) for p in find_stores(path)]
    if as_json:
        typer.echo(json.dumps(summaries, indent=2))
        return
    for s in summaries:
        typer.echo(format_summary(s, brief))


@app.command()
@user_errors
def preview(
    path: Path = typer.Argument(..., help="A store (.h5 / .zarr)."),
    out: Path = typer.Option(..., "--out", "-o", help="Picture to write (.png, .pdf, .svg)."),
    n: int = typer.Option(16, "--n", min=1, max=400, help="Number of images in the montage."),
    start: int = typer.Option(0, "--start", min=0, help="Index of the first image."),
) -> None:
    """Draw a montage of images with their true trajectories and centroids."""
    from .errors import StoreError
    from .preview import preview as draw

    if out.suffix.lower() not in (".png", ".pdf", ".svg", ".jpg"):
        raise FactoryError(f"{out}: --out must end in .png, .pdf, .svg or .jpg")
    from .stores import Store

    with Store(path) as st:
        if start >= len(st):
            raise StoreError(f"{path}: --start {start} is beyond the last image ({len(st) - 1})")
    typer.echo(str(draw(path, out, n, start)))


@app.command()
def schema() -> None:
    """List every config field with its type, default (the paper's values) and limits."""
    from .inspect_store import schema_lines

    typer.echo("Top level: seed (int), defaults (the fields below), datasets (name -> "
               "n_images plus any field below to override).\n")
    typer.echo(f"{'n_images':<44} {'int':<34} required per dataset  (>= 1)")
    for line in schema_lines():
        typer.echo(line)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    sys.exit(main())
