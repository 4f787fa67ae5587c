"""Publish and check sharded builds.

``finalize`` assembles the shards into a store (a virtual HDF5 dataset over the shard
files, one copied file, or a consolidated Zarr store) after checking every one;
``verify`` proves a finished store whole.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from .build import progress_bar, specs_for, store_attrs, store_path
from .checksums import checksum_mismatch, read_manifest, region_checksums
from .config import Dataset, FactoryConfig, dataset_hash
from .errors import FactoryError, StoreError
from .publish import publish, store_lock, tmp_name
from .shards import check_shard, discover_count, shard_stem, shards_dir, zarr_data_path
from .stores import FORMATS, HDF5Writer, Store, consolidate_zarr, find_stores, remove_path, rows_per_read, write_virtual_hdf5


def _same_dataset(path: Path, expect_hash: str) -> bool:
    """Whether ``path`` is a store of the dataset with this hash (a finalize run again)."""
    try:
        with Store(path, complete=False) as st:
            return st.attrs.get("dataset_hash") == expect_hash
    except StoreError:
        return False


def finalize_dataset(cfg: FactoryConfig, ds: Dataset, out: Path, fmt: str, copy: bool = False,
                     progress: bool = True, overwrite: bool = False) -> Path:
    """Check every shard, then publish the store (virtual or copied HDF5; Zarr metadata).

    The store appears under its final name only now, under its lock.  An existing store
    of the same dataset (finalize run again) is replaced; any other only with ``overwrite``.
    """
    sdir = shards_dir(out, ds.name, fmt)
    count = discover_count(sdir)
    if count is None:
        raise StoreError(f"{sdir}: no shards found; run `factory build CONFIG --shard I/N` first")
    final = store_path(out, ds.name, fmt)
    with store_lock(final, what="finalize"):
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
        replace = overwrite or not final.exists() or _same_dataset(final, dataset_hash(cfg.seed, ds))
        if fmt == "zarr":
            data = zarr_data_path(out, ds.name)
            # The completeness mark goes in last, then the whole folder moves into place.
            consolidate_zarr(data, {"shards": shard_list, "complete": True})
            if data != final:
                publish(data, final, replace)
            return final
        tmp = tmp_name(final)
        try:
            specs = specs_for(ds)
            attrs = {**store_attrs(cfg, ds, fmt), "shards": shard_list, "complete": True}
            if copy:
                writer = HDF5Writer(tmp, specs, attrs, ds.output.compression)
                bar = progress_bar(ds, ds.n_images, progress, f"{ds.name} copy")
                try:
                    for m in manifests:
                        if m["stop"] == m["start"]:
                            continue
                        with Store(sdir / f"{shard_stem(m['shard'], count)}.h5", complete=False) as f:
                            step = rows_per_read(specs)  # whole chunks of the copy and the shard, ~64 MB
                            for a in range(0, m["stop"] - m["start"], step):
                                b = min(a + step, m["stop"] - m["start"])
                                writer.write(m["start"] + a, {s.name: f.read(s.name, a, b) for s in specs})
                                bar.update(b - a)
                finally:
                    writer.close()
                    bar.close()
            else:
                write_virtual_hdf5(tmp, specs, attrs, [
                    (f"{sdir.name}/{shard_stem(m['shard'], count)}.h5", m["start"], m["stop"]) for m in manifests])
            publish(tmp, final, replace)
        except BaseException:
            remove_path(tmp)
            raise
    return final


def verify_store(path: Path) -> list[str]:
    """Problems with a finished store, empty when it is complete and intact (``factory.verify_store``).

    Reads the whole store: the stored config against its hash, the completeness mark,
    that the recorded shards cover every row once, that no shard file of a virtual HDF5
    store is missing, and every shard's checksums against its rows.

    Parameters
    ----------
    path : Path
        A store (``.h5`` or ``.zarr``), built in one process or finalized from shards.

    Returns
    -------
    list of str
        One line per problem, each naming ``path`` (and the shard and its rows where
        one is at fault); a store that cannot be opened gives its one error line.
    """
    path = Path(path)
    try:
        st = Store(path, complete=False)  # verify says itself what is unfinished
    except StoreError as exc:
        return [str(exc)]
    problems = []
    with st:
        attrs = st.attrs
        try:
            ds, seed = st.dataset, st.config["seed"]
        except (KeyError, ValueError, FactoryError) as exc:
            return [f"{path}: no valid config in the attributes ({exc})"]
        expect = dataset_hash(seed, ds)
        if attrs.get("dataset_hash") != expect:
            problems.append(f"{path}: config hash {attrs.get('dataset_hash')} does not match the stored "
                            f"config ({expect})")
        why = st.unfinished()
        if why is not None and not st.missing_sources():  # missing shard files are listed below
            return problems + [f"{path}: {why}"]
        shards = json.loads(attrs.get("shards", "[]"))
        if not shards:
            return problems + [f"{path}: no shard checksums recorded"]
        covered = sorted((m["start"], m["stop"]) for m in shards)
        if covered[0][0] != 0 or covered[-1][1] != len(st) or any(a[1] != b[0] for a, b in zip(covered, covered[1:])):
            problems.append(f"{path}: the shards do not cover images 0..{len(st) - 1} exactly")
        # A virtual dataset returns fill values for a missing source file: check them first.
        missing = st.missing_sources()
        if missing:
            return problems + [f"{path}: shard file {m} is missing" for m in missing]
        arrays = {n: st[n] for n in shards[0]["checksums"]}
        step = rows_per_read(specs_for(ds))  # whole chunks, ~64 MB (a virtual dataset has none)
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


def verify_stores(path: str | Path, report: Callable[[Path, list[str]], None] | None = None) -> dict[Path, list[str]]:
    """Verify a store, or every store in a folder, and gather the failures (``factory.verify_stores``).

    Each store is checked whole by ``verify_store``, one after the other, in the order
    of ``find_stores`` (by name).

    Parameters
    ----------
    path : str or Path
        A store (``.h5`` or ``.zarr``) or a folder of stores.
    report : callable, optional
        Called as ``report(store, problems)`` once each store is checked (``problems``
        empty when it is complete and intact), so a long check can say how it goes
        (`factory verify` prints ``<store>: ok`` or one ``error:`` line per problem).

    Returns
    -------
    dict of Path to list of str
        The stores that failed, each with its problems (one line each, naming the
        store); empty when every store is complete and intact.

    Raises
    ------
    StoreError
        ``path`` does not exist, is a folder without stores, or is neither a store nor
        a folder (``find_stores``).

    Examples
    --------
    >>> from factory import verify_stores
    >>> failures = verify_stores("data")  # doctest: +SKIP
    >>> failures == {}  # doctest: +SKIP
    True
    """
    failures = {}
    for store in find_stores(path):
        problems = verify_store(store)
        if problems:
            failures[store] = problems
        if report is not None:
            report(store, problems)
    return failures


def finalize(cfg: FactoryConfig, out: Path, fmt: str = "hdf5", only: list[str] | None = None,
             copy: bool = False, progress: bool = True, overwrite: bool = False) -> list[Path]:
    """Check every shard of the selected datasets, then publish each store (``factory.finalize_stores``).

    Run once all the shards of ``build_shards`` are built.  A store appears under its
    final name only when every shard is complete and valid.

    Parameters
    ----------
    cfg : FactoryConfig
        The config the shards were built from.
    out : Path
        The build's output folder; dataset ``name`` is published as ``<out>/<name>.h5``
        or ``<out>/<name>.zarr``.
    fmt : {"hdf5", "zarr"}
        The store format of the shards.
    only : list of str, optional
        The datasets, by name (None: every one).
    copy : bool
        HDF5: copy the shards' rows into one self-contained file, instead of a virtual
        dataset over the shard files (which must then stay beside it).
    progress : bool
        A progress bar (stderr) of the copy.
    overwrite : bool
        Replace an existing store of another dataset (one of the same dataset, from an
        earlier finalize, is replaced anyway).

    Returns
    -------
    list of Path
        The stores published, one per dataset.

    Raises
    ------
    FactoryError
        A bad format, ``copy`` with Zarr, an unknown dataset, no shards, shards missing,
        incomplete, built from another config or failing their checksums (the message
        names the ``--shard I/N`` to rerun), an existing store of another dataset
        without ``overwrite``, or the store locked by another process.
    """
    if fmt not in FORMATS:
        raise FactoryError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    if copy and fmt != "hdf5":
        raise FactoryError("--copy applies to HDF5 (a Zarr store is already one folder)")
    return [finalize_dataset(cfg, ds, Path(out), fmt, copy, progress, overwrite) for ds in cfg.select(only)]

