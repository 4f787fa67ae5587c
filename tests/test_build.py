"""Stores, reproducibility and the factory CLI (real HDF5 and Zarr files)."""

import json
import os
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest
import yaml

from conftest import ROOT, assert_same_arrays, dataset, one_line_error, run_cli, run_cli_process
from factory.build import build
from factory.config import load_config, parse_config
from factory.kernel import simulate
from factory.stores import Store

NAMES = ["images", "expected", "n_particles", "centroids", "trajectories", "diffusion", "n_qd",
         "exposure_xy", "exposure_t_s", "in_view", "frame_start_s"]


def small_config(tmp_path, seed=11, **over):
    raw = {
        "seed": seed,
        "defaults": {"output": {"chunk_images": 64}},
        "datasets": {
            "a": {"n_images": 300},
            "b": {"n_images": 130, "particles": {"diffusion_um2_s": 0.75,
                                                 "count": {"type": "poisson", "mean": 1.5, "max": 3}}},
        },
    }
    raw.update(over)
    path = tmp_path / f"cfg{seed}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def read_all(path):
    with Store(path) as st:
        return {name: st.read(name) for name in st.names}, dict(st.attrs)


def test_store_layout_and_provenance(tmp_path):
    cfg = load_config(small_config(tmp_path))
    build(cfg, tmp_path / "out", "hdf5", progress=False)
    arrays, attrs = read_all(tmp_path / "out" / "b.h5")
    assert sorted(arrays) == sorted(NAMES)
    assert arrays["images"].shape == (130, 24, 25) and arrays["images"].dtype == np.uint16
    assert arrays["expected"].dtype == np.float32
    assert arrays["trajectories"].shape == (130, 3, 600, 3)
    assert arrays["centroids"].shape == (130, 3, 2)
    stored = json.loads(attrs["config"])
    assert stored["seed"] == 11 and stored["dataset"]["n_images"] == 130
    assert stored["dataset"]["particles"]["diffusion_um2_s"] == {"type": "fixed", "value": 0.75}
    assert attrs["package_version"] and "centre of pixel" in attrs["coordinates"]
    assert "um^2/s" in json.loads(attrs["units"])["diffusion"]
    with Store(tmp_path / "out" / "a.h5") as st:
        assert st["images"].chunks == (64, 24, 25) and st["trajectories"].chunks[0] == 64


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    for run in ("r1", "r2"):
        build(load_config(small_config(tmp_path)), tmp_path / run, "hdf5", progress=False)
    build(load_config(small_config(tmp_path, seed=12)), tmp_path / "r3", "hdf5", progress=False)
    a, _ = read_all(tmp_path / "r1" / "a.h5")
    assert_same_arrays(a, read_all(tmp_path / "r2" / "a.h5")[0])
    c, _ = read_all(tmp_path / "r3" / "a.h5")
    assert not np.array_equal(a["images"], c["images"])
    assert not np.array_equal(a["centroids"], c["centroids"])
    # Datasets of one config draw independent streams.
    b, _ = read_all(tmp_path / "r1" / "b.h5")
    assert not np.array_equal(a["images"][:130], b["images"])


def assert_thread_and_batch_invariant(cfg, ds, splits):
    """1 and 2 Numba threads, and the given (start, stop) batches, give the same bytes."""
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = simulate(ds, cfg.seed)
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        two = simulate(ds, cfg.seed)
    finally:
        numba.set_num_threads(before)
    assert_same_arrays(one, two)
    pieces = [simulate(ds, cfg.seed, a, b) for a, b in splits]
    assert_same_arrays(one, {k: np.concatenate([p[k] for p in pieces]) for k in one})


def test_identical_with_one_and_two_threads_and_any_batching():
    cfg, ds = dataset(700, particles={"count": {"type": "poisson", "mean": 2, "max": 4}})
    assert_thread_and_batch_invariant(cfg, ds, [(0, 1), (1, 333), (333, 700)])


def test_movies_are_identical_with_one_and_two_threads_and_any_batch_of_whole_movies():
    cfg, ds = dataset(n_images=None, n_movies=12, movie={"n_frames": 5},
                      particles={"count": {"type": "poisson", "mean": 3, "max": 5}},
                      image={"height_px": 16, "width_px": 16})
    assert_thread_and_batch_invariant(cfg, ds, [(0, 5), (5, 35), (35, 60)])
    with pytest.raises(ValueError, match="whole movies"):
        simulate(ds, cfg.seed, 0, 7)


def test_threads_in_a_fresh_process_give_the_same_bytes(tmp_path):
    """NUMBA_NUM_THREADS=1 vs 2 in separate processes writing real stores."""
    cfg = small_config(tmp_path)
    for threads in ("1", "2"):
        # A process each: Numba reads NUMBA_NUM_THREADS when it is imported.
        r = run_cli_process("build", cfg, "--out", tmp_path / f"t{threads}", "-q", env={"NUMBA_NUM_THREADS": threads})
        assert r.returncode == 0, r.stderr
    assert_same_arrays(tmp_path / "t1" / "a.h5", tmp_path / "t2" / "a.h5")


