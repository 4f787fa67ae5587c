"""The demo report: every evaluated detector of a runs folder in one Table 1."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from factory.stores import Store

from factory.errors import FactoryError

from models.evaluation.evaluate import PAPER_ROWS, dataset_diffusion, find_test_stores, is_movie_store, table1
from models.evaluation.volumes import is_stack_store, write_volume_report


def collect(runs: Path) -> dict[str, tuple[Path, dict]]:
    """Row label -> (folder, metrics) for every evaluation run folder under ``runs``.

    Every folder gets its row: the detector's label, followed by the folder's name
    where two folders evaluated detectors with the same label."""
    found = []
    for m in sorted(Path(runs).glob("*/metrics.json")):
        if m.parent.name.startswith("."):  # an evaluation still being written (models.recordings.outputs)
            continue
        data = json.loads(m.read_text())
        if "datasets" in data and "detector" in data:
            found.append((m.parent, data))
    labels = [d["detector"] for _, d in found]
    return {(d["detector"] if labels.count(d["detector"]) == 1 else f"{d['detector']} [{folder.name}]"): (folder, d)
            for folder, d in found}


def write_report(runs: Path, data: Path, preview_n: int = 8, datasets: list[str] | None = None) -> Path:
    from factory.preview import preview

    runs = Path(runs)
    tests = {p.stem: p for p in find_test_stores(data, datasets)}
    stacks = []
    for p in tests.values():
        with Store(p) as st:
            stacks.append(is_stack_store(st))
    if any(stacks):
        if not all(stacks):
            raise FactoryError(f"{data}: holds both z-stack and image test stores; report them apart (--datasets)")
        return write_volume_report(runs, tests)
    evals = collect(runs)
    diffusions, movies = {}, []
    for name, p in tests.items():
        with Store(p) as st:
            if is_movie_store(st):
                movies.append(name)  # reported in the movie sections, not in Table 1
            else:
                diffusions[name] = dataset_diffusion(st)
    rows = {label: {} for label in PAPER_ROWS}
    # TrackPy first, then the networks, as in the paper's table; only detectors scored
    # on Table 1's stores.
    for label, (_, m) in sorted(evals.items(), key=lambda kv: (not kv[0].startswith("TrackPy"), kv[0])):
        if any(n in m["datasets"] for n in diffusions):
            rows[label] = m["datasets"]
    md, df = table1(rows, diffusions)
    df.to_csv(runs / "report_table.csv", index=False)
    names = ", ".join(f"`{n}`" for n in tests)
    lines = [f"# Report: {runs.name}", "", "AUC of the precision-recall curve at 70 / 140 / 210 nm gates "
             f"(seed paper, Table 1) on the test stores of `{data}` ({names}); the paper's rows where "
             "its diffusion coefficients match.", "", md]
    lines += ["", "## Other metrics (F1 at 140 nm, RMSE of matched pairs, deepBlink's F1 integral)", "",
              "| detector | dataset | F1 integral | F1 | RMSE (nm) |", "| --- | --- | --- | --- | --- |"]
    for label, (_, m) in evals.items():
        for name, v in m["datasets"].items():
            lines.append(f"| {label} | {name} | {v['f1_integral']:.3f} | {v['f1']:.3f} | {v['rmse_nm']:.1f} |")
    if movies:
        lines += ["", "## Movies: every detector against both truths", "",
                  "The paper's target is the whole-frame trajectory centroid; the exposure-weighted position is "
                  "what the laser saw (the particle's position weighted by its own signal over the frame). "
                  "Each detector is scored against both; its own target is marked *.", "",
                  "| detector | dataset | truth | AUC 70 / 140 / 210 nm | F1 integral | F1 | RMSE (nm) |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for label, (_, m) in evals.items():
            for name in movies:
                own = m["datasets"].get(name, {}).get("target")
                for truth, v in m.get("by_target", {}).get(name, {}).items():
                    auc = " / ".join(f"{v['auc'][k]:.3f}" for k in v["auc"])
                    mark = " *" if truth == own else ""
                    lines.append(f"| {label} | {name} | {truth}{mark} | {auc} | {v['f1_integral']:.3f} | "
                                 f"{v['f1']:.3f} | {v['rmse_nm']:.1f} |")
    tracked = [(label, name, m["tracks"][name]) for label, (_, m) in evals.items()
               for name in movies if name in m.get("tracks", {})]
    if tracked:
        def cell(d, key):
            v = d.get(key) if d else None
            return "" if v is None else f"{v:+.2f}" if key == "rel_bias" else f"{v:.2f}"

        lines += ["", "## Tracks and diffusion coefficients", "",
                  "Each movie's localisations above the detector's F1 threshold are linked (trackpy.link, radius "
                  "from the largest D and the frame period, memory 1) and D is estimated per track of >= 5 "
                  "points by the covariance-based estimator on each localisation's own time stamp.  Correct "
                  "links: of the links between two localisations matched to true particles (within 210 nm), "
                  "the share joining the same particle.  D error: (estimate - true D) / true D per track.  "
                  "The floor rows apply the estimator to the true positions of each target (each particle's runs "
                  "in view); each detector is scored against its own target's truth.", "",
                  "| detector | dataset | correct links | links to unmatched | tracks | D rel. bias | D rel. RMSE "
                  "| RMSE 5-9 | RMSE 10-14 | RMSE >= 15 |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        floors = {}
        for label, name, t in tracked:
            d = t.get("d") or {}
            bl = d.get("by_length", {})
            lines.append(f"| {label} | {name} | {t['correct_link_fraction']:.3f} | {t['links_to_unmatched_fraction']:.3f} "
                         f"| {d.get('tracks', 0)} | {cell(d, 'rel_bias')} | {cell(d, 'rel_rmse')} | "
                         + " | ".join(cell(bl.get(k), "rel_rmse") for k in ("5-9", "10-14", ">=15")) + " |")
            floors.setdefault((name, t.get("target", "centroid")), t.get("d_floor_truth_positions"))
        for (name, truth), d in floors.items():
            bl = (d or {}).get("by_length", {})
            lines.append(f"| true {truth} positions (floor) | {name} |  |  | {(d or {}).get('tracks', 0)} | {cell(d, 'rel_bias')} "
                         f"| {cell(d, 'rel_rmse')} | " + " | ".join(cell(bl.get(k), "rel_rmse") for k in ("5-9", "10-14", ">=15")) + " |")
        # Per particle: what a user publishes is a D per particle (models.evaluation.fields).
        lines += ["", "Per particle (in view >= 10 consecutive frames, on in half of them when blinking): the share "
                  "with a matched track (>= 60% of its points within 3 px), with D within 1.5x of the truth (its "
                  "longest matched track's D), and the floor's share (the estimator on its true centroids).", "",
                  "| detector | dataset | particles | matched track | D within 1.5x | floor | median abs log10 D error |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for label, name, t in tracked:
            p = t.get("particles") or {}
            if p.get("particles"):
                lines.append(f"| {label} | {name} | {p['particles']} | {p['matched']:.2f} | {p['d_within']:.2f} | "
                             f"{p['floor_d_within']:.2f} | {p['median_abs_log10']:.3f} |")
        # One movie's tracks, from the tracker with the smallest D error.
        from models.tracking.tracks import plot_tracks

        ranked = sorted(((t.get("d") or {}).get("rel_rmse") or 1e9, label, name) for label, name, t in tracked)
        _, label, name = ranked[0]
        folder = evals[label][0]
        csv = folder / f"tracks_{name}.csv"
        if csv.exists():
            tr = pd.read_csv(csv)
            with Store(tests[name]) as st:
                F = st.config["dataset"]["movie"]["n_frames"]
                frames = st.read("images", 0, F)
            plot_tracks(frames, tr[tr["movie"] == 0], runs / f"tracks_{name}.png",
                        f"{label}: tracks of {name} movie 0 over its mean image")
            lines += ["", f"![tracks](tracks_{name}.png)"]
    lines += ["", "## PR curves", ""]
    for label, (folder, _) in evals.items():
        pics = " ".join(f"![{label} {n}]({folder.name}/pr_{n}.png)" for n in tests if (folder / f"pr_{n}.png").exists())
        lines.append(f"**{label}**  \n{pics}\n")
    # Predictions of the best network (highest mean AUC over all test sets; TrackPy if
    # there is no network) drawn over a few test images.
    first = next(iter(diffusions or tests))
    scored = [(float(np.mean([a for v in m["datasets"].values() for a in v["auc"].values()])), label, folder)
              for label, (folder, m) in evals.items() if first in m["datasets"]]
    nets = [t for t in scored if not t[1].startswith("TrackPy")]
    _, label, folder = max(nets or scored or [(0.0, None, runs / "-")], key=lambda t: t[0])
    pred_csv = folder / f"predictions_{first}.csv"
    if pred_csv.exists():
        pred = pd.read_csv(pred_csv)
        thr = json.loads((folder / "metrics.json").read_text()).get("threshold")
        if thr is not None:
            pred = pred[pred.score >= thr]
        preview(tests[first], runs / "preview_predictions.png", preview_n, 0, pred)
        lines += ["## Predictions", "",
                  f"{label} on the first {preview_n} images of {first}: true trajectories (green lines), "
                  "true centroids (green crosses), predictions above the F1 threshold (magenta circles).", "",
                  "![predictions](preview_predictions.png)", ""]
    out = runs / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out
