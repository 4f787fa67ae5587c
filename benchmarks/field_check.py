"""Real-size fields (fields.yaml): what share of the particles each pipeline tracks and
gets D right for, linkers compared on the same localisations.

    python benchmarks/field_check.py [--data data/fields] [--model runs/demo/model]
                                     [--stores field_val test_field test_field_still]
                                     [--movies N] [--out tables.md] [--plot field.png]

For each store and movie: the model's localisations (its exposure head, above its
threshold, once), linked by each linker below, D by our estimator per track (the pooled
one, models.tracking.diffusion) and by the CVE alone; the TrackPy user pipeline
(minmass and diameter tuned on field_val's first movie, SPEC "A baseline as users run
it") with its imsd line fit and its tracks through our estimator.  Scored per particle
(models.evaluation.fields): matched track, D within 1.5x, median |log10 D error|, the
floors (the CVE on the true centroids, and the pooled estimator on them); and correct
links.  Prints one markdown table per store, and the linker with the most D within 1.5x
on the first (of equals, the smallest median error).  Where a store keeps trajectories
(the test sets), a second table splits its particles by depth (the median, over the
frames of the particle's scored run, of the distance of its mean z in the frame from the
focal plane), with the share of their frames in which the model localised them: in
view is a matter of x and y only, so a particle that wandered microns out of focus is
scored, and the floor reads its true centroids where the microscope shows next to
nothing.  ``--plot`` draws the first movie of
the last store (``models.evaluation.fields.plot_field``): the tracks of `factory
track`'s default linker (adaptive, cut at improbable steps), and D per particle for it,
the TrackPy user pipeline and the floor.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("data/fields"))
    ap.add_argument("--model", type=Path, default=Path("runs/demo/model"))
    ap.add_argument("--stores", nargs="+", default=["field_val", "test_field", "test_field_still"])
    ap.add_argument("--movies", type=int, help="score only the first N movies of each store")
    # models.training.runs.PRECISIONS (not imported here: it brings torch in before --help)
    ap.add_argument("--precision", default="auto", choices=["auto", "float32", "int8"],
                    help="the model's inference arithmetic (default: as `factory track`, int8 where it can run)")
    ap.add_argument("--out", type=Path, help="write the tables here too (markdown)")
    ap.add_argument("--plot", type=Path, help="draw the first movie of the last store: the tracks of `factory track`'s "
                    "default linker, and D per particle for it, the TrackPy user pipeline and the floor")
    args = ap.parse_args()
    if args.movies is not None and args.movies < 1:
        ap.error(f"--movies {args.movies}: give 1 or more")
    for path in (args.out, args.plot):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    from factory.stores import Store, find_store
    from loaders.datasets import truth_points
    from models.evaluation.fields import MovieTruth, detected_share, plot_field, score_particles, scored_runs, summarise
    from models.evaluation.metrics import Points
    from models.recordings.predict import load_detector, localise
    from models.tracking.timing import ScanTiming, time_stamps
    from models.detectors.trackpy import run_user_pipeline, user_search_range_px
    from models.evaluation.tuning import tune_user_pipeline
    from models.tracking.tracks import (blur_r, diffusion_table, link, max_diffusion, min_diffusion, own_radius_px,
                                        score_tracks, search_range_px, split_improbable_steps, stitch)

    det = load_detector(args.model, "cpu", prefer="exposure", precision=args.precision)
    print(f"{args.model}, exposure head, {det.precision}")

    def movies(name):
        with Store(find_store(args.data, name)) as st:
            ds = st.dataset
            F = ds.movie.n_frames
            keys = ["centroids", "exposure_xy", "in_view", "n_particles", "diffusion", "exposure_t_s", "frame_start_s"]
            rows = {k: st.read(k) for k in keys + (["on_fraction"] if "on_fraction" in st else [])}
            # Each particle's depth per frame (um from the focal plane): the mean over the
            # stored trajectory samples of the frame.
            depth = (np.abs(st.read("trajectories")[..., 2].mean(-1) - ds.psf.focal_z_um)
                     if "trajectories" in st else None)
            images = st.read("images")
        h, w = images.shape[1:]
        timing = ScanTiming.of_dataset(ds, name)
        t_c = timing.centroid_t_s(rows["frame_start_s"], h, w, rows["diffusion"].shape[1])
        for m in range(min(len(images) // F, args.movies or len(images))):
            a, b = m * F, (m + 1) * F
            yield (images[a:b], rows["frame_start_s"][a:b], MovieTruth.of_rows(rows, a, b, t_c), ds, timing,
                   {k: v[a:b] for k, v in rows.items()}, None if depth is None else depth[a:b])

    # The TrackPy user pipeline, tuned on field_val's first movie.
    frames, _, truth, ds, timing, _, _ = next(movies("field_val"))
    px, sigma = ds.image.pixel_size_um, ds.psf.sigma_xy_um
    h, w = frames.shape[1:]
    period = timing.frame_period_s(h, w)
    d_lo, d_hi = min_diffusion(ds), max_diffusion(ds)
    pipe = tune_user_pipeline(frames, Points.from_masked(truth.exposure_xy * px), px, sigma,
                              user_search_range_px(d_hi, period, px))
    print(f"TrackPy user pipeline: {pipe.model_dump()}", flush=True)
    r_scan = blur_r("scan", period, timing.line_period_s(w), timing.active_s(h, w), sigma, px)
    r_frame = blur_r("frame", period, timing.line_period_s(w), timing.active_s(h, w), sigma, px)
    d_mid = float(np.sqrt(d_lo * d_hi))
    own = own_radius_px(d_lo, d_hi, period, px)
    default = (f"each track's own reach (adaptive; `factory track`'s default): D {d_mid:g} radius for a new track, "
               f"within D {d_lo:g}-{d_hi:g}, memory 1, split at improbable steps")
    linkers = {
        default: lambda t: split_improbable_steps(link(t, search_range_px(d_mid, period, px), 1, own_radius=own)),
        "each track's own reach, not split": lambda t: link(t, search_range_px(d_mid, period, px), 1, own_radius=own),
        f"one radius for D {d_hi:g} (the data's largest), memory 1": lambda t: link(t, search_range_px(d_hi, period, px), 1),
        f"one radius for D {d_hi:g}, memory 3": lambda t: link(t, search_range_px(d_hi, period, px), 3),
        f"one radius for D {d_hi:g}, memory 1, split at improbable steps": lambda t: split_improbable_steps(
            link(t, search_range_px(d_hi, period, px), 1)),
        f"one radius for D {d_mid:g} (middle), memory 1": lambda t: link(t, search_range_px(d_mid, period, px), 1),
        f"one radius for D {d_mid:g} (middle), memory 1, split at improbable steps": lambda t: split_improbable_steps(
            link(t, search_range_px(d_mid, period, px), 1)),
        f"two passes: D {d_mid:g} radius, then stitched by each fragment's D": lambda t: stitch(
            link(t, search_range_px(d_mid, period, px), 1), px, period, d_hi, r_scan),
        f"two passes: D {d_lo:g} radius, then stitched by each fragment's D": lambda t: stitch(
            link(t, search_range_px(d_lo, period, px), 0), px, period, d_hi, r_scan),
    }
    text = [f"TrackPy user pipeline: {pipe.model_dump()}", ""]
    best = None  # the linker with the most D within 1.5x on the first store
    for name in args.stores:
        per = {}
        links = {}
        secs = {}
        n_frames = 0
        depths = []  # each scored particle's median depth (um), movie by movie as `per`
        seen = []  # with depths: each scored particle's share of frames with a localisation near it
        for m, (frames, starts, truth, _, _, rows, depth) in enumerate(movies(name)):
            if depth is not None:
                depths.append({p: float(np.median(depth[a:b, p])) for p, (a, b) in scored_runs(truth).items()})
            n_frames += len(frames)
            t0 = time.perf_counter()
            table = localise(det, frames, min_score=det.threshold)
            table = table.assign(t_s=time_stamps(table, h, w, timing, det.timestamps, starts))
            t_loc = time.perf_counter() - t0
            if depth is not None:  # for the depth table
                seen.append(detected_share(table, truth))
            gt = truth_points(rows["exposure_xy"], rows["n_particles"], rows["in_view"], True, h, w)
            drawn = None  # the tracks of the default linker
            for label, run in linkers.items():
                t0 = time.perf_counter()
                tracks = run(table)
                if label == default:
                    drawn = tracks
                secs[label] = secs.get(label, 0.0) + time.perf_counter() - t0 + t_loc
                counts, d = score_tracks(tracks, gt, rows["diffusion"][0], 3.0, px, r_scan)  # links and D per track
                per.setdefault(label, []).append(score_particles(tracks, d, truth, px, r_frame))
                if label == f"one radius for D {d_mid:g} (middle), memory 1":
                    per.setdefault(label + ", D by the CVE alone", []).append(score_particles(
                        tracks, diffusion_table(tracks, px, r_scan, estimator="cve"), truth, px, r_frame))
                c = links.setdefault(label, [0, 0])
                c[0] += counts["correct_links"]
                c[1] += counts["matched_links"]
            t0 = time.perf_counter()
            tracks, d_msd = run_user_pipeline(frames, pipe, px, period)
            secs["TrackPy user pipeline"] = secs.get("TrackPy user pipeline", 0.0) + time.perf_counter() - t0
            per.setdefault("TrackPy user pipeline (imsd fit)", []).append(score_particles(tracks, d_msd, truth, px, r_frame))
            if args.plot and name == args.stores[-1] and m == 0 and drawn is not None:
                plot_field(frames.mean(0), drawn,
                           {"ours (factory track)": per[default][-1],
                            "TrackPy user pipeline": per["TrackPy user pipeline (imsd fit)"][-1]}, args.plot,
                           f"{name}, movie 0, mean image; the model's tracks\n(factory track's default linker)")
                print(f"drew {args.plot}", flush=True)
            tracks = tracks.assign(t_s=time_stamps(tracks, h, w, timing, "scan", starts))
            per.setdefault("TrackPy user pipeline, its tracks through our estimator", []).append(
                score_particles(tracks, diffusion_table(tracks, px, r_scan), truth, px, r_frame))
        lines = [f"## {name}", "", "| pipeline | particles | matched track | D within 1.5x | floor (CVE) | "
                 "floor (pooled) | median abs log10 | correct links | frames/s |",
                 "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for label, parts in per.items():
            s = summarise(pd.concat(parts, ignore_index=True))
            linker = label.removesuffix(", D by the CVE alone")  # same tracks, same links and time
            c = links.get(linker)
            fps = n_frames / secs.get(linker, secs.get("TrackPy user pipeline", np.nan))
            lines.append(f"| {label} | {s['particles']} | {s['matched']:.2f} | {_counted(s, 'd_within')} | "
                         f"{_counted(s, 'floor_d_within')} | {s['floor_pooled_d_within']:.2f} | {s['median_abs_log10']:.3f} | "
                         f"{c[0] / c[1] if c else float('nan'):.3f} | {fps:.0f} |")
        if depths:
            lines += depth_table(per, depths, {"ours (`factory track`)": default,
                                               "TrackPy user pipeline": "TrackPy user pipeline (imsd fit)"}, seen)
        if best is None:  # the most D within 1.5x; of equals, the smallest median error
            score = {k: summarise(pd.concat(per[k], ignore_index=True)) for k in linkers}
            best = max(linkers, key=lambda k: (score[k]["d_within"] or 0.0,
                                               -(score[k]["median_abs_log10"] if score[k]["median_abs_log10"]
                                                 is not None else np.inf)))
            lines.append(f"\nBest linker here (D within 1.5x, then the median error): {best}")
        print("\n".join(lines) + "\n", flush=True)
        text += lines + [""]
    if args.out:
        args.out.write_text("\n".join(text) + "\n")


def _counted(summary: dict, key: str) -> str:
    """A share of the scored particles with its count, e.g. ``0.819 (240)``: margins of a
    particle or two are read from the count."""
    share = summary[key]
    return "nan" if share is None else f"{share:.3f} ({round(share * summary['particles'])})"


DEPTH_BINS_UM = (0.0, 1.5, 3.0, np.inf)  # |z - focal z|; the PSF's sigma_z is 1.36 um in fields.yaml


def depth_table(per: dict, depths: list[dict], labels: dict[str, str], seen: list[dict]) -> list[str]:
    """Markdown lines: D within 1.5x of some pipelines and of the CVE floor, by depth.

    ``per`` maps a pipeline to its ``score_particles`` tables, one per movie;
    ``depths`` holds, per movie, each scored particle's median depth (um); ``labels``
    maps a column's name to its pipeline in ``per``; ``seen``, per movie, each scored
    particle's share of frames in which the model localised it
    (``models.evaluation.fields.detected_share``), whose mean per depth is a column.
    """
    from models.evaluation.fields import within

    head = ["", "| median depth of the particle | particles | frames the model localised it in | "
            + " | ".join(labels) + " | floor (CVE) |", "| --- | --- | --- |" + " --- |" * (len(labels) + 1)]
    parts = [pd.concat([t.assign(depth_um=t["particle"].map(d), seen=t["particle"].map(v))
                        for t, d, v in zip(per[k], depths, seen)], ignore_index=True) for k in labels.values()]
    for lo, hi in zip(DEPTH_BINS_UM[:-1], DEPTH_BINS_UM[1:]):
        rows = [t[(t["depth_um"] >= lo) & (t["depth_um"] < hi)] for t in parts]
        n = len(rows[0])
        cells = [f"{within(t['D_um2_s'], t['true_D_um2_s']).mean():.2f}" if n else "-" for t in rows]
        # The floor is the truth's alone: the same in every pipeline's rows.
        floor = f"{within(rows[0]['floor_D_um2_s'], rows[0]['true_D_um2_s']).mean():.2f}" if n else "-"
        span = f"{lo:g} - {hi:g} um" if np.isfinite(hi) else f">= {lo:g} um"
        shown = f"{rows[0]['seen'].mean():.2f}" if n else "-"
        head.append(f"| {span} | {n} | {shown} | " + " | ".join(cells) + f" | {floor} |")
    return head


if __name__ == "__main__":
    main()
