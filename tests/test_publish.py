"""Stores that never lie: exclusive builds, atomic publication, unfinished stores refused.

Real processes and real files: builds run as `factory` processes that are killed with
SIGKILL, race each other into one folder or meet a lock another process holds; every
reader is pointed at unfinished stores.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import h5py
import pytest
import yaml

from conftest import ROOT, assert_same_arrays, one_line_error, run_cli, run_cli_process
from factory.errors import FactoryError, StoreError
from factory.stores import Store, find_stores

EXT = {"hdf5": ".h5", "zarr": ".zarr"}
SMALL = {"seed": 5, "defaults": {"output": {"chunk_images": 64}},
         "datasets": {"k": {"n_images": 1200}}}


def write_config(path, cfg):
    path.write_text(yaml.safe_dump(cfg))
    return path


def build_cmd(cfg, out, fmt, *extra):
    return [sys.executable, "-m", "cli", "build", str(cfg), "--out", str(out), "--format", fmt, "-q", *extra]


def leftovers(folder):
    """Temporary files and locks a build may leave behind."""
    return sorted(p.name for p in folder.rglob(".*") if ".partial-" in p.name or p.name.endswith(".lock")
                  or ".old-" in p.name)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """The small dataset built once, cleanly, in both formats."""
    root = tmp_path_factory.mktemp("clean")
    cfg = write_config(root / "c.yaml", SMALL)
    for fmt in EXT:
        r = run_cli("build", cfg, "--out", root / fmt, "--format", fmt, "-q")
        assert r.returncode == 0, r.stderr
    return root, cfg


# --- two builds into one folder ---------------------------------------------------------


@pytest.mark.parametrize("fmt", ["hdf5", "zarr"])
def test_two_concurrent_builds_of_different_configs_into_one_folder(tmp_path, fmt):
    """Both want store `shared` (from different configs): exactly one build succeeds, the
    other says why in one line, and the store is wholly the winner's."""
    shared = {"n_images": 3000}
    a = write_config(tmp_path / "a.yaml", {"seed": 1, "datasets": {"shared": shared, "a_only": {"n_images": 64}}})
    b = write_config(tmp_path / "b.yaml", {"seed": 2, "datasets": {"shared": shared, "b_only": {"n_images": 64}}})
    out = tmp_path / "out"
    procs = {name: subprocess.Popen(build_cmd(cfg, out, fmt), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True) for name, cfg in (("a", a), ("b", b))}
    done = {name: subprocess.CompletedProcess(p.args, p.wait(timeout=300), p.stdout.read(), p.stderr.read())
            for name, p in procs.items()}
    winners = [name for name, r in done.items() if r.returncode == 0]
    assert len(winners) == 1, done
    loser = "b" if winners == ["a"] else "a"
    line = one_line_error(done[loser], "shared", code=None)
    assert "being written by" in line or "already exists" in line, line
    with Store(out / f"shared{EXT[fmt]}") as st:
        assert st.config["seed"] == (1 if winners == ["a"] else 2)
    assert run_cli("verify", out / f"shared{EXT[fmt]}").returncode == 0
    assert not (out / f"{loser}_only{EXT[fmt]}").exists()  # the loser stopped before any work
    assert leftovers(out) == []


