"""D per movie against an independent simulator: `python benchmarks/diffusion_check.py`.

Single-particle movies are simulated by the plain NumPy engine (``factory.reference``,
written from the physics apart from the Numba kernel), at the acceptance's two cases:
D = 0.05 um^2/s on 32 x 32 px over 30 frames and D = 0.2 on 48 x 48 px over 20 frames
(reflecting walls at the field's edge: the particle stays in view).  The relative RMSE
of D per movie is compared with the CVE on the true centroids (the floor).  Two
pipelines per detector: linked as `factory track` does on a store of these movies
(threshold, linking as TrackPy's criterion, cut at improbable steps, the pooled estimator, the movie's
longest track), and per frame (each frame's best-scored localisation, no linking, the
CVE).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MEMORY = 1  # as factory track by default
CASES = [  # D um^2/s, frame px, frames
    (0.05, 32, 30),
    (0.2, 48, 20),
]


def movies(D: float, size: int, frames: int, n: int, seed: int):
    from factory.config import parse_config
    from factory.reference import simulate_numpy

    cfg = parse_config({"seed": seed, "datasets": {"m": {
        "n_movies": n, "movie": {"n_frames": frames, "margin_um": 0.0},
        "image": {"height_px": size, "width_px": size},
        "particles": {"diffusion_um2_s": D, "xy_start": {"type": "uniform"}},
        "output": {"trajectories": False}}}})
    ds = cfg.datasets["m"]
    return ds, simulate_numpy(ds, ds.n_images, np.random.default_rng(seed))


def per_frame_d(table, t_fn, frames: int, n: int, px: float, r: float) -> np.ndarray:
    """Locate + CVE without linking: each frame's best-scored localisation."""
    from models.tracking.diffusion import cve

    best = table.sort_values("score").groupby("frame").tail(1).sort_values("frame")
    out = np.full(n, np.nan)
    for m in range(n):
        b = best[(best.frame >= m * frames) & (best.frame < (m + 1) * frames)]
        if len(b) >= 5:
            out[m] = cve(t_fn(b), b[["x", "y"]].to_numpy() * px, r).D_um2_s
    return out


def per_movie_d(table, t_fn, frames: int, n: int, px: float, r: float, search: float,
                threshold: float | None) -> np.ndarray:
    """The pipeline of `factory track` on a store of these movies: localisations above
    the detector's threshold, linked (models.tracking.linking, memory 1), cut at improbable steps,
    D by the pooled estimator (one localisation variance over all movies); each movie's
    longest track's D."""
    from models.tracking.tracks import diffusion_table, link, split_improbable_steps

    if threshold is not None:
        table = table[table.score >= threshold]
    table = table.assign(movie=table.frame // frames, t_s=t_fn(table))
    linked = split_improbable_steps(link(table, search, memory=MEMORY, group="movie"))
    d = diffusion_table(linked, px, r).set_index(["movie", "track"])["D_um2_s"]
    out = np.full(n, np.nan)
    for m, g in linked.groupby("movie"):
        longest = g.track.value_counts().idxmax()
        if (m, longest) in d.index:
            out[m] = d[(m, longest)]
    return out


def rel_rmse(d_hat, D):
    ok = np.isfinite(d_hat)
    return float(np.sqrt(np.mean(((d_hat[ok] - D) / D) ** 2))), int(ok.sum())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=None,
                    help="run folder(s) to check, every head of each (default: runs/demo/model and runs/movies/movie-model if present)")
    ap.add_argument("--movies", type=int, default=200, help="movies per case")
    ap.add_argument("--trackpy", action="append", help="also a TrackPy parameter file (trackpy.json of an evaluation)")
    args = ap.parse_args()

    from factory.perf import tune_malloc
    from models.tracking.diffusion import cve
    from models.recordings.predict import load_detector
    from models.tracking.timing import ScanTiming, time_stamps
    from models.tracking.tracks import blur_r, search_range_px

    tune_malloc()
    from models.training.runs import RunFolder, load_model

    models = args.model or [str(p) for p in (ROOT / "runs/demo/model", ROOT / "runs/movies/movie-model")
                            if (p / "best.pt").exists()]
    detectors = {}
    for m in models:  # every head of a network with a head per target
        targets = RunFolder(m).read_config().targets
        for t in targets:
            detectors[m if len(targets) == 1 else f"{m} ({t} head)"] = load_model(m, target=t)
    detectors["trackpy (paper settings)"] = load_detector("trackpy")
    from models.detectors.trackpy import TrackPyDetector

    detectors["trackpy (diameter 7, band-pass)"] = TrackPyDetector()
    for p in args.trackpy or []:
        detectors[f"trackpy ({p})"] = load_detector(p)
    timing = ScanTiming()
    print(f"{'case':<28} {'pipeline':<40} {'rel. RMSE of D: linked':>22} {'x floor':>8} "
          f"{'per frame':>10} {'x floor':>8} {'movies':>7}")
    results = {}
    for D, size, frames in CASES:
        ds, sim = movies(D, size, frames, args.movies, seed=int(D * 1000) + size)
        px = ds.image.pixel_size_um
        n = args.movies
        period = timing.frame_period_s(size, size)
        case = f"D={D} {size}x{size}px {frames} fr"
        # Floors: the estimator on the true positions (frame-mean time for centroids).
        floors = {}
        for name, xy, t in (("true centroids", sim["centroids"][:, 0], sim["frame_start_s"] + timing.schedule(size, size).start_s.mean()),
                            ("true exposure positions", sim["exposure_xy"][:, 0], sim["exposure_t_s"][:, 0])):
            r = blur_r("frame" if name == "true centroids" else "scan", period, timing.line_period_s(size),
                       timing.active_s(size, size), 0.21, px)
            d_hat = np.array([cve(t[m * frames:(m + 1) * frames], xy[m * frames:(m + 1) * frames] * px, r).D_um2_s
                              for m in range(n)])
            floors[name] = rel_rmse(d_hat, D)[0]
            print(f"{case:<28} {name + ' (floor)':<40} {floors[name]:22.3f} {'':>8} {'':>10} {'':>8} {n:7d}")
        floor = floors["true centroids"]
        for label, det in detectors.items():
            table = det.detect(sim["images"].astype(np.float32))
            stamps = det.timestamps

            def t_fn(b, stamps=stamps):
                return time_stamps(b, size, size, timing, stamps, sim["frame_start_s"])

            r = blur_r(stamps, period, timing.line_period_s(size), timing.active_s(size, size), 0.21, px)
            search = search_range_px(D, period, px)
            rmse, k = rel_rmse(per_movie_d(table, t_fn, frames, n, px, r, search, det.threshold), D)
            rmse1, _ = rel_rmse(per_frame_d(table, t_fn, frames, n, px, r), D)
            results[(case, label)] = (rmse, rmse1)
            name = Path(label).parent.name + "/" + Path(label).name if "/" in label else label
            print(f"{case:<28} {name:<40} {rmse:22.3f} {rmse / floor:8.2f} {rmse1:10.3f} {rmse1 / floor:8.2f} {k:7d}")
    return results


if __name__ == "__main__":
    main()
