"""Stores of real-size images: chunks and batches sized in bytes, trajectories at a
configurable time resolution, and a size estimate that refuses a build the disk cannot
hold (real HDF5 and Zarr files)."""

import json
import math

import numpy as np
import pytest
import yaml

from conftest import ROOT, assert_same_arrays, dataset, one_line_error, run_cli
from factory.build import BATCH_BYTES, batch_images, build, specs_for, store_attrs
from factory.config import config_from_json, config_hash, dataset_hash, load_config, parse_config
from factory.errors import FactoryError
from factory.finalize import finalize, verify_store
from factory.kernel import simulate
from factory.reference import simulate_numpy
from factory.shards import build_shards
from factory.sizes import estimate
from factory.stores import CHUNK_BYTES, Store, make_writer

EXT = {"hdf5": ".h5", "zarr": ".zarr"}
# The real-size config: 512 x 512 px, 64 particles, trajectories on.
BIG = {"image": {"height_px": 512, "width_px": 512}, "particles": {"count": 64}}


def chunk_bytes(arr) -> int:
    return math.prod(arr.chunks) * np.dtype(arr.dtype).itemsize


def read_rows(path, a, b):
    with Store(path) as st:
        return {n: st.read(n, a, b) for n in st.names}


@pytest.mark.parametrize("step", ["default", "dwell"])
@pytest.mark.parametrize("fmt", ["hdf5", "zarr"])
def test_every_chunk_is_at_most_64_mb_and_divides_the_shard_unit(tmp_path, fmt, step):
    """The arrays of 300 real-size images (dwell: 201 MB of trajectories per image) as the
    stores create them: no chunk over 64 MiB, and rows per chunk divide chunk_rows."""
    cfg, ds = dataset(300, **BIG, **({} if step == "default" else {"output": {"trajectory_step": step}}))
    path = tmp_path / f"s{EXT[fmt]}"
    writer = make_writer(fmt, path, specs_for(ds), store_attrs(cfg, ds, fmt), ds.output.compression)
    writer.close()
    with Store(path, complete=False) as st:
        assert set(st.names) >= {"images", "expected", "trajectories"}
        for name in st.names:
            arr = st[name]
            assert chunk_bytes(arr) <= CHUNK_BYTES, (name, arr.chunks)
            assert ds.chunk_rows % arr.chunks[0] == 0, (name, arr.chunks, ds.chunk_rows)
        T = st["trajectories"].shape[2]
        assert T == (512 * 512 if step == "dwell" else 512)
        if step == "dwell":  # 201 MB per row: one row per chunk, cut along the particles
            assert st["trajectories"].chunks == (1, 16, 512 * 512, 3)


def test_batches_are_whole_movies_and_chunks_of_about_64_mb():
    for sections in (BIG, {**BIG, "output": {"trajectory_step": "dwell"}}, {},
                     {"n_images": None, "n_movies": 40, "movie": {"n_frames": 7},
                      "image": {"height_px": 256, "width_px": 256}}):
        sections = dict(sections)
        n = sections.pop("n_images", 2000)
        cfg, ds = dataset(n, **sections)
        batch = batch_images(ds)
        specs = specs_for(ds)
        assert all(batch % s.chunks[0] == 0 for s in specs)
        assert batch % ds.frames_per_movie == 0 and ds.chunk_rows % math.gcd(batch, ds.chunk_rows) == 0
        row = sum(math.prod(s.shape[1:]) * np.dtype(s.dtype).itemsize for s in specs)
        assert batch * row <= BATCH_BYTES or batch == math.lcm(ds.frames_per_movie, *(s.chunks[0] for s in specs))
        assert batch * row > BATCH_BYTES / 4 or batch >= n  # near the budget, not far below


@pytest.mark.parametrize("fmt", ["hdf5", "zarr"])
def test_real_size_build_succeeds_and_reads_back(tmp_path, fmt):
    """512 x 512 px, 64 particles, trajectories with the default step (one per line)."""
    cfg = parse_config({"seed": 5, "defaults": BIG, "datasets": {"big": {"n_images": 2}}})
    ds = cfg.datasets["big"]
    assert ds.trajectory_resolution == "line"
    (r,) = build(cfg, tmp_path, fmt, progress=False)
    got = read_rows(r.path, 0, 2)
    want = simulate(ds, cfg.seed)
    assert got["trajectories"].shape == (2, 64, 512, 3)
    assert_same_arrays(want, got)
    assert verify_store(r.path) == []