def test_hdf5_and_zarr_hold_identical_arrays(tmp_path):
    cfg = load_config(small_config(tmp_path))
    build(cfg, tmp_path / "h", "hdf5", progress=False)
    build(cfg, tmp_path / "z", "zarr", progress=False)
    for name in ("a", "b"):
        h, ha = read_all(tmp_path / "h" / f"{name}.h5")
        z, za = read_all(tmp_path / "z" / f"{name}.zarr")
        assert_same_arrays(h, z)
        assert ha["config"] == za["config"] and ha["dataset_hash"] == za["dataset_hash"]


def test_optional_arrays_can_be_turned_off(tmp_path):
    cfg = parse_config({"seed": 1, "datasets": {"x": {"n_images": 70, "output": {
        "expected": False, "trajectories": False, "chunk_images": 64}}}})
    build(cfg, tmp_path, "zarr", progress=False)
    arrays, _ = read_all(tmp_path / "x.zarr")
    assert "expected" not in arrays and "trajectories" not in arrays
    full = simulate(cfg.datasets["x"], 1)
    assert np.array_equal(arrays["images"], full["images"])


def test_default_config_describes_the_paper_suite():
    cfg = load_config(ROOT / "datasets.yaml")
    sizes = {name: d.n_images for name, d in cfg.datasets.items()}
    assert sizes == {"train": 29838, "val": 3000, "test_d075": 2570, "test_d100": 2410, "test_d175": 1870,
                     "movies_train": 2400, "movies_val": 300, "test_movies": 800}
    m = cfg.datasets["test_movies"]
    assert m.n_movies == 40 and m.movie.n_frames == 20 and m.image.height_px == 64
    assert m.particles.diffusion_um2_s.low == 0.05 and m.particles.diffusion_um2_s.high == 1.0
    t = cfg.datasets["test_d100"]
    assert t.particles.diffusion_um2_s.value == 1.0 and t.particles.n_qd.value == 10.0
    assert cfg.datasets["train"].particles.diffusion_um2_s.low == 0.75
    assert t.image.height_px == 24 and t.image.width_px == 25 and t.background.n_bkg == 8.4


# --- bad input: one line naming file and field, exit != 0, no traceback, nothing left ---

BAD = [
    ("unknown key", {"defaults": {"psf": {"sigma_xy": 0.2}}}, "defaults.psf.sigma_xy: unknown key"),
    ("wrong type", {"datasets": {"a": {"n_images": "many"}}}, "datasets.a.n_images"),
    ("zero pixel size", {"datasets": {"a": {"n_images": 5, "image": {"pixel_size_um": 0}}}},
     "datasets.a.image.pixel_size_um: Input should be greater than 0"),
    ("negative sigma in defaults", {"defaults": {"psf": {"sigma_z_um": -1}}}, "defaults.psf.sigma_z_um"),
    ("negative D", {"datasets": {"a": {"n_images": 5, "particles": {"diffusion_um2_s": -0.5}}}},
     "datasets.a.particles.diffusion_um2_s.value"),
    ("margin too large", {"datasets": {"a": {"n_images": 5, "particles": {"xy_start": {"margin_px": 12}}}}},
     "margin_px = 12.0 leaves no room"),
    ("unknown top-level", {"sed": 3}, "sed: unknown key"),
    ("a number as a string", {"datasets": {"a": {"n_images": 5, "image": {"height_px": "24"}}}},
     "datasets.a.image.height_px: Input should be a valid integer"),
    ("a bool as a string", {"datasets": {"a": {"n_images": 5, "output": {"expected": "yes"}}}},
     "datasets.a.output.expected: Input should be a valid boolean"),
    ("unknown compression", {"datasets": {"a": {"n_images": 5, "output": {"compression": "lzf"}}}},
     "datasets.a.output.compression"),
]


