"""`make bench`: speed and memory, each measured beside a reference in the same run.

Every section prints medians over repeats and the ratio to its reference.  Run one
section with ``python benchmarks/run.py --only kernel``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SECTIONS = {}


def section(name):
    def deco(fn):
        SECTIONS[name] = fn
        return fn

    return deco


def median_time(fn, repeats=5):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_rss_of(cmd: list[str], env=None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of a child process (measured by a fresh wrapper)."""
    wrapper = (
        "import resource, subprocess, sys, time, json;"
        "t = time.perf_counter(); r = subprocess.run(sys.argv[1:]);"
        "dt = time.perf_counter() - t;"
        "print(json.dumps([dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, r.returncode]))"
    )
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    dt, rss, rc = json.loads(out.stdout.strip().splitlines()[-1])
    if rc != 0:
        raise RuntimeError(f"{cmd} failed: {out.stderr[-2000:]}")
    return dt, rss


@section("kernel")
def bench_kernel(args):
    """Kernel images/s at the paper's settings vs the plain NumPy implementation."""
    from factory.config import load_config
    from factory.kernel import simulate
    from factory.reference import simulate_numpy

    cfg = load_config(ROOT / "datasets.yaml")
    ds = cfg.datasets["val"]
    simulate(ds, cfg.seed, 0, 64)  # JIT (or cache load) outside the timing
    n_k = 3000
    t_k = median_time(lambda: simulate(ds, cfg.seed, 0, n_k))
    rng = np.random.default_rng(0)
    n_np = 200
    t_np = median_time(lambda: simulate_numpy(ds, n_np, rng), repeats=3)
    rate_k, rate_np = n_k / t_k, n_np / t_np
    print(f"kernel (numba, {os.environ.get('NUMBA_NUM_THREADS', 'all')} threads): {rate_k:10.0f} images/s")
    print(f"numpy reference:                 {rate_np:10.0f} images/s")
    print(f"ratio kernel / numpy:            {rate_k / rate_np:10.1f} x")
    return {"kernel_images_s": rate_k, "numpy_images_s": rate_np, "ratio": rate_k / rate_np}


