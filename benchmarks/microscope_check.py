"""Does training for your microscope pay?  Held-out recordings of the example microscope
of `make microscope` (benchmarks/calibration_check.py, EXAMPLE), tracked three ways and
scored per particle (models.evaluation.fields):

- the SpotNet trained from the calibrated config (`make microscope` leaves it in RUN/model),
- the demo's default model, trained on the paper's microscope (`make demo`: runs/demo/model),
  run as `factory track` runs it with the recording's scan flags,
- the TrackPy user pipeline (band-pass, minmass and diameter tuned for F1 on one more
  recording of the microscope with its truth, link, filter_stubs, imsd line fit), and its
  tracks through our estimator.

    python benchmarks/microscope_check.py [--run runs/microscope] [--default-model runs/demo/model]
                                          [--recordings 3] [--seed 0]

Prints a table per recording and pooled: particles scored, share with a matched track,
share with D within 1.5x, median |log10(D_est / D_true)|, and the floor (the estimator
on the true centroids).  Written to RUN/microscope_check.md too.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from calibration_check import EXAMPLE, record  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/microscope"))
    ap.add_argument("--default-model", type=Path, default=Path("runs/demo/model"))
    ap.add_argument("--recordings", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import tifffile

    from factory.config import DatasetSpec
    from models.evaluation.fields import MovieTruth, score_particles, summarise
    from models.evaluation.metrics import Points
    from models.recordings.predict import load_detector, training_datasets
    from models.tracking.timing import ScanTiming, time_stamps
    from models.detectors.trackpy import run_user_pipeline, user_search_range_px
    from models.evaluation.tuning import tune_user_pipeline
    from models.tracking.tracks import blur_r, diffusion_table, max_diffusion, min_diffusion, track_recording

    m = EXAMPLE
    px = m["pixel_size_um"]
    timing = ScanTiming(m["dwell_us"], m["line_retrace_ms"], None, False, "the example microscope")
    folder = args.run / "heldout"
    folder.mkdir(parents=True, exist_ok=True)
    h = w = 256
    period = timing.frame_period_s(h, w)
    r_frame = blur_r("frame", period, timing.line_period_s(w), timing.active_s(h, w), m["sigma_xy"], px)

    def movie(name: str, seed: int):
        rec, _ = record(m, folder, seed, name=name, dark=False)
        rows = dict(np.load(folder / f"{name}.truth.npz"))
        t_c = timing.centroid_t_s(rows["frame_start_s"], h, w, rows["diffusion"].shape[1])
        return tifffile.imread(rec), rows, MovieTruth.of_rows(rows, 0, len(rows["n_particles"]), t_c)

    # TrackPy as a user sets it up: tuned for F1 against what the laser saw, on a
    # recording of its own; the radius for the fastest particles of the example (0.5 um^2/s).
    frames, rows, truth = movie("tune", args.seed + 999)
    gt = Points.from_masked(truth.exposure_xy * px)
    pipe = tune_user_pipeline(frames, gt, px, m["sigma_xy"], user_search_range_px(0.5, period, px))
    print(f"TrackPy user pipeline: {pipe.model_dump()}")

    pipelines = {}
    for label, path in (("SpotNet trained for this microscope (make microscope)", args.run / "model"),
                        ("the demo's default model (paper's microscope)", args.default_model)):
        if not path.exists():
            print(f"{path}: missing, left out")
            continue
        det = load_detector(path, "cpu", prefer="exposure")
        specs = training_datasets(path)[0] or [DatasetSpec()]  # without its stores: the schema's defaults
        d_max, sigma = max(max_diffusion(d) for d in specs), specs[0].psf.sigma_xy_um
        d_min = min(min_diffusion(d) for d in specs)

        def ours(frames, det=det, d_min=d_min, d_max=d_max, sigma=sigma):  # as `factory track` by default
            tracks, d, _ = track_recording(det, frames, timing, px, d_max, sigma_xy_um=sigma, min_diffusion_um2_s=d_min)
            return tracks, d
        pipelines[label] = ours

    r_scan = blur_r("scan", period, timing.line_period_s(w), timing.active_s(h, w), m["sigma_xy"], px)

    def trackpy_user(frames):
        """Run once; its tracks with the imsd fit's D and with our estimator's."""
        tracks, d_msd = run_user_pipeline(frames, pipe, px, period)
        d_ours = diffusion_table(tracks.assign(t_s=time_stamps(tracks, h, w, timing, "scan")), px, r_scan)
        return tracks, {"TrackPy user pipeline (imsd fit)": d_msd,
                        "TrackPy user pipeline, its tracks through our estimator": d_ours}
    pipelines["TrackPy user pipeline"] = trackpy_user

    per = {}
    lines = []
    for k in range(args.recordings):
        frames, rows, truth = movie(f"heldout{k}", args.seed + 1000 + k)
        for name, run in pipelines.items():
            t0 = time.perf_counter()
            tracks, d = run(frames)
            secs = time.perf_counter() - t0
            for label, d_table in (d.items() if isinstance(d, dict) else [(name, d)]):
                s = score_particles(tracks, d_table, truth, px, r_frame).assign(recording=k)
                per.setdefault(label, []).append(s)
                sm = summarise(s)
                lines.append(f"| {k} | {label} | {sm['particles']} | {sm['matched']:.2f} | {sm['d_within']:.2f} | "
                             f"{sm['median_abs_log10']:.3f} | {sm['floor_d_within']:.2f} | {secs:.1f} |")
                print(lines[-1], flush=True)
    for label in per:
        sm = summarise(pd.concat(per[label], ignore_index=True))
        lines.append(f"| all | {label} | {sm['particles']} | {sm['matched']:.2f} | **{sm['d_within']:.2f}** | "
                     f"{sm['median_abs_log10']:.3f} | {sm['floor_d_within']:.2f} | |")
    head = ["| recording | pipeline | particles | matched track | D within 1.5x | median abs log10 D error | "
            "floor: D within 1.5x | s |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    text = "\n".join(head + lines) + "\n"
    print(text)
    (args.run / "microscope_check.md").write_text(
        f"# Held-out recordings of the example microscope ({args.recordings}, seeds from {args.seed + 1000})\n\n"
        f"TrackPy user pipeline: {pipe.model_dump()}\n\n" + text)


if __name__ == "__main__":
    main()