@pytest.mark.parametrize("fmt", ["hdf5", "zarr"])
def test_dwell_rows_larger_than_a_chunk_shard_finalize_and_verify(tmp_path, fmt):
    """Per-dwell trajectories of 512 x 512 px and 64 particle slots (201 MB a row, so
    chunks of (1, 16, T, 3)): sharded build, finalize (HDF5: copied into one file) and
    verify.  Few particles are present, so the kernel is fast; the rest are NaN."""
    raw = {"seed": 3, "defaults": {"image": BIG["image"],
                                   "particles": {"count": {"type": "poisson", "mean": 2, "max": 64}},
                                   "output": {"trajectory_step": "dwell", "expected": False}},
           "datasets": {"d": {"n_images": 2}}}
    path = tmp_path / "d.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    ds = cfg.datasets["d"]
    out = tmp_path / "out"
    for i in range(2):
        build_shards(cfg, out, fmt, None, (i, 2), progress=False)
    (final,) = finalize(cfg, out, fmt, copy=fmt == "hdf5", progress=False)
    assert verify_store(final) == []
    with Store(final) as st:
        assert st["trajectories"].chunks == (1, 16, 512 * 512, 3)
    for i in range(2):
        got, want = read_rows(final, i, i + 1), simulate(ds, cfg.seed, i, i + 1)
        assert np.isfinite(want["trajectories"][0, 0]).all()
        assert_same_arrays(want, got)


# --- trajectory_step ------------------------------------------------------------------------

STEP_CASES = {
    "images": {"image": {"height_px": 9, "width_px": 11},
               "scan": {"substeps_per_dwell": 3, "direction": "bidirectional"},
               "particles": {"count": {"type": "poisson", "mean": 2, "max": 4}}},
    "movies": {"n_images": None, "n_movies": 6, "movie": {"n_frames": 3, "margin_um": 0.3},
               "image": {"height_px": 8, "width_px": 10},
               "particles": {"count": {"type": "poisson", "mean": 2, "max": 3}}},
    "stacks": {"n_images": None, "n_stacks": 5, "stack": {"n_planes": 3, "z_step_um": 0.5},
               "image": {"height_px": 7, "width_px": 8},
               "particles": {"count": {"type": "poisson", "mean": 2, "max": 3}, "xy_start": {"margin_px": 1}}},
}


def _run(engine, case, step):
    sections = dict(STEP_CASES[case])
    n = sections.pop("n_images", 12)
    cfg, ds = dataset(n, seed=9, **sections, output={"trajectory_step": step})
    if engine == "numba":
        return ds, simulate(ds, cfg.seed)
    return ds, simulate_numpy(ds, ds.n_images, np.random.default_rng(9))