@section("build")
def bench_build(args):
    """End-to-end build of the whole datasets.yaml (HDF5 gzip, the default; HDF5
    blosc-lz4; Zarr): seconds, MB on disk, peak RSS; and the share of time storage adds
    to the kernel's."""
    import yaml

    from factory.build import build, disk_usage, simulate_range
    from factory.config import load_config, parse_config

    cfg = load_config(ROOT / "datasets.yaml")
    results = {}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        raw = yaml.safe_load((ROOT / "datasets.yaml").read_text())
        raw.setdefault("defaults", {}).setdefault("output", {})["compression"] = "blosc-lz4"
        blosc_yaml = Path(tmp) / "datasets-blosc.yaml"
        blosc_yaml.write_text(yaml.safe_dump(raw))
        blosc_cfg = parse_config(raw, str(blosc_yaml))
        for label, config, fmt in (("hdf5 gzip", ROOT / "datasets.yaml", "hdf5"),
                                   ("hdf5 blosc-lz4", blosc_yaml, "hdf5"), ("zarr", ROOT / "datasets.yaml", "zarr")):
            out = Path(tmp) / label.replace(" ", "-")
            cmd = [sys.executable, "-m", "cli", "build", str(config),
                   "--out", str(out), "--format", fmt, "--overwrite", "-q"]
            peak_rss_of(cmd)  # warm the JIT cache and the page cache
            runs = [peak_rss_of(cmd) for _ in range(3)]
            secs = statistics.median(r[0] for r in runs)
            rss = max(r[1] for r in runs)
            mb = disk_usage(out) / 1e6
            print(f"build datasets.yaml ({label}): {secs:6.2f} s wall (process start included), "
                  f"{mb:7.1f} MB on disk, peak RSS {rss:6.0f} MB")
            results[label] = {"seconds": secs, "mb": mb, "peak_rss_mb": rss}
        ratio = results["hdf5 gzip"]["seconds"] / results["hdf5 blosc-lz4"]["seconds"]
        print(f"HDF5 gzip (default, any reader) / blosc-lz4 build time: {ratio:.2f}x (goal <= 1.5x)")
        results["gzip_over_blosc"] = ratio

        # Kernel alone vs kernel + storage, in this process, over the whole suite.
        def kernel_only():
            for ds in cfg.datasets.values():
                simulate_range(cfg, ds, 0, ds.n_images, lambda i0, a: None)

        kernel_only()
        t_kernel = median_time(kernel_only, repeats=3)
        movies = [n for n, d in cfg.datasets.items() if d.movie is not None]
        if movies:
            t_movies = median_time(lambda: [simulate_range(cfg, cfg.datasets[n], 0, cfg.datasets[n].n_images,
                                                           lambda i0, a: None) for n in movies], repeats=3)
            frames = sum(cfg.datasets[n].n_images for n in movies)
            print(f"movie sets ({', '.join(movies)}: {frames} frames): kernel {t_movies:.2f} s of the suite's "
                  f"{t_kernel:.2f} s ({100 * t_movies / t_kernel:.0f}%)")
            results["movie_share_of_kernel"] = t_movies / t_kernel
        for label, c, fmt in (("hdf5 gzip", cfg, "hdf5"), ("hdf5 blosc-lz4", blosc_cfg, "hdf5"), ("zarr", cfg, "zarr")):
            out = Path(tmp) / f"inproc-{label.replace(' ', '-')}"
            t_build = median_time(lambda: build(c, out, fmt, overwrite=True, progress=False), repeats=3)
            extra = t_build / t_kernel - 1
            print(f"suite in-process ({label}): kernel {t_kernel:.2f} s, build {t_build:.2f} s, "
                  f"storage adds {100 * extra:.0f}% (goal <= 30%)")
            results[label]["storage_overhead"] = extra
    return results


