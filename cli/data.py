"""Commands that make and look at the simulated stores: build, finalize, verify, slurm,
inspect, preview, schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from cli.options import Format, config_argument, format_option, notes, only_option, out_option, overwrite_option, quiet_option


def build(
    config: Path = config_argument("Datasets YAML file (see `factory schema`)."),
    out: Path = out_option("Output folder for the stores.", Path("data")),
    fmt: Format = format_option("Store format: <out>/<name>.h5 or <out>/<name>.zarr."),
    only: Optional[List[str]] = only_option("Build only this dataset (repeatable)."),
    overwrite: bool = overwrite_option("Replace stores that already exist (with --shard: rebuild a complete shard)."),
    shard: Optional[str] = typer.Option(None, "--shard", help="Build only shard I/N (I from 0) of each dataset, or 'auto' inside a SLURM "
                                                              "array job."),
    quiet: bool = quiet_option("No progress bar and no size estimate."),
) -> None:
    """Build the datasets of CONFIG into chunked, compressed stores.

    Each image is simulated from its own random stream (seed, dataset, index), so the
    same config gives the same bytes on any number of threads, processes or shards.
    Stores are written under a temporary name and renamed when complete.  With
    --shard, rerunning skips shards that are complete and valid; `factory finalize`
    then assembles them.
    """
    from factory.build import build_from_config

    # The size estimate goes to stderr (stdout lists the stores built); --quiet drops it.
    for r in build_from_config(config, out, fmt.value, only, overwrite, shard, progress=not quiet, report=notes(quiet)):
        typer.echo(f"{r.path}: {r.summary()}")


def finalize(
    config: Path = config_argument("The datasets YAML the shards were built from."),
    out: Path = out_option("The folder the shards were built into.", Path("data")),
    fmt: Format = format_option("Format the shards were built in."),
    only: Optional[List[str]] = only_option("Finalize only this dataset (repeatable)."),
    copy: bool = typer.Option(False, "--copy", help="HDF5: write one self-contained file instead of a virtual dataset over the shard "
                                                    "files."),
    overwrite: bool = overwrite_option("Replace a store of another dataset that sits at the final name "
                                       "(finalizing the same dataset again needs no flag)."),
    quiet: bool = quiet_option(),
) -> None:
    """Check every shard (present, same config, checksums) and publish the stores.

    HDF5: <out>/<name>.h5 becomes a virtual dataset over <out>/<name>.shards/ (keep that
    folder beside it) or, with --copy, one self-contained file.  Zarr: the shards are
    recorded in the store, its metadata consolidated, and only then does it move from
    <out>/<name>.zarr.shards/ to <out>/<name>.zarr.  A missing or corrupt shard
    is an error naming the shards to rerun.
    """
    from factory.config import load_config
    from factory.finalize import finalize as finalize_stores

    cfg = load_config(config)
    for path in finalize_stores(cfg, out, fmt.value, only, copy, progress=not quiet, overwrite=overwrite):
        typer.echo(f"{path}: finalized")


def verify(
    path: Path = typer.Argument(..., help="A store (.h5 / .zarr) or a folder of stores."),
) -> None:
    """Check finished stores: complete, every shard's checksums, config hash."""
    from factory.finalize import verify_stores

    def show(store: Path, problems: List[str]) -> None:
        for line in problems:
            typer.echo(f"error: {line}", err=True)
        if not problems:
            typer.echo(f"{store}: ok")

    if verify_stores(path, report=show):
        raise typer.Exit(1)


def slurm(
    config: Path = config_argument("Datasets YAML file."),
    shards: int = typer.Option(..., "--shards", min=1, help="Array tasks (shards per dataset)."),
    out: Path = out_option("Output folder (on a filesystem every node sees).", Path("data")),
    fmt: Format = format_option("Store format."),
    only: Optional[List[str]] = only_option("Only this dataset (repeatable)."),
    partition: Optional[str] = typer.Option(None, "--partition", help="SLURM partition."),
    time_limit: str = typer.Option("01:00:00", "--time", help="Time limit per task (SLURM format)."),
    cpus: int = typer.Option(2, "--cpus", min=1, help="CPUs per task (Numba threads)."),
    mem: str = typer.Option("4G", "--mem", help="Memory per task (SLURM format)."),
    copy: bool = typer.Option(False, "--copy", help="HDF5: finalize into one self-contained file."),
    submit: bool = typer.Option(False, "--submit", help="Submit both jobs with sbatch."),
) -> None:
    """Write an sbatch array job that builds the shards and a finalize job that runs
    after it (afterok), into <out>/slurm/; --submit submits both."""
    from factory.slurm import slurm_jobs

    # The scripts are listed as soon as they are written, before a submission that may fail.
    jobs = slurm_jobs(config, out, shards, fmt.value, only, partition, time_limit, cpus, mem, copy, submit,
                      report=typer.echo)
    typer.echo(jobs.summary())


def inspect(
    path: Path = typer.Argument(..., help="A store (.h5 / .zarr) or a folder of stores."),
    brief: bool = typer.Option(False, "--brief", help="One line per store."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show shapes, generation parameters and photon statistics of stores."""
    from factory.inspect_store import format_summary, summarize
    from factory.stores import find_stores

    summaries = [summarize(p) for p in find_stores(path)]
    if as_json:
        typer.echo(json.dumps(summaries, indent=2))
        return
    for s in summaries:
        typer.echo(format_summary(s, brief))


def preview(
    path: Path = typer.Argument(..., help="A store (.h5 / .zarr)."),
    out: Path = out_option("Picture to write (.png, .pdf, .svg; .gif animates a movie)."),
    n: int = typer.Option(16, "--n", min=1, max=400, help="Images in the montage (frames in a movie strip)."),
    start: int = typer.Option(0, "--start", min=0, help="Index of the first image."),
    movie: int = typer.Option(0, "--movie", min=0, help="Movie stores: which movie to show."),
    overwrite: bool = overwrite_option("Replace a picture that is already there."),
) -> None:
    """Draw images with their true trajectories and centroids; for a movie store, a strip
    of one movie's frames (or a .gif of it) with each particle's path and both truths."""
    from factory.preview import preview_store
    from models.recordings.outputs import staged_output

    # Drawn in a staging folder and moved to --out when done; an earlier picture stays
    # unless --overwrite.
    def stage(picture: Path):
        return staged_output(picture, "file", overwrite=overwrite, what="picture")

    typer.echo(str(preview_store(path, out, n, start, movie, stage=stage)))


def schema() -> None:
    """List every config field with its type, default (the paper's values) and limits."""
    from factory.config import schema_text

    typer.echo(schema_text())
