"""Build datasets from a validated config into HDF5 or Zarr stores.

Generation streams in batches of whole chunks, so memory stays bounded whatever the
dataset size.  A store (or a shard) is written under a temporary name and renamed only
once complete: an interrupted build never leaves anything that looks done.  Every
finished store records per-shard checksums (one shard for a single-process build), so
``verify`` can prove it whole.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import h5py

from . import __version__
from .config import Dataset, FactoryConfig, config_from_json, dataset_hash
from .errors import FactoryError, StoreError
from .kernel import allocate_batch, kernel_params, run_batch
from .rng import dataset_key
from .shards import (Checksums, checksum_mismatch, check_shard, discover_count, make_manifest, read_manifest,
                     region_checksums, shard_range, shard_stem, shards_dir, write_json_atomic)
from .stores import (COORDINATES, FORMATS, UNITS, ArraySpec, HDF5Writer, ZarrWriter, array_specs,
                     make_writer, remove_path, replace_path)

log = logging.getLogger(__name__)

BATCH_BYTES = 64 * 2**20  # simulated data held in memory at once (about)


@dataclass
class BuildResult:
    name: str
    path: Path
    n_images: int
    seconds: float
    bytes_on_disk: int
    skipped: bool = False


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


def specs_for(ds: Dataset, n: int | None = None) -> list[ArraySpec]:
    return array_specs(ds.n_images if n is None else n, ds.image.height_px, ds.image.width_px,
                       ds.particles.max_particles, ds.output.chunk_images,
                       ds.output.expected, ds.output.trajectories)


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

    if stop <= start:
        return
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


def write_range(cfg: FactoryConfig, ds: Dataset, writer, start: int, stop: int, offset: int,
                progress=None) -> dict:
    """Simulate [start, stop) into ``writer`` at rows ``i - offset``; return checksums."""
    sums = Checksums([s.name for s in specs_for(ds, 1)])

    def sink(i0, arrays):
        writer.write(i0 - offset, arrays)
        sums.update(arrays)

    simulate_range(cfg, ds, start, stop, sink, progress)
    return sums.hexdigest()


def _bar(ds: Dataset, total: int, progress: bool, desc: str | None = None):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc or ds.name, unit="img", disable=not progress, leave=True)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial-{socket.gethostname()}-{os.getpid()}")


def _remove_stale(path: Path) -> None:
    """Temporary files left by earlier, killed attempts at ``path``."""
    for p in path.parent.glob(f".{path.name}.partial-*"):
        remove_path(p)


def build_dataset(cfg: FactoryConfig, ds: Dataset, out: Path, fmt: str = "hdf5",
                  progress: bool = True) -> BuildResult:
    """Write one dataset to ``<out>/<name>.h5|.zarr`` (replacing an existing one)."""
    final = store_path(out, ds.name, fmt)
    _remove_stale(final)
    tmp = _tmp_name(final)
    t0 = time.perf_counter()
    bar = _bar(ds, ds.n_images, progress)
    try:
        writer = make_writer(fmt, tmp, specs_for(ds), store_attrs(cfg, ds))
        try:
            sums = write_range(cfg, ds, writer, 0, ds.n_images, 0, bar)
            shard = make_manifest(cfg, ds, fmt, 0, 1, 0, ds.n_images, sums)
            writer.set_attrs({"shards": json.dumps([shard]), "complete": True})
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


# --- shards -------------------------------------------------------------------------------


def ensure_zarr_store(cfg: FactoryConfig, ds: Dataset, out: Path) -> Path:
    """Create the shared Zarr store once, however many tasks try at the same moment."""
    import zarr

    final = store_path(out, ds.name, "zarr")
    expect = dataset_hash(cfg.seed, ds)
    if not final.exists():
        tmp = _tmp_name(final)
        ZarrWriter(tmp, specs_for(ds), {**store_attrs(cfg, ds), "complete": False})
        try:
            os.rename(tmp, final)  # atomic: one creator wins, the others find it there
        except OSError:
            remove_path(tmp)
    try:
        found = zarr.open_group(str(final), mode="r").attrs.get("dataset_hash")
    except (OSError, ValueError, KeyError):
        found = None
    if found != expect:
        raise StoreError(f"{final}: exists but was built from another config (dataset hash {found}, "
                         f"expected {expect}); remove it or build into another --out")
    return final


def build_shard(cfg: FactoryConfig, ds: Dataset, out: Path, fmt: str, index: int, count: int,
                redo: bool = False, progress: bool = True) -> BuildResult:
    """Build shard ``index`` of ``count`` of ``ds``; skip it when already complete and valid."""
    start, stop = shard_range(ds.n_images, ds.output.chunk_images, index, count)
    sdir = shards_dir(out, ds.name, fmt)
    sdir.mkdir(parents=True, exist_ok=True)
    found = discover_count(sdir)
    if found is not None and found != count:
        raise StoreError(f"{sdir}: holds shards of a {found}-way split, not {count}; "
                         f"use --shard I/{found} or remove the folder")
    stem = shard_stem(index, count)
    manifest = sdir / f"{stem}.json"
    desc = f"{ds.name} {index}/{count}"
    if not redo and manifest.exists():
        if fmt == "zarr":
            ensure_zarr_store(cfg, ds, out)
        problem = check_shard(cfg, ds, out, fmt, index, count)
        if problem is None:
            log.info("%s shard %d/%d is complete: skipped", ds.name, index, count)
            return BuildResult(ds.name, manifest, stop - start, 0.0, 0, skipped=True)
        log.warning("%s shard %d/%d: %s; rebuilding it", ds.name, index, count, problem)
    # The manifest marks completion: remove it first so a crash never leaves a stale one.
    remove_path(manifest)
    t0 = time.perf_counter()
    bar = _bar(ds, stop - start, progress, desc)
    try:
        if fmt == "hdf5":
            data = sdir / f"{stem}.h5"
            _remove_stale(data)
            remove_path(data)
            if stop > start:
                tmp = _tmp_name(data)
                try:
                    attrs = {**store_attrs(cfg, ds), "shard": index, "shards": count,
                             "start": start, "stop": stop}
                    writer = HDF5Writer(tmp, specs_for(ds, stop - start), attrs)
                    try:
                        sums = write_range(cfg, ds, writer, start, stop, start, bar)
                    finally:
                        writer.close()
                    os.replace(tmp, data)
                except BaseException:
                    remove_path(tmp)
                    raise
            else:
                sums = Checksums([s.name for s in specs_for(ds, 1)]).hexdigest()
        else:
            final = ensure_zarr_store(cfg, ds, out)
            writer = ZarrWriter(final, specs_for(ds), {}, create=False)
            sums = write_range(cfg, ds, writer, start, stop, 0, bar)
        write_json_atomic(manifest, make_manifest(cfg, ds, fmt, index, count, start, stop, sums))
    finally:
        bar.close()
    return BuildResult(ds.name, manifest, stop - start, time.perf_counter() - t0, 0)


def finalize_dataset(cfg: FactoryConfig, ds: Dataset, out: Path, fmt: str, copy: bool = False,
                     progress: bool = True) -> Path:
    """Check every shard, then publish the store (virtual or copied HDF5; Zarr metadata)."""
    sdir = shards_dir(out, ds.name, fmt)
    count = discover_count(sdir)
    if count is None:
        raise StoreError(f"{sdir}: no shards found; run `factory build CONFIG --shard I/N` first")
    problems, rerun = [], []
    for i in range(count):
        why = check_shard(cfg, ds, out, fmt, i, count)
        if why is not None:
            problems.append(f"{shard_stem(i, count)} ({why})")
            rerun.append(f"--shard {i}/{count}")
    if problems:
        raise StoreError(f"{sdir}: {len(problems)} of {count} shards not usable: {'; '.join(problems)}; "
                         f"rerun `factory build` with {', '.join(rerun)}")
    manifests = [read_manifest(sdir / f"{shard_stem(i, count)}.json") for i in range(count)]
    shard_list = json.dumps(manifests)
    final = store_path(out, ds.name, fmt)
    if fmt == "zarr":
        import zarr

        g = zarr.open_group(str(final), mode="r+")
        g.attrs.update({"shards": shard_list, "complete": True})
        with warnings.catch_warnings():
            # Consolidated metadata is an extension of Zarr v3 that zarr-python reads.
            warnings.simplefilter("ignore")
            zarr.consolidate_metadata(str(final))
        return final
    tmp = _tmp_name(final)
    try:
        specs = specs_for(ds)
        attrs = {**store_attrs(cfg, ds), "shards": shard_list, "complete": True}
        if copy:
            writer = HDF5Writer(tmp, specs, attrs)
            bar = _bar(ds, ds.n_images, progress, f"{ds.name} copy")
            try:
                for m in manifests:
                    if m["stop"] == m["start"]:
                        continue
                    with h5py.File(sdir / f"{shard_stem(m['shard'], count)}.h5", "r") as f:
                        step = int(f["images"].chunks[0]) * 16
                        for a in range(0, m["stop"] - m["start"], step):
                            b = min(a + step, m["stop"] - m["start"])
                            writer.write(m["start"] + a, {s.name: f[s.name][a:b] for s in specs})
                            bar.update(b - a)
            finally:
                writer.close()
                bar.close()
        else:
            with h5py.File(tmp, "w", libver="latest") as f:
                for key, value in attrs.items():
                    f.attrs[key] = value
                for s in specs:
                    layout = h5py.VirtualLayout(shape=s.shape, dtype=s.dtype)
                    for m in manifests:
                        if m["stop"] == m["start"]:
                            continue
                        src = f"{sdir.name}/{shard_stem(m['shard'], count)}.h5"
                        layout[m["start"]:m["stop"]] = h5py.VirtualSource(
                            src, s.name, shape=(m["stop"] - m["start"],) + s.shape[1:])
                    dset = f.create_virtual_dataset(s.name, layout, fillvalue=s.fill)
                    dset.attrs["units"] = UNITS[s.name]
        replace_path(tmp, final)
    except BaseException:
        remove_path(tmp)
        raise
    return final


def verify_store(path: Path) -> list[str]:
    """Problems with a finished store (empty when it is complete and intact)."""
    from .stores import Store

    path = Path(path)
    try:
        st = Store(path)
    except StoreError as exc:
        return [str(exc)]
    problems = []
    with st:
        attrs = st.attrs
        try:
            cfg_json = json.loads(attrs["config"])
            ds = config_from_json(json.dumps({"seed": cfg_json["seed"], "datasets": {
                cfg_json["dataset"]["name"]: cfg_json["dataset"]}})).datasets[cfg_json["dataset"]["name"]]
        except (KeyError, ValueError) as exc:
            return [f"{path}: no valid config in the attributes ({exc})"]
        expect = dataset_hash(cfg_json["seed"], ds)
        if attrs.get("dataset_hash") != expect:
            problems.append(f"{path}: config hash {attrs.get('dataset_hash')} does not match the stored "
                            f"config ({expect})")
        if not attrs.get("complete"):
            problems.append(f"{path}: incomplete (shards not finalized: run `factory finalize`)")
            return problems
        shards = json.loads(attrs.get("shards", "[]"))
        if not shards:
            return problems + [f"{path}: no shard checksums recorded"]
        covered = sorted((m["start"], m["stop"]) for m in shards)
        if covered[0][0] != 0 or covered[-1][1] != len(st) or any(a[1] != b[0] for a, b in zip(covered, covered[1:])):
            problems.append(f"{path}: the shards do not cover images 0..{len(st) - 1} exactly")
        # A virtual dataset returns fill values for a missing source file: check them first.
        if st.format == "hdf5" and st["images"].is_virtual:
            missing = sorted({vs.file_name for n in st.names for vs in st[n].virtual_sources()
                              if not (path.parent / vs.file_name).exists()})
            if missing:
                return problems + [f"{path}: shard file {m} is missing" for m in missing]
        arrays = {n: st[n] for n in shards[0]["checksums"]}
        step = ds.output.chunk_images * 16  # whole chunks (a virtual dataset has no chunks)
        for m in shards:
            if m.get("dataset_hash") != expect:
                problems.append(f"{path}: {shard_stem(m['shard'], m['shards'])} was built from another config")
                continue
            try:
                sums = region_checksums(arrays, m["start"], m["stop"], step)
            except (OSError, ValueError) as exc:
                problems.append(f"{path}: {shard_stem(m['shard'], m['shards'])} unreadable ({str(exc).splitlines()[0]})")
                continue
            why = checksum_mismatch(m["checksums"], sums)
            if why:
                where = f"{shard_stem(m['shard'], m['shards'])} (images {m['start']}..{m['stop'] - 1})"
                problems.append(f"{path}: {where} {why}")
    return problems


# --- entry points -------------------------------------------------------------------------


def build(cfg: FactoryConfig, out: Path, fmt: str = "hdf5", only: list[str] | None = None,
          overwrite: bool = False, progress: bool = True, shard: tuple[int, int] | None = None) -> list[BuildResult]:
    """Build the selected datasets of ``cfg`` into ``out`` (all of it, or one shard).

    Every check (dataset names, output folder, existing stores) runs before any work.
    With ``shard`` a complete, valid shard is skipped unless ``overwrite`` is set.
    """
    if fmt not in FORMATS:
        raise FactoryError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    selected = cfg.select(only)
    out = Path(out)
    check_output_dir(out)
    if shard is not None:
        return [build_shard(cfg, ds, out, fmt, shard[0], shard[1], overwrite, progress) for ds in selected]
    if not overwrite:
        existing = [str(store_path(out, d.name, fmt)) for d in selected
                    if store_path(out, d.name, fmt).exists()]
        if existing:
            raise FactoryError(f"{existing[0]}: already exists (use --overwrite to replace it)")
    return [build_dataset(cfg, ds, out, fmt, progress) for ds in selected]


def finalize(cfg: FactoryConfig, out: Path, fmt: str = "hdf5", only: list[str] | None = None,
             copy: bool = False, progress: bool = True) -> list[Path]:
    if fmt not in FORMATS:
        raise FactoryError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    if copy and fmt != "hdf5":
        raise FactoryError("--copy applies to HDF5 (a Zarr store is already one folder)")
    return [finalize_dataset(cfg, ds, Path(out), fmt, copy, progress) for ds in cfg.select(only)]