@section("loader")
def bench_loader(args):
    """Loader samples/s from HDF5 and Zarr (batch 256, 0 and 2 workers) vs in-memory tensors."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from factory.build import build
    from factory.config import load_config
    from factory.stores import Store
    from loaders.datasets import StoreBatches

    cfg = load_config(ROOT / "datasets.yaml")
    results = {}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for fmt in ("hdf5", "zarr"):
            build(cfg, Path(tmp), fmt, only=["train"], progress=False)
        path = {"hdf5": Path(tmp) / "train.h5", "zarr": Path(tmp) / "train.zarr"}
        with Store(path["hdf5"]) as st:
            images = torch.from_numpy(st.read("images").astype(np.float32))[:, None]
            centroids = torch.from_numpy(st.read("centroids"))
        n = len(images)

        def rate(loader, repeats=3):
            """Median samples/s over epochs of one loader (workers persist across epochs)."""
            def one_epoch():
                count = 0
                for batch in loader:
                    count += len(batch[0])
                assert count == n
            one_epoch()
            return n / median_time(one_epoch, repeats)

        class Raw:
            def __iter__(self):
                perm = torch.randperm(n)
                return ((images[perm[i:i + 256]], centroids[perm[i:i + 256]]) for i in range(0, n, 256))

        mem = rate(DataLoader(TensorDataset(images, centroids), batch_size=256, shuffle=True))
        raw = rate(Raw())
        print(f"in-memory DataLoader(TensorDataset), batch 256, shuffled: {mem:10.0f} samples/s  (reference)")
        print(f"in-memory tensor indexing, batch 256 (no DataLoader):     {raw:10.0f} samples/s")
        results["memory_dataloader"], results["memory_indexing"] = mem, raw
        for fmt in ("hdf5", "zarr"):
            for workers in (0, 2):
                ds = StoreBatches(path[fmt], batch_size=256)
                r = rate(DataLoader(ds, batch_size=None, shuffle=True, num_workers=workers,
                                    persistent_workers=workers > 0))
                print(f"{fmt:<5} StoreBatches, batch 256, {workers} workers:               {r:10.0f} samples/s  "
                      f"({r / mem:.2f}x the in-memory DataLoader, {r / raw:.2f}x raw indexing)")
                results[f"{fmt}_{workers}"] = r
    return results


@section("shards")
def bench_shards(args):
    """Sharded build throughput with 1 and 2 local processes; projection for 10M images."""
    import yaml

    n = 60000
    cfg_text = {"seed": 1, "datasets": {"big": {"n_images": n}}}
    results = {}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        cfg = Path(tmp) / "big.yaml"
        cfg.write_text(yaml.safe_dump(cfg_text))

        def run(procs: int, threads: int) -> float:
            out = Path(tmp) / f"o{procs}"
            cmds = [[sys.executable, "-m", "cli", "build", str(cfg), "--out", str(out),
                     "--shard", f"{i}/{procs}", "--overwrite", "-q"] for i in range(procs)]
            env = {**os.environ, "NUMBA_NUM_THREADS": str(threads)}
            t0 = time.perf_counter()
            ps = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL) for c in cmds]
            assert all(p.wait() == 0 for p in ps)
            return time.perf_counter() - t0

        run(1, 1)  # warm the JIT cache
        one = statistics.median(run(1, 1) for _ in range(3))
        two = statistics.median(run(2, 1) for _ in range(3))
        print(f"1 process  x 1 thread : {n / one:8.0f} images/s ({one:.2f} s for {n}, process start included)")
        print(f"2 processes x 1 thread: {n / two:8.0f} images/s ({two:.2f} s), speed-up {one / two:.2f}x")
        per_core = n / one
        tasks, total, cores = 100, 10_000_000, 4
        secs = total / tasks / (per_core * cores * 0.9)
        print(f"projection: 10M images (trajectories included, ~{total * 7465 / 1e6 / 1e3:.0f} GB) on a "
              f"{tasks}-task array with {cores} cores per task at 90% scaling: about {secs:.0f} s per task "
              f"plus start-up and JIT (~10 s)")
        results = {"one_process_images_s": n / one, "two_processes_images_s": n / two,
                   "projection_10M_100_tasks_s": secs}
    return results


@section("predict")
def bench_predict(args):
    """Prediction throughput on the CPU: the default model vs the TrackPy baseline."""
    from factory.config import load_config
    from factory.kernel import simulate
    from factory.perf import tune_malloc
    from models.training.config import load_train_config
    from models.detectors.registry import NetDetector, family
    from models.training.runs import load_model
    from models.detectors.trackpy import TrackPyDetector

    tune_malloc()
    cfg = load_config(ROOT / "datasets.yaml")
    images = simulate(cfg.datasets["test_d075"], cfg.seed, 0, 1000)["images"]
    fam = family("spotnet")
    if args.model and (Path(args.model) / "best.pt").exists():
        trained = load_model(args.model)
        fam, model, label = trained.family, trained.model, f"trained model {args.model}"
    else:
        # Speed hardly depends on the weights; an untrained net finds more (spurious)
        # peaks to decode, so this errs on the slow side.
        demo = load_train_config(ROOT / "configs" / "spotnet_demo.yaml", None)
        model, label = fam.build(demo.params()), "untrained SpotNet, demo recipe (no runs/demo/model yet)"
    print(f"1000 images 24 x 25; {label}")
    results = {}
    tp = TrackPyDetector()
    tp.detect(images[:20])
    t_tp = median_time(lambda: tp.detect(images), repeats=3)
    print(f"TrackPy (locate, diameter 7):         {len(images) / t_tp:8.0f} images/s  (reference)")
    results["trackpy"] = len(images) / t_tp
    as_trained = getattr(model, "flip_tta", False)
    for label, tta in (("SpotNet, no flip averaging", False), ("SpotNet, flip averaging (4 passes)", True)):
        model.flip_tta = tta
        det = NetDetector(fam, model)
        det.detect(images[:64])
        t = median_time(lambda: det.detect(images), repeats=3)
        r = len(images) / t
        print(f"{label:<37} {r:8.0f} images/s  ({r * t_tp / len(images):.2f}x TrackPy; goal 10x)")
        results[label] = r
    model.flip_tta = as_trained
    return results


@section("track")
def bench_track(args):
    """`factory track` frames/s on real-size fields: the default model vs the TrackPy user pipeline."""
    from factory.config import parse_config
    from factory.kernel import simulate
    from factory.perf import tune_malloc
    from loaders.datasets import truth_points
    from models.training.config import load_train_config
    from models.evaluation.metrics import Points
    from models.recordings.predict import load_detector
    from models.detectors.registry import NetDetector, family
    from models.tracking.timing import ScanTiming
    from models.detectors.trackpy import run_user_pipeline, user_search_range_px
    from models.evaluation.tuning import tune_user_pipeline
    from models.tracking.tracks import track_recording

    tune_malloc()
    model_dir = None
    if args.model and (Path(args.model) / "best.pt").exists():  # what the laser saw: the exposure head
        # As `factory track` runs it (int8 where it can), and in float32 beside it.
        net, label = load_detector(args.model, prefer="exposure", precision="auto"), f"trained model {args.model}"
        net32 = load_detector(args.model, prefer="exposure") if net.precision != "float32" else None
        model_dir = Path(args.model)
    else:
        demo = load_train_config(ROOT / "configs" / "spotnet_default.yaml", None)
        net = NetDetector(family("spotnet"), family("spotnet").build(demo.params()), threshold=0.5,
                          target="exposure", head=1)
        net32 = None
        label = "untrained SpotNet, default recipe (no runs/demo/model yet)"
    timing, px, d_max = ScanTiming(), 0.07, 0.5
    results = {}
    # Fields as users record them (fields.yaml's laws): Poisson particles at 40 per
    # 256 x 256 px, D log-uniform over 0.02 - 0.5 um^2/s, brightness +-30 %.
    for size, frames_n, mean in ((256, 100, 40), (512, 40, 160)):
        def movie(seed, size=size, frames_n=frames_n, mean=mean):
            cfg = parse_config({"seed": seed, "datasets": {"m": {
                "n_movies": 1, "movie": {"n_frames": frames_n, "margin_um": 1.0},
                "image": {"height_px": size, "width_px": size},
                "particles": {"count": {"type": "poisson", "mean": mean, "max": 3 * mean},
                              "diffusion_um2_s": {"type": "log_uniform", "low": 0.02, "high": d_max},
                              "n_qd": {"type": "uniform", "low": 7.0, "high": 13.0}, "xy_start": {"type": "uniform"},
                              "z_start_um": {"type": "uniform", "low": -1.0, "high": 1.0}},
                "output": {"expected": False, "trajectories": False}}}})
            return simulate(cfg.datasets["m"], cfg.seed)

        tune, rows = movie(2), movie(1)
        images = rows["images"]  # uint16, as a recording holds them
        period = timing.frame_period_s(size, size)
        gt = truth_points(tune["exposure_xy"], tune["n_particles"], tune["in_view"], True, size, size)
        pipe = tune_user_pipeline(tune["images"], Points.from_masked(gt * px), px, 0.21,
                                  user_search_range_px(d_max, period, px))
        print(f"{frames_n} frames of {size} x {size} px, about {mean * 0.8:.0f} particles in view; {label}; "
              f"TrackPy user pipeline {pipe.model_dump()}")
        runs = {"TrackPy user pipeline": lambda: run_user_pipeline(images, pipe, px, period),
                f"factory track (SpotNet, {net.precision})": lambda: track_recording(net, images, timing, px, d_max)}
        if net32 is not None:
            runs["same, float32"] = lambda: track_recording(net32, images, timing, px, d_max)
        for run in runs.values():
            run()  # warm: compiled functions, caches
        # Rounds of one run each, in turn: a slow spell of this shared machine (it slows a
        # 2-thread run more than TrackPy's 1 thread) then falls on one round of all of them,
        # and the ratio is the median of each round's own.
        rates = {name: [] for name in runs}
        for k in range(5):  # the order reversed every other round: no method always runs first
            for name in (list(runs) if k % 2 == 0 else list(runs)[::-1]):
                rates[name].append(len(images) / median_time(runs[name], repeats=1))
        ref = rates["TrackPy user pipeline"]
        here = {}
        for name, r in rates.items():
            per_round = [a / b for a, b in zip(r, ref)]
            here[name] = statistics.median(r)
            here[f"{name}, ratio of rounds"] = statistics.median(per_round)
            print(f"  {name:<28} {here[name]:8.2f} frames/s  ({here[name] / statistics.median(ref):.2f}x the TrackPy "
                  f"user pipeline; per round: median {statistics.median(per_round):.2f}x, "
                  f"{min(per_round):.2f}-{max(per_round):.2f}x)")
        results[f"{size}px"] = here
        if size == 256 and model_dir is not None:
            results["command"] = track_command(model_dir, images, d_max, args)
    return results


def track_command(model_dir: Path, images: np.ndarray, d_max: float, args) -> dict:
    """`factory track` and `factory predict` as a user runs them: the start-up on a 2-frame
    TIFF, and the whole movie's wall time and peak RSS, each in a fresh process (the
    exposure head and the D range of the in-process rows)."""
    import tifffile

    script = Path(sys.executable).parent / "factory"  # the console script users call
    factory = [str(script)] if script.exists() else [sys.executable, "-m", "cli.main"]
    flags = ["--pixel-size-um", "0.07", "--dwell-us", "2", "--line-retrace-ms", "1.1"]
    # The floor under any start-up: PyTorch's own import, in a fresh process on this machine
    # now, ended as `factory` ends (cli.main._leave: without the interpreter's teardown).
    floor = "import os, torch; os._exit(0)"
    torch_s = statistics.median(peak_rss_of([sys.executable, "-c", floor])[0] for _ in range(3))
    print(f"  python -c '{floor}' {torch_s:6.2f} s wall (median of 3)")
    out = {"import torch": {"wall_s": torch_s}}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        tifffile.imwrite(tmp / "two.tif", images[:2], photometric="minisblack")
        tifffile.imwrite(tmp / "movie.tif", images, photometric="minisblack")
        track = ["--max-diffusion-um2-s", str(d_max)]
        for name, cmd in (("track, 2 frames", ["track", str(model_dir), str(tmp / "two.tif"), "--out", str(tmp / "t2")]
                           + track),
                          ("predict, 2 frames", ["predict", str(model_dir), str(tmp / "two.tif"), "--out",
                                                 str(tmp / "p2.csv"), "--target", "exposure"]),
                          (f"track, {len(images)} frames", ["track", str(model_dir), str(tmp / "movie.tif"), "--out",
                                                            str(tmp / "tm")] + track)):
            runs = []
            for _ in range(3):
                runs.append(peak_rss_of(factory + cmd + flags + ["--overwrite", "--quiet"]))
            wall = statistics.median(r[0] for r in runs)
            rss = max(r[1] for r in runs)
            print(f"  factory {name:<20} {wall:6.2f} s wall (a fresh process, median of 3), peak RSS {rss:.0f} MB")
            out[name] = {"wall_s": wall, "peak_rss_mb": rss}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", action="append", choices=list(SECTIONS), help="run only this section")
    ap.add_argument("--tmp", default=None, help="scratch folder (default: system temp)")
    ap.add_argument("--json", type=Path, help="also write the numbers as JSON")
    ap.add_argument("--model", default=str(ROOT / "runs" / "demo" / "model"),
                    help="run folder of the model timed by the predict and track sections (default: the demo's)")
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} cores; numba threads: {__import__('numba').get_num_threads()}")
    results = {}
    for name in args.only or list(SECTIONS):
        print(f"\n== {name}: {SECTIONS[name].__doc__.splitlines()[0]}")
        results[name] = SECTIONS[name](args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
