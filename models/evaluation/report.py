"""The report of a runs folder.

Every evaluated detector of one kind of test store in one table (images: Table 1 beside
the paper's rows), the PR curves, tracks and D for movies, and a picture of the
predictions (images) or of one stack seen from above and from the side (stacks).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from factory.stores import Store

from factory.errors import FactoryError

from loaders.datasets import store_targets

from models.evaluation.evaluate import PAPER_ROWS, find_test_stores, metrics_table, table1
from models.evaluation.metrics import GATES
from models.evaluation.truth import Geometry, dataset_diffusion, geometry


def collect(runs: Path, kind: str = "images") -> dict[str, tuple[Path, dict]]:
    """Row label -> (folder, metrics) for every evaluation run folder under ``runs`` of ``kind``.

    Every folder gets its row: the detector's label, followed by the folder's name
    where two folders evaluated detectors with the same label.  Folders whose name starts
    with a dot (evaluations still being written) are skipped.

    Parameters
    ----------
    runs : Path
        The runs folder; its subfolders with a ``metrics.json`` are read.
    kind : {"images", "stacks"}
        The stores scored: ``"images"`` (images and movies) or ``"stacks"``.

    Returns
    -------
    dict
        Row label -> (run folder, its ``metrics.json``), in folder name order.
    """
    found = []
    for m in sorted(Path(runs).glob("*/metrics.json")):
        if m.parent.name.startswith("."):  # an evaluation still being written (models.recordings.outputs)
            continue
        data = json.loads(m.read_text())
        if "datasets" in data and "detector" in data and data.get("kind", "images") == kind:
            found.append((m.parent, data))
    labels = [d["detector"] for _, d in found]
    return {(d["detector"] if labels.count(d["detector"]) == 1 else f"{d['detector']} [{folder.name}]"): (folder, d)
            for folder, d in found}


def write_report(runs: Path, data: Path, preview_n: int = 8, datasets: list[str] | None = None) -> Path:
    """Write ``report.md`` of a runs folder against the test stores of ``data`` (`factory report`).

    Images and movies: Table 1 (``report_table.csv`` too) with the other metrics, for
    movies both truths, tracks and D per track and per particle, one movie's tracks drawn
    (``tracks_<dataset>.png``), the PR curves, and the best network's predictions (TrackPy's
    where there is none) over the first test images (``preview_predictions.png``).
    z-stacks: the 3D metrics, one stack from above and from the side
    (``stack_<dataset>.png``) and the PR curves.

    Parameters
    ----------
    runs : Path
        The folder of evaluation run folders (``collect``); the report is written in it.
    data : Path
        A folder of stores or one store (``find_test_stores``).
    preview_n : int
        Images drawn with the predictions.
    datasets : list of str, optional
        Only these test stores.

    Returns
    -------
    Path
        ``runs / "report.md"``.

    Raises
    ------
    FactoryError
        The test stores mix z-stacks and images.
    StoreError
        No test stores, or a missing one.
    """
    from factory.preview import preview

    runs = Path(runs)
    tests = {p.stem: p for p in find_test_stores(data, datasets)}
    kinds = {}
    for name, p in tests.items():
        with Store(p) as st:
            kinds[name] = st.kind
    if "stacks" in kinds.values():
        if set(kinds.values()) != {"stacks"}:
            raise FactoryError(f"{data}: holds both z-stack and image test stores; report them apart (--datasets)")
        return _write_stack_report(runs, tests)
    evals = collect(runs)
    diffusions, movies = {}, []
    for name, p in tests.items():
        with Store(p) as st:
            if st.kind == "movies":
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
    lines += ["", "## Other metrics: F1 and the RMSE of matched pairs at 140 nm, deepBlink's F1 integral", "",
              metrics_table({label: m["datasets"] for label, (_, m) in evals.items()})]
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
                  "Each movie's localisations above the detector's F1 threshold are linked (the smallest sum of squared "
                  "steps, TrackPy's criterion, solved exactly; radius "
                  "from the largest D and the frame period, memory 1) and D is estimated per track of >= 5 "
                  "points on each localisation's own time stamp, from the track's own steps with the "
                  "localisation error pooled over the store's tracks and weighed against the detector's own "
                  "predicted errors where it has them (the pooled estimator).  Correct "
                  "links: of the links between two localisations matched to true particles (within 210 nm), "
                  "the share joining the same particle.  D error: (estimate - true D) / true D per track.  "
                  "The floor rows apply the covariance-based estimator to the true positions of each target (each particle's runs "
                  "in view), and give the correct links of those positions linked the same way (what particles that come "
                  "closer than their steps cost any localiser); each detector is scored against its own target's truth.", "",
                  "| detector | dataset | correct links | links to unmatched | tracks | D rel. bias | D rel. RMSE "
                  "| RMSE 5-9 | RMSE 10-14 | RMSE >= 15 |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        floors = {}
        for label, name, t in tracked:
            d = t.get("d") or {}
            bl = d.get("by_length", {})
            lines.append(f"| {label} | {name} | {t['correct_link_fraction']:.3f} | {t['links_to_unmatched_fraction']:.3f} "
                         f"| {d.get('tracks', 0)} | {cell(d, 'rel_bias')} | {cell(d, 'rel_rmse')} | "
                         + " | ".join(cell(bl.get(k), "rel_rmse") for k in ("5-9", "10-14", ">=15")) + " |")
            floors.setdefault((name, t.get("target", "centroid")),
                              (t.get("d_floor_truth_positions"), t.get("correct_link_fraction_truth_positions")))
        for (name, truth), (d, links) in floors.items():
            bl = (d or {}).get("by_length", {})
            links = "" if links is None else f"{links:.3f}"
            lines.append(f"| true {truth} positions (floor) | {name} | {links} |  | {(d or {}).get('tracks', 0)} | {cell(d, 'rel_bias')} "
                         f"| {cell(d, 'rel_rmse')} | " + " | ".join(cell(bl.get(k), "rel_rmse") for k in ("5-9", "10-14", ">=15")) + " |")
        # Per particle: what a user publishes is a D per particle (models.evaluation.fields).
        lines += ["", "Per particle (in view >= 10 consecutive frames, on in half of them when blinking): the share "
                  "with a matched track (>= 60% of its points within 3 px), with D within 1.5x of the truth (its "
                  "longest matched track's D), and the floor's share (the covariance-based estimator on its true centroids).", "",
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
                F = st.dataset.movie.n_frames
                frames = st.read("images", 0, F)
            plot_tracks(frames, tr[tr["movie"] == 0], runs / f"tracks_{name}.png",
                        f"{label}: tracks of {name} movie 0 over its mean image")
            lines += ["", f"![tracks](tracks_{name}.png)"]
    lines += _pr_curves(evals, tests)
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


def _pr_curves(evals: dict[str, tuple[Path, dict]], tests: dict[str, Path]) -> list[str]:
    lines = ["", "## PR curves", ""]
    for label, (folder, _) in evals.items():
        pics = " ".join(f"![{label} {n}]({folder.name}/pr_{n}.png)" for n in tests if (folder / f"pr_{n}.png").exists())
        lines.append(f"**{label}**  \n{pics}\n")
    return lines


def _write_stack_report(runs: Path, tests: dict[str, Path]) -> Path:
    """``write_report`` for z-stack test stores.

    Every stack evaluation in one table, the PR curves, and the first test stack drawn
    with each detector's localisations.
    """
    evals = collect(runs, "stacks")
    rows = {label: {n: v for n, v in d["datasets"].items() if n in tests} for label, (_, d) in evals.items()}
    names = ", ".join(f"`{n}`" for n in tests)
    g = GATES[3]
    lines = [f"# Report: {runs.name}", "",
             f"z-stack detection on {names}: PR-AUC at 3D gates of {' / '.join(f'{x:g}' for x in g.auc_nm)} nm "
             f"(distance in um in x, y and z), deepBlink's F1 integral (0 - {g.f1_integral_max_nm:g} nm), F1 and "
             f"the RMSE of matched pairs at {g.f1_nm:g} nm, split into xy and z.  The truth is each particle's "
             "centroid over the stack's pixel steps (in the field, within the planes).", "", metrics_table(rows), ""]
    first = next(iter(tests))
    with Store(tests[first]) as st:
        stack, geom = st.read("images", 0, 1)[0], geometry(st)
        truth = store_targets(st, "centroid", 0, 1)[0]
    preds = {}
    for label, (folder, d) in evals.items():
        csv = folder / f"predictions_{first}.csv"
        if csv.exists():
            p = pd.read_csv(csv)
            thr = d.get("threshold")
            p = p[(p.frame == 0) & ((p.score >= thr) if thr is not None else True)]
            preds[label] = np.stack([p.x, p.y, p.z_um / geom.z_step_um], 1)
    plot_stack(stack.astype(np.float64), truth, preds, geom, runs / f"stack_{first}.png",
               f"{first}, stack 0: localisations above each detector's F1 threshold")
    lines += ["## One test stack", "", f"![stack](stack_{first}.png)", ""]
    for label, (_, d) in evals.items():
        if "model" in d:
            mfile = Path(d["model"]) / "metrics.json"
            if mfile.exists():
                tm = json.loads(mfile.read_text())
                lines.append(f"{label}: trained {tm['train_seconds'] / 60:.1f} min on {tm['device']} "
                             f"({tm['train_images']} stacks, best epoch {tm['best_epoch']}).")
    lines += _pr_curves(evals, tests)
    out = runs / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def plot_stack(stack: np.ndarray, truth_vox: np.ndarray, predictions: dict, geom: Geometry, out: Path,
               title: str) -> None:
    """One stack seen from above and from the side, with the truth and each detector's localisations.

    From above: the maximum over z; from the side: the maximum over y, z drawn to scale.
    True centroids are green crosses, each detector's localisations circles; axes in um.

    Parameters
    ----------
    stack : ndarray
        One stack (Z, H, W).
    truth_vox : ndarray
        (P, 3) true positions (x px, y px, z planes from the first plane), NaN where none.
    predictions : dict
        Detector label -> (M, 3) localisations (x px, y px, z planes); three at most are
        drawn.
    geom : Geometry
        The store's pixel size and z step (um).
    out : Path
        The image file written (PNG).
    title : str
        The figure's title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Z, H, W = stack.shape
    px, dz = geom.pixel_size_um, geom.z_step_um
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.5), gridspec_kw={"width_ratios": [1, 1.1]})
    a.imshow(stack.max(0), cmap="gray", extent=(-0.5 * px, (W - 0.5) * px, (H - 0.5) * px, -0.5 * px))
    b.imshow(stack.max(1), cmap="gray", aspect="auto", extent=(-0.5 * px, (W - 0.5) * px, (Z - 0.5) * dz, -0.5 * dz))
    t = truth_vox[np.isfinite(truth_vox).all(-1)]
    a.plot(t[:, 0] * px, t[:, 1] * px, "x", color="lime", ms=9, mew=2, label="truth")
    b.plot(t[:, 0] * px, t[:, 2] * dz, "x", color="lime", ms=9, mew=2)
    for (label, p), c in zip(predictions.items(), ("magenta", "orange", "cyan")):
        a.plot(p[:, 0] * px, p[:, 1] * px, "o", mfc="none", color=c, ms=10, mew=1.5, label=label)
        b.plot(p[:, 0] * px, p[:, 2] * dz, "o", mfc="none", color=c, ms=10, mew=1.5)
    a.set(title="from above (max over z)", xlabel="x (um)", ylabel="y (um)")
    b.set(title="from the side (max over y)", xlabel="x (um)", ylabel="z from the first plane (um)")
    a.legend(loc="upper right", fontsize=7, framealpha=0.6)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