@pytest.mark.parametrize("label,patch,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_config_gives_one_clear_line(tmp_path, label, patch, needle):
    raw = {"seed": 1, "datasets": {"a": {"n_images": 5}}}
    for k, v in patch.items():
        raw[k] = v
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    r = run_cli("build", path, "--out", tmp_path / "out")
    one_line_error(r, str(path), needle)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_missing_file_and_invalid_yaml(tmp_path):
    one_line_error(run_cli("build", tmp_path / "nope.yaml", "--out", tmp_path / "o"), "nope.yaml: no such file")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 1\ndatasets: {a: {n_images: 3}\n")
    one_line_error(run_cli("build", bad, "--out", tmp_path / "o"), "bad.yaml: invalid YAML (line")


def test_existing_output_needs_overwrite_and_unwritable_out(tmp_path):
    cfg = small_config(tmp_path)
    assert run_cli("build", cfg, "--out", tmp_path / "o", "-q", "--only", "b").returncode == 0
    before = (tmp_path / "o" / "b.h5").read_bytes()
    one_line_error(run_cli("build", cfg, "--out", tmp_path / "o", "-q", "--only", "b"), "b.h5: already exists (use --overwrite")
    assert (tmp_path / "o" / "b.h5").read_bytes() == before
    one_line_error(run_cli("build", cfg, "--out", tmp_path / "o", "-q", "--only", "zz"), "--only zz: no such dataset")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    one_line_error(run_cli("build", cfg, "--out", blocker, "-q"), "not a directory")
    if os.geteuid() != 0:  # root can write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        one_line_error(run_cli("build", cfg, "--out", ro, "-q"), "not writable")


def test_interrupted_build_leaves_no_store(tmp_path):
    """A build killed mid-way leaves only a hidden partial file, never <name>.h5."""
    cfg = tmp_path / "big.yaml"
    # About 10 s of work here but only about 0.4 GB on disk: the free-disk check must
    # not refuse it on a small /tmp.
    cfg.write_text(yaml.safe_dump({"seed": 1, "datasets": {"big": {"n_images": 60000}}}))
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-m", "cli", "build", str(cfg), "--out", str(out), "-q"])
    import time

    deadline = time.time() + 60
    while time.time() < deadline and not (out.exists() and any(out.iterdir())):
        time.sleep(0.05)
    time.sleep(0.3)
    assert proc.poll() is None, "the build ended before it could be killed mid-way"
    proc.kill()
    proc.wait()
    assert not (out / "big.h5").exists()
    left = list(out.iterdir())
    assert left and all(p.name.startswith(".") for p in left)  # the partial file, hidden


def test_inspect_preview_schema(tmp_path):
    cfg = small_config(tmp_path)
    assert run_cli("build", cfg, "--out", tmp_path / "o", "-q", "--format", "zarr").returncode == 0
    r = run_cli("inspect", tmp_path / "o")
    assert r.returncode == 0 and "trajectories" in r.stdout and "mean_count" in r.stdout
    r = run_cli("inspect", tmp_path / "o" / "a.zarr", "--json")
    summary = json.loads(r.stdout)[0]
    assert summary["n_images"] == 300 and abs(summary["stats"]["mean_count"] - 9.3) < 0.3
    r = run_cli("preview", tmp_path / "o" / "b.zarr", "--out", tmp_path / "p.png", "--n", "9")
    assert r.returncode == 0 and (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    one_line_error(run_cli("inspect", tmp_path / "missing.h5"), "missing.h5")
    r = run_cli("schema")
    assert r.returncode == 0 and "psf.sigma_xy_um" in r.stdout and "0.21" in r.stdout
    assert "detector (type: pmt)" in r.stdout
    assert "stack.z_step_um" in r.stdout and "movie.frame_flyback_ms                       float | None" in r.stdout


def test_cli_help_describes_commands():
    r = run_cli("--help")
    for cmd in ("build", "inspect", "preview", "schema"):
        assert cmd in r.stdout
    r = run_cli("build", "--help")
    assert "--overwrite" in r.stdout and "--format" in r.stdout


def test_default_hdf5_opens_without_any_plugin(tmp_path):
    """Deflate + shuffle are built into every HDF5 library: plain h5py (no hdf5plugin
    imported) reads every array, equal to what the simulator produced, and h5dump does
    too where it is installed."""
    import shutil

    cfg, ds = dataset(300, output={"chunk_images": 64})
    build(cfg, tmp_path, progress=False)
    ref = simulate(ds, cfg.seed)
    np.savez(tmp_path / "ref.npz", **ref)
    code = textwrap.dedent(f"""
        import sys, h5py, numpy as np
        ref = np.load({str(tmp_path / 'ref.npz')!r})
        with h5py.File({str(tmp_path / 'd.h5')!r}, 'r') as f:
            assert f.attrs['compression'] == 'gzip'
            for name in ref.files:
                assert f[name].compression == 'gzip' and f[name].shuffle, name
                a = f[name][:]
                assert np.array_equal(a, ref[name], equal_nan=True), name
        assert 'hdf5plugin' not in sys.modules
        print('read', len(ref.files))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == f"read {len(NAMES)}", r.stderr
    if shutil.which("h5dump"):
        r = subprocess.run(["h5dump", "-d", "/n_particles", str(tmp_path / "d.h5")], capture_output=True, text=True)
        assert r.returncode == 0 and "(0): 1, 1, 1" in r.stdout, r.stderr


def test_blosc_stays_an_option_with_the_same_arrays(tmp_path):
    from factory.config import dataset_hash

    cfg, ds = dataset(200, output={"chunk_images": 64, "compression": "blosc-lz4"})
    build(cfg, tmp_path, progress=False)
    ref = simulate(ds, cfg.seed)
    # The codec changes the file, not the dataset: the same hash as the default's.
    cfg_gzip, ds_gzip = dataset(200, output={"chunk_images": 64})
    assert dataset_hash(cfg.seed, ds) == dataset_hash(cfg_gzip.seed, ds_gzip)
    assert dataset_hash(cfg.seed, ds) != dataset_hash(cfg.seed + 1, ds)
    assert run_cli("verify", tmp_path / "d.h5").returncode == 0
    with Store(tmp_path / "d.h5") as st:
        assert st.attrs["compression"] == "blosc-lz4"
        for name, a in ref.items():
            np.testing.assert_array_equal(st.read(name), a)
