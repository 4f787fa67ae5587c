"""Build datasets from a validated config into HDF5 or Zarr stores.

Generation streams in batches of whole chunks, so memory stays bounded whatever the
dataset size.  A store is written under a temporary name in the output folder and
renamed only once complete: an interrupted build never leaves a store that looks done.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .config import Dataset, FactoryConfig, dataset_hash
from .errors import FactoryError
from .kernel import allocate_batch, kernel_params, run_batch
from .rng import dataset_key
from .stores import COORDINATES, FORMATS, UNITS, array_specs, make_writer, remove_path, replace_path

log = logging.getLogger(__name__)

BATCH_BYTES = 64 * 2**20  # simulated data held in memory at once (about)


@dataclass
class BuildResult:
    name: str
    path: Path
    n_images: int
    seconds: float
    bytes_on_disk: int


def store_path(out: Path, name: str, fmt: str) -> Path:
    return Path(out) / f"{name}{FORMATS[fmt]}"


def store_attrs(cfg: FactoryConfig, ds: Dataset) -> dict:
    """Provenance written into every store's root attributes."""
    return {
        "config": json.dumps({"seed": cfg.seed, "dataset": ds.model_dump(mode="json")}),
        "dataset": ds.name,
        "dataset_hash": dataset_hash(cfg.seed, ds),
        "seed": cfg.seed,
        "package": "twophoton-factory",
        "package_version": __version__,
        "units": json.dumps(UNITS),
        "coordinates": COORDINATES,
        "layout_version": 1,
    }


def batch_images(ds: Dataset) -> int:
    """Images per kernel call: whole chunks, about BATCH_BYTES of arrays."""
    chunk = ds.output.chunk_images
    h, w, p = ds.image.height_px, ds.image.width_px, ds.particles.max_particles
    per_image = h * w * (2 + 4 * ds.output.expected) + p * (20 + 12 * h * w * ds.output.trajectories)
    return chunk * max(1, BATCH_BYTES // (chunk * per_image))


def disk_usage(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def check_output_dir(out: Path) -> None:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FactoryError(f"{out}: --out exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FactoryError(f"{out}: cannot create the output directory: {exc.strerror}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise FactoryError(f"{out}: the output directory is not writable")


def simulate_range(cfg: FactoryConfig, ds: Dataset, start: int, stop: int, sink, progress=None) -> None:
    """Simulate images ``start .. stop`` batch by batch, handing each to ``sink(i0, arrays)``.

    Two buffer sets alternate: the kernel (which releases the GIL) fills one while a
    writer thread hands the other to ``sink``, so compression and I/O overlap the
    simulation.  Batches are still written in order, one at a time.
    """
    from concurrent.futures import ThreadPoolExecutor

    k = kernel_params(ds)
    key = dataset_key(cfg.seed, ds.name)
    want_e, want_t = ds.output.expected, ds.output.trajectories
    step = batch_images(ds)
    size = min(step, stop - start)
    buffers = [allocate_batch(k, size, want_e, want_t) for _ in range(2 if stop - start > step else 1)]
    wanted = {"expected": want_e, "trajectories": want_t}
    pending = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer") as pool:
        for j, i0 in enumerate(range(start, stop, step)):
            n = min(step, stop - i0)
            # Arrays that are not stored stay (1, ...) placeholders the kernel ignores.
            arrays = {name: a[:n] if wanted.get(name, True) else a
                      for name, a in buffers[j % len(buffers)].items()}
            arrays = run_batch(k, key, i0, arrays, want_e, want_t)
            if pending is not None:
                pending.result()  # the other buffer is free again (and errors surface)
                if progress is not None:
                    progress.update(pending_n)
            pending, pending_n = pool.submit(sink, i0, arrays), n
        if pending is not None:
            pending.result()
            if progress is not None:
                progress.update(pending_n)


def build_dataset(cfg: FactoryConfig, ds: Dataset, out: Path, fmt: str = "hdf5",
                  progress: bool = True) -> BuildResult:
    """Write one dataset to ``<out>/<name>.h5|.zarr`` (replacing an existing one)."""
    from tqdm.auto import tqdm

    final = store_path(out, ds.name, fmt)
    tmp = final.with_name(f".{final.name}.partial-{os.getpid()}")
    remove_path(tmp)
    specs = array_specs(ds.n_images, ds.image.height_px, ds.image.width_px,
                        ds.particles.max_particles, ds.output.chunk_images,
                        ds.output.expected, ds.output.trajectories)
    t0 = time.perf_counter()
    bar = tqdm(total=ds.n_images, desc=ds.name, unit="img", disable=not progress, leave=True)
    try:
        writer = make_writer(fmt, tmp, specs, store_attrs(cfg, ds))
        try:
            simulate_range(cfg, ds, 0, ds.n_images, writer.write, bar)
        finally:
            writer.close()
        replace_path(tmp, final)
    except BaseException:
        remove_path(tmp)
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    log.info("built %s: %d images in %.2f s", final, ds.n_images, seconds)
    return BuildResult(ds.name, final, ds.n_images, seconds, disk_usage(final))


def build(cfg: FactoryConfig, out: Path, fmt: str = "hdf5", only: list[str] | None = None,
          overwrite: bool = False, progress: bool = True) -> list[BuildResult]:
    """Build the selected datasets of ``cfg`` into ``out``.

    Every check (dataset names, output folder, existing stores) runs before any work.
    """
    if fmt not in FORMATS:
        raise FactoryError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    selected = cfg.select(only)
    out = Path(out)
    check_output_dir(out)
    if not overwrite:
        existing = [str(store_path(out, d.name, fmt)) for d in selected
                    if store_path(out, d.name, fmt).exists()]
        if existing:
            raise FactoryError(f"{existing[0]}: already exists (use --overwrite to replace it)")
    return [build_dataset(cfg, ds, out, fmt, progress) for ds in selected]