def test_a_build_stops_at_once_while_another_process_writes_the_store(tmp_path, clean):
    from factory.publish import lock_path

    _, cfg = clean
    out = tmp_path / "o"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from factory.publish import store_lock\n"
        f"with store_lock({str(out / 'k.h5')!r}):\n"
        "    print('locked', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = subprocess.run(build_cmd(cfg, out, "hdf5"), capture_output=True, text=True)
        one_line_error(r, f"process {holder.pid}", "k.h5")
        assert not (out / "k.h5").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The holder died with SIGKILL: its lock file is still there, but the lock is gone.
    assert lock_path(out / "k.h5").exists()
    r = subprocess.run(build_cmd(cfg, out, "hdf5"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert leftovers(out) == []


def test_the_lock_is_exclusive_and_released_on_exit(tmp_path):
    from factory.publish import LockBusy, lock_path, store_lock

    p = tmp_path / "x.h5"
    with store_lock(p):
        with pytest.raises(LockBusy, match=f"process {os.getpid()}"):
            with store_lock(p):
                pass
    with store_lock(p):  # released: taken again
        pass
    assert not lock_path(p).exists()


def test_a_store_that_appeared_during_the_build_is_not_replaced(tmp_path):
    from factory.publish import publish

    final, tmp = tmp_path / "s.h5", tmp_path / ".s.h5.partial-x"
    final.write_bytes(b"theirs")
    tmp.write_bytes(b"mine")
    with pytest.raises(FactoryError, match="appeared while this build ran"):
        publish(tmp, final, overwrite=False)
    assert final.read_bytes() == b"theirs" and not tmp.exists()
    tmp.write_bytes(b"mine")
    publish(tmp, final, overwrite=True)
    assert final.read_bytes() == b"mine"


# --- SIGKILL at random points -------------------------------------------------------------


@pytest.mark.slow
def test_a_build_killed_anywhere_then_rerun_gives_the_clean_store(tmp_path, clean):
    """20 builds killed with SIGKILL at random moments (start-up, simulation, publication).
    After each kill nothing at the final name is served unless it is the whole store; the
    rerun gives a store bit-identical to a clean build and leaves nothing behind."""
    root, cfg = clean
    rng = random.Random(20)
    for trial in range(20):
        fmt = ("hdf5", "zarr")[trial % 2]
        out = tmp_path / f"t{trial}"
        final = out / f"k{EXT[fmt]}"
        p = subprocess.Popen(build_cmd(cfg, out, fmt), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.2, 2.5))
        p.send_signal(signal.SIGKILL)
        p.wait()
        # What a reader finds in the folder is nothing, or the whole store.
        try:
            found = find_stores(out)
        except StoreError:
            found = []
        for path in found:
            assert path == final, f"trial {trial}: {path} is served"
            assert_same_arrays(root / fmt / f"k{EXT[fmt]}", final)
        r = subprocess.run(build_cmd(cfg, out, fmt), capture_output=True, text=True)
        if r.returncode != 0:  # the killed build had already published the whole store
            one_line_error(r, "already exists", code=None)
            assert final.exists(), trial
        assert_same_arrays(root / fmt / f"k{EXT[fmt]}", final)
        assert leftovers(out) == [], trial


# --- unfinished stores are refused by every reader -----------------------------------------


def sharded_half(tmp_path, fmt):
    """Shard 0 of 2 built, not finalized."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = write_config(tmp_path / "c.yaml", {"seed": 3, "defaults": {"output": {"chunk_images": 64}},
                                              "datasets": {"h": {"n_images": 256}}})
    out = tmp_path / "o"
    r = run_cli("build", cfg, "--out", out, "--format", fmt, "--shard", "0/2", "-q")
    assert r.returncode == 0, r.stderr
    return cfg, out


@pytest.mark.parametrize("fmt", ["hdf5", "zarr"])
def test_a_half_built_sharded_store_is_not_under_its_final_name(tmp_path, fmt):
    cfg, out = sharded_half(tmp_path, fmt)
    assert not (out / f"h{EXT[fmt]}").exists()
    one_line_error(run_cli("inspect", out), "not finalized", "factory finalize", code=None)
    # Finalize refuses while a shard is missing; once both are built it publishes.
    r = run_cli("finalize", cfg, "--out", out, "--format", fmt, "-q")
    assert r.returncode != 0 and "--shard 1/2" in r.stderr
    r = run_cli("build", cfg, "--out", out, "--format", fmt, "--shard", "1/2", "-q")
    assert r.returncode == 0, r.stderr
    assert run_cli("finalize", cfg, "--out", out, "--format", fmt, "-q").returncode == 0
    r = run_cli("inspect", out, "--brief")
    assert r.returncode == 0, r.stderr
    assert run_cli("verify", out).returncode == 0


def unfinished_stores(tmp_path):
    """Three kinds of store a reader must refuse, each with what its message must say."""
    out = {}
    _, half = sharded_half(tmp_path / "z", "zarr")
    out["zarr shard 0 of 2"] = (half / "h.zarr.shards" / "h.zarr", "factory finalize")
    cfg, o = sharded_half(tmp_path / "v", "hdf5")
    assert run_cli("build", cfg, "--out", o, "--shard", "1/2", "-q").returncode == 0
    assert run_cli("finalize", cfg, "--out", o, "-q").returncode == 0
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.copy(o / "h.h5", moved / "h.h5")  # copied without its .shards folder
    out["virtual store without its shards"] = (moved / "h.h5", "shard files are missing")
    c = write_config(tmp_path / "n.yaml", {"seed": 4, "datasets": {"n": {"n_images": 64}}})
    assert run_cli("build", c, "--out", tmp_path / "n", "-q").returncode == 0
    with h5py.File(tmp_path / "n" / "n.h5", "r+") as f:  # as a build killed before its mark
        del f.attrs["complete"]
    out["store without its completeness mark"] = (tmp_path / "n" / "n.h5", "factory build")
    return out


@pytest.fixture(scope="module")
def unfinished(tmp_path_factory):
    return unfinished_stores(tmp_path_factory.mktemp("unfinished"))


@pytest.mark.parametrize("kind", ["zarr shard 0 of 2", "virtual store without its shards",
                                  "store without its completeness mark"])
def test_every_reader_refuses_an_unfinished_store(unfinished, kind, tmp_path):
    from loaders.datasets import StoreBatches, StoreDataset

    path, says = unfinished[kind]
    for reader in (Store, StoreDataset, StoreBatches):
        with pytest.raises(StoreError, match=says):
            reader(path)
    commands = [("inspect", path), ("preview", path, "--out", tmp_path / "p.png"),
                ("predict", "trackpy", path, "--out", tmp_path / "p.csv"),
                ("evaluate", "--detector", "trackpy-paper", "--data", path, "--out", tmp_path / "ev")]
    for args in commands:
        one_line_error(run_cli(*args), says, str(path), code=None)
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "p.png").exists()
    assert run_cli("verify", path).returncode != 0


def test_training_refuses_an_unfinished_store(unfinished, tmp_path):
    path, says = unfinished["store without its completeness mark"]
    cfg = write_config(tmp_path / "t.yaml", {"model": "spotnet", "train": ["n"], "val": ["n"], "epochs": 1})
    one_line_error(run_cli("train", "--config", cfg, "--data", path.parent, "--out", tmp_path / "run"), says, code=None)
    assert not (tmp_path / "run" / "best.pt").exists()


def test_verify_on_an_unfinished_single_process_store_says_rebuild_not_finalize(unfinished):
    path, _ = unfinished["store without its completeness mark"]
    r = run_cli("verify", path)
    assert r.returncode != 0 and "factory build" in r.stderr and "finalize" not in r.stderr, r.stderr


# --- inspect on the documented SLURM result and on a corrupt store ---------------------------


def test_inspect_reads_a_finalized_sharded_hdf5_store(tmp_path):
    cfg, out = sharded_half(tmp_path, "hdf5")
    assert run_cli("build", cfg, "--out", out, "--shard", "1/2", "-q").returncode == 0
    assert run_cli("finalize", cfg, "--out", out, "-q").returncode == 0
    r = run_cli("inspect", out / "h.h5")
    assert r.returncode == 0, r.stderr
    assert "virtual" in r.stdout
    r = run_cli("inspect", out / "h.h5", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert (info[0] if isinstance(info, list) else info)["n_images"] == 256


def damage(kind, clean_root, tmp_path):
    """A copy of the clean store, damaged as a disk or a transfer would."""
    if kind == "truncated hdf5":
        data = (clean_root / "hdf5" / "k.h5").read_bytes()
        bad = tmp_path / "bad.h5"
        bad.write_bytes(data[:len(data) // 2])
        return bad
    bad = tmp_path / "bad.zarr"
    shutil.copytree(clean_root / "zarr" / "k.zarr", bad)
    if kind == "zarr chunk":
        victim = sorted(p for p in (bad / "images" / "c").rglob("*") if p.is_file())[-1]
    else:
        victim = bad / "images" / "zarr.json"
    victim.write_bytes(os.urandom(100))
    return bad


@pytest.mark.parametrize("kind", ["truncated hdf5", "zarr chunk", "zarr metadata"])
def test_inspect_on_a_corrupt_store_is_one_line(tmp_path, clean, kind):
    bad = damage(kind, clean[0], tmp_path)
    # A process: what Zarr's unfinished reads print when the interpreter exits is under test.
    one_line_error(run_cli_process("inspect", bad), bad.name, "damaged", code=None)


LEFTOVERS = """
import types
from cli.main import _quiet_zarr_leftovers

_quiet_zarr_leftovers()


@types.coroutine
def pause():
    yield


SRC = "async def run(pause):\\n    try:\\n        await pause()\\n    finally:\\n        raise RuntimeError('closed mid-read')\\n"
for path in ("/site-packages/zarr/core/common.py", "/elsewhere/mine.py"):
    ns = {}
    exec(compile(SRC, path, "exec"), ns)
    started = ns["run"](pause)
    started.send(None)
    del started  # closed mid-read: its finally raises, reported by the unraisable hook
    never = ns["run"](pause)
    del never  # never started: a RuntimeWarning
"""


def test_only_zarrs_reads_left_behind_are_silenced():
    """What a damaged Zarr store's aborted read leaves at exit is dropped (the race that
    made the one-line test above flaky is reproduced here by hand); a coroutine of any
    other code closed mid-way is still reported."""
    r = subprocess.run([sys.executable, "-c", LEFTOVERS], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("Exception ignored in") == 1 and "mine.py" in r.stderr, r.stderr
    assert "common.py" not in r.stderr and "never awaited" not in r.stderr, r.stderr
