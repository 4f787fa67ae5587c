"""Sharded builds: invariance to the split, resume after SIGKILL, finalize and verify."""

import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import assert_same_arrays, one_line_error, run_cli
from factory.shards import parse_shard, shard_range

CONFIG = {
    "seed": 21,
    "defaults": {"output": {"chunk_images": 64}},
    "datasets": {
        "a": {"n_images": 900},
        "b": {"n_images": 150, "particles": {"count": {"type": "poisson", "mean": 2, "max": 4}}},
        # Movies: 23 of 7 frames; chunks of 64 images round up to 70 (whole movies), so
        # every shard holds whole movies.
        "m": {"n_movies": 23, "movie": {"n_frames": 7, "margin_um": 0.5},
              "image": {"height_px": 16, "width_px": 20},
              "particles": {"count": {"type": "poisson", "mean": 3, "max": 6}}},
        # Stacks: 19 of 5 planes; chunks of 64 planes hold 13 stacks.
        "s": {"n_stacks": 19, "stack": {"n_planes": 5, "z_step_um": 0.4},
              "image": {"height_px": 12, "width_px": 14},
              "particles": {"count": {"type": "poisson", "mean": 2, "max": 5}, "diffusion_um2_s": 0.3,
                            "xy_start": {"margin_px": 1}, "z_start_um": {"low": -1.0, "high": 1.0}}},
    },
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    cfg = root / "c.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    for fmt in ("hdf5", "zarr"):
        r = run_cli("build", cfg, "--out", root / f"single-{fmt}", "--format", fmt, "-q")
        assert r.returncode == 0, r.stderr
    return root, cfg


def shard_cmd(cfg, out, fmt, spec):
    return [sys.executable, "-m", "cli", "build", str(cfg), "--out", str(out),
            "--format", fmt, "--shard", spec, "-q"]


EXT = {"hdf5": ".h5", "zarr": ".zarr"}


@pytest.mark.parametrize("fmt", ["hdf5", "zarr"])
@pytest.mark.parametrize("count", [1, 3, 7])
def test_any_split_gives_the_single_process_bytes(setup, fmt, count):
    root, cfg = setup
    out = root / f"{fmt}-{count}"
    # All shards at once (3 and 7 processes race to create the Zarr store).
    procs = [subprocess.Popen(shard_cmd(cfg, out, fmt, f"{i}/{count}"), stderr=subprocess.PIPE)
             for i in range(count)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()
    r = run_cli("finalize", cfg, "--out", out, "--format", fmt, "-q")
    assert r.returncode == 0, r.stderr
    for name in ("a", "b", "m", "s"):
        assert_same_arrays(root / f"single-{fmt}" / f"{name}{EXT[fmt]}", out / f"{name}{EXT[fmt]}")
    r = run_cli("verify", out)
    assert r.returncode == 0 and r.stdout.count(": ok") == 4, r.stderr


def test_copy_finalize_is_self_contained(setup, tmp_path):
    root, cfg = setup
    out = tmp_path / "o"
    for i in range(3):
        assert run_cli("build", cfg, "--out", out, "--shard", f"{i}/3", "-q").returncode == 0
    assert run_cli("finalize", cfg, "--out", out, "--copy", "-q").returncode == 0
    import shutil

    shutil.rmtree(out / "a.shards")
    assert_same_arrays(root / "single-hdf5" / "a.h5", out / "a.h5")
    assert run_cli("verify", out / "a.h5").returncode == 0


def test_shard_ranges_are_whole_chunks_covering_everything():
    for n, chunk, count in [(900, 64, 7), (150, 64, 3), (64, 64, 5), (10**6, 256, 100)]:
        ranges = [shard_range(n, chunk, i, count) for i in range(count)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        for (_, b), (c, _) in zip(ranges, ranges[1:]):
            assert b == c
        for a, b in ranges:
            assert a % chunk == 0 and (b % chunk == 0 or b == n)


def test_shard_auto_reads_slurm_variables():
    env = {"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "10"}
    assert parse_shard("auto", env) == (2, 4)
    assert parse_shard("3/8") == (3, 8)
    from factory.errors import FactoryError

    for bad in ("8/8", "x", "-1/3"):
        with pytest.raises(FactoryError):
            parse_shard(bad)
    with pytest.raises(FactoryError, match="SLURM_ARRAY_TASK_ID"):
        parse_shard("auto", {})


def _written_bytes(out) -> int:
    """Bytes under ``out``; files vanish while the writer renames its temporaries."""
    total = 0
    for p in out.rglob("*") if out.exists() else []:
        try:
            total += p.stat().st_size if p.is_file() else 0
        except FileNotFoundError:
            continue
    return total


@pytest.mark.parametrize("fmt", ["hdf5", "zarr"])
def test_sigkill_mid_way_then_rerun_gives_the_same_bytes(setup, tmp_path, fmt):
    root, _ = setup
    big = dict(CONFIG, datasets={"k": {"n_images": 60000, "output": {"chunk_images": 256}}})
    cfg = tmp_path / "k.yaml"
    cfg.write_text(yaml.safe_dump(big))
    ref = tmp_path / "ref"
    assert run_cli("build", cfg, "--out", ref, "--format", fmt, "-q").returncode == 0
    out = tmp_path / "o"
    for i in range(2):
        proc = subprocess.Popen(shard_cmd(cfg, out, fmt, f"{i}/2"))
        # Kill each shard once it has started writing (or at the latest after 20 s).
        deadline = time.time() + 20
        while time.time() < deadline and _written_bytes(out) < 1_000_000:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # Nothing looks complete after the kill.
        assert run_cli("finalize", cfg, "--out", out, "--format", fmt, "-q").returncode == 2
        assert not (out / f"k{EXT[fmt]}").exists() or run_cli("verify", out / f"k{EXT[fmt]}").returncode != 0
    for i in range(2):
        assert run_cli("build", cfg, "--out", out, "--format", fmt, "--shard", f"{i}/2", "-q").returncode == 0
    r = run_cli("build", cfg, "--out", out, "--format", fmt, "--shard", "1/2")
    assert "complete and valid, skipped" in r.stdout
    assert run_cli("finalize", cfg, "--out", out, "--format", fmt, "-q").returncode == 0
    assert_same_arrays(ref / f"k{EXT[fmt]}", out / f"k{EXT[fmt]}")


@pytest.mark.parametrize("fmt", ["hdf5", "zarr"])
def test_deleted_or_corrupted_shard_is_named(setup, tmp_path, fmt):
    _, cfg = setup
    out = tmp_path / "o"
    for i in range(3):
        assert run_cli("build", cfg, "--out", out, "--format", fmt, "--shard", f"{i}/3", "-q").returncode == 0
    assert run_cli("finalize", cfg, "--out", out, "--format", fmt, "-q").returncode == 0
    if fmt == "hdf5":
        victim = out / "a.shards" / "shard-00001-of-00003.h5"
        data = bytearray(victim.read_bytes())
        mid = len(data) // 2
        data[mid:mid + 4000] = bytes(4000)
        victim.write_bytes(bytes(data))
        (out / "b.shards" / "shard-00002-of-00003.h5").unlink()
    else:
        chunk = sorted((out / "a.zarr" / "images" / "c").iterdir(), key=lambda p: int(p.name))[5]
        for f in chunk.rglob("*"):
            if f.is_file():
                f.unlink()
        (out / "b.zarr.shards" / "shard-00002-of-00003.json").unlink()
    r = run_cli("verify", out)
    assert r.returncode == 1 and "shard-00001-of-00003" in r.stderr, r.stderr
    if fmt == "hdf5":
        assert "b.shards/shard-00002-of-00003.h5 is missing" in r.stderr
    one_line_error(run_cli("finalize", cfg, "--out", out, "--format", fmt, "-q", "--only", "a"),
                   "shard-00001-of-00003", "--shard 1/3")
    one_line_error(run_cli("finalize", cfg, "--out", out, "--format", fmt, "-q", "--only", "b"),
                   "shard-00002-of-00003 (", "missing", "--shard 2/3")


def test_a_different_split_in_the_same_folder_is_refused(setup, tmp_path):
    _, cfg = setup
    out = tmp_path / "o"
    assert run_cli("build", cfg, "--out", out, "--shard", "0/3", "-q", "--only", "a").returncode == 0
    one_line_error(run_cli("build", cfg, "--out", out, "--shard", "0/4", "-q", "--only", "a"), "3-way split")


def test_slurm_scripts(setup, tmp_path):
    _, cfg = setup
    r = run_cli("slurm", cfg, "--shards", "5", "--out", tmp_path / "o", "--partition", "short",
                "--time", "00:30:00", "--cpus", "4", "--mem", "8G")
    assert r.returncode == 0, r.stderr
    build = (tmp_path / "o" / "slurm" / "build.sbatch").read_text()
    fin = (tmp_path / "o" / "slurm" / "finalize.sbatch").read_text()
    for needle in ("#SBATCH --array=0-4", "#SBATCH --cpus-per-task=4", "#SBATCH --partition=short",
                   "#SBATCH --time=00:30:00", "#SBATCH --mem=8G", "build_%A_%a.out",
                   'NUMBA_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"', "NUMBA_CACHE_DIR=", "${SLURM_JOB_ID}",
                   "HDF5_USE_FILE_LOCKING=FALSE", "--shard auto"):
        assert needle in build, needle
    from factory.slurm import factory_command

    factory = factory_command()  # the console script beside this Python, as in the subprocess
    assert f"{factory} finalize" in fin and f"{factory} build" in build and "-m cli" not in build + fin
    assert "--kill-on-invalid-dep=yes" in fin
    assert "afterok" in r.stdout
    one_line_error(run_cli("slurm", cfg, "--shards", "5", "--out", tmp_path / "o", "--time", "soon"), "--time soon")