@pytest.mark.parametrize("case", sorted(STEP_CASES))
@pytest.mark.parametrize("engine", ["numba", "numpy"])
def test_line_and_frame_samples_are_the_dwell_trajectory_at_their_steps(engine, case):
    """A line sample is the dwell trajectory at the line's first pixel step (in time
    order), a frame sample at the frame's (plane's) first; every other array is the same."""
    ds, dwell = _run(engine, case, "dwell")
    H, W, Z = ds.image.height_px, ds.image.width_px, ds.planes
    assert dwell["trajectories"].shape[2] == Z * H * W
    for step, stride in (("line", W), ("frame", H * W)):
        ds_s, out = _run(engine, case, step)
        assert ds_s.trajectory_samples == Z * H * W // stride
        assert out["trajectories"].shape == dwell["trajectories"].shape[:2] + (Z * H * W // stride, 3)
        assert out["trajectories"].tobytes() == dwell["trajectories"][:, :, ::stride].tobytes(), step
        assert np.isfinite(out["trajectories"][:, 0]).any()
        for name in dwell:
            if name != "trajectories":
                assert out[name].tobytes() == dwell[name].tobytes(), (step, name)


def test_line_store_holds_the_dwell_trajectory_at_each_line_start(tmp_path):
    """Built stores (HDF5 and Zarr) of one dataset at step dwell and at step line."""
    cfgs = {step: parse_config({"seed": 4, "defaults": STEP_CASES["images"], "datasets": {"d": {
        "n_images": 70, "output": {"trajectory_step": step, "chunk_images": 64}}}}) for step in ("dwell", "line")}
    for fmt in ("hdf5", "zarr"):
        for step, cfg in cfgs.items():
            build(cfg, tmp_path / fmt / step, fmt, progress=False)
        with Store(tmp_path / fmt / "dwell" / f"d{EXT[fmt]}") as a, Store(tmp_path / fmt / "line" / f"d{EXT[fmt]}") as b:
            assert b["trajectories"].shape == (70, 4, 9, 3)
            assert b.read("trajectories").tobytes() == a.read("trajectories")[:, :, ::11].tobytes()
            for name in a.names:
                if name != "trajectories":
                    assert a.read(name).tobytes() == b.read(name).tobytes(), name
    # Another step: another hash; "auto" hashes as the step it stands for.
    assert dataset_hash(4, cfgs["dwell"].datasets["d"]) != dataset_hash(4, cfgs["line"].datasets["d"])
    auto, line = (parse_config({"seed": 1, "defaults": BIG, "datasets": {"a": {
        "n_images": 1, "output": {"trajectory_step": step}}}}).datasets["a"] for step in ("auto", "line"))
    assert auto.trajectory_resolution == "line" and dataset_hash(1, auto) == dataset_hash(1, line)


def _hash_without_the_step(seed, ds) -> str:
    """The dataset hash as computed before ``output.trajectory_step`` existed."""
    d = json.loads(ds.model_dump_json())
    del d["output"]["compression"], d["output"]["trajectory_step"]
    for key in ("movie", "n_movies", "stack", "n_stacks"):
        if d.get(key) is None:
            d.pop(key, None)
    return config_hash({"seed": seed, "dataset": d})


@pytest.mark.parametrize("name", ["datasets.yaml", "crowded.yaml", "volumes.yaml"])
def test_repository_configs_keep_their_hashes_and_every_dwell(name):
    cfg = load_config(ROOT / name)
    for ds in cfg.datasets.values():
        assert ds.output.trajectory_step == "auto" and ds.trajectory_resolution == "dwell", ds.name
        assert dataset_hash(cfg.seed, ds) == _hash_without_the_step(cfg.seed, ds), ds.name
        # A store's recorded config reads back to the same hash.
        attrs = store_attrs(cfg, ds)
        back = json.loads(attrs["config"])
        again = config_from_json(json.dumps({"seed": back["seed"], "datasets": {ds.name: back["dataset"]}}))
        assert dataset_hash(cfg.seed, again.datasets[ds.name]) == attrs["dataset_hash"]


def test_stores_written_before_the_setting_read_as_dwell():
    """A stored config without the field was built with every dwell, whatever its size."""
    cfg = parse_config({"seed": 1, "defaults": BIG, "datasets": {"a": {"n_images": 1}}})
    d = json.loads(cfg.datasets["a"].model_dump_json())
    del d["output"]["trajectory_step"]
    old = config_from_json(json.dumps({"seed": 1, "datasets": {"a": d}})).datasets["a"]
    assert old.trajectory_resolution == "dwell"
    assert dataset_hash(1, old) == _hash_without_the_step(1, old)


# --- size estimate ------------------------------------------------------------------------


def test_a_build_too_big_for_the_disk_is_refused_before_anything_is_written(tmp_path):
    # 32 PB of images; one frame of 8 particles is too much work for a pilot, so the
    # estimate is the upper bound.
    raw = {"seed": 1, "defaults": {"image": {"height_px": 4096, "width_px": 4096}, "particles": {"count": 8},
                                   "output": {"expected": False, "trajectories": False}},
           "datasets": {"huge": {"n_images": 10**9}}}
    path = tmp_path / "huge.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    with pytest.raises(FactoryError, match="not enough free disk"):
        build(load_config(path), out, "hdf5", progress=False)
    assert not out.exists()
    r = run_cli("build", path, "--out", out)
    one_line_error(r, str(path), "huge", "free", "PB")
    assert not out.exists()


def test_estimate_is_exact_uncompressed_and_bounds_the_store(tmp_path):
    cfg = parse_config({"seed": 2, "datasets": {"a": {"n_images": 700, "output": {"chunk_images": 64}}}})
    ds = cfg.datasets["a"]
    for fmt in ("hdf5", "zarr"):
        e = estimate(cfg, ds, fmt)
        (r,) = build(cfg, tmp_path / fmt, fmt, progress=False)
        with Store(r.path) as st:
            assert e.uncompressed_bytes == sum(st[n].nbytes for n in st.names)
        assert e.rows == 700 and e.seconds is not None
        assert r.bytes_on_disk <= e.bound_bytes
        assert 0.7 < e.disk_bytes / r.bytes_on_disk < 1.4, (fmt, e.disk_bytes, r.bytes_on_disk)
    part = estimate(cfg, ds, "hdf5", 128, 320)  # a shard's rows
    assert part.rows == 192 and part.uncompressed_bytes * 700 == e.uncompressed_bytes * 192
