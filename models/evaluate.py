"""The evaluator: one code path for every detector and for users' CSV files.

Writes into a run folder:
- ``metrics.json``: ``{"datasets": {name: {"auc": {"70": .., "140": .., "210": ..},
  "f1_integral", "f1", "rmse_px", "n_images", ...}}, "pooled": {...}}``
- ``table.md`` / ``table.csv``: Table 1 of the seed paper with the paper's rows beside ours
- ``pr_<dataset>.png``: the PR curves at the three gates
- ``predictions_<dataset>.csv``: the localisation table that was scored
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from factory.errors import FactoryError, StoreError
from factory.stores import Store

from .base import COLUMNS
from .metrics import GATES_PX, Points, evaluate_points, pr_curve

log = logging.getLogger(__name__)

# Table 1 of the seed paper: AUC at 70 / 140 / 210 nm for D = 0.75, 1.0, 1.75 um^2/s.
PAPER_ROWS = {
    "TrackPy (paper)": {0.75: (0.06, 0.42, 0.73), 1.0: (0.04, 0.30, 0.61), 1.75: (0.02, 0.19, 0.47)},
    "Keypoint R-CNN (paper)": {0.75: (0.48, 0.91, 0.99), 1.0: (0.41, 0.87, 0.98), 1.75: (0.26, 0.72, 0.92)},
}


def ground_truth(store: Store) -> Points:
    return Points.from_centroids(store.read("centroids"), store.read("n_particles"))


def dataset_diffusion(store: Store) -> float | None:
    """The store's D when it is fixed (the paper's test sets), else None."""
    d = store.config["dataset"]["particles"]["diffusion_um2_s"]
    return float(d["value"]) if d.get("type") == "fixed" else None


def find_test_stores(data: Path, names: list[str] | None = None) -> list[Path]:
    """Test stores of a data folder: the named ones, or every ``test*`` store."""
    data = Path(data)
    if not data.exists():
        raise StoreError(f"{data}: no such data folder or store")
    if data.suffix in (".h5", ".hdf5", ".zarr"):
        return [data]
    stores = {p.stem: p for p in sorted(data.iterdir())
              if p.suffix in (".h5", ".hdf5", ".zarr") and not p.name.startswith(".")}
    if names:
        missing = [n for n in names if n not in stores]
        if missing:
            raise StoreError(f"{data}: no store named {missing[0]} (have: {', '.join(stores) or 'none'})")
        return [stores[n] for n in names]
    tests = [p for n, p in stores.items() if n.startswith("test")]
    if not tests:
        raise StoreError(f"{data}: no test stores (test*.h5 / test*.zarr); build datasets.yaml first")
    return tests


def read_predictions_csv(path: Path, n_frames: int | None = None) -> pd.DataFrame:
    """A user's localisation table, checked: columns, types, frame range."""
    path = Path(path)
    if not path.exists():
        raise FactoryError(f"{path}: no such file")
    try:
        table = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise FactoryError(f"{path}: not a readable CSV table ({str(exc).splitlines()[0]})") from None
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise FactoryError(f"{path}: missing column(s) {', '.join(missing)} "
                           f"(need {', '.join(COLUMNS)}; have {', '.join(map(str, table.columns))})")
    for col in COLUMNS:
        if not pd.api.types.is_numeric_dtype(table[col]):
            raise FactoryError(f"{path}: column {col} must be numeric")
        if not np.isfinite(table[col].to_numpy(np.float64)).all():
            raise FactoryError(f"{path}: column {col} has missing or non-finite values")
    frames = table["frame"].to_numpy()
    if not np.all(frames == np.round(frames)):
        raise FactoryError(f"{path}: column frame must hold integer image indices")
    if n_frames is not None and len(table) and (frames.min() < 0 or frames.max() >= n_frames):
        bad = int(frames.max()) if frames.max() >= n_frames else int(frames.min())
        raise FactoryError(f"{path}: frame {bad} is out of range (the store has frames 0..{n_frames - 1})")
    table["frame"] = table["frame"].astype(np.int64)
    return table


def score_table(table: pd.DataFrame, gt: Points, threshold: float | None = None,
                pixel_size_um: float = 0.07) -> dict:
    pred = Points.from_arrays(table["frame"], table["x"], table["y"], gt.n_frames)
    return evaluate_points(pred, table["score"].to_numpy(np.float64), gt, threshold,
                           pixel_size_um=pixel_size_um)


def pooled_metrics(tables: list[pd.DataFrame], gts: list[Points], threshold: float | None) -> dict:
    """All test sets scored as one (frames renumbered)."""
    offset = 0
    frames, pframes, xys, pxy, scores = [], [], [], [], []
    for t, g in zip(tables, gts):
        frames.append(g.frame + offset)
        xys.append(g.xy)
        pframes.append(t["frame"].to_numpy() + offset)
        pxy.append(t[["x", "y"]].to_numpy(np.float64))
        scores.append(t["score"].to_numpy(np.float64))
        offset += g.n_frames
    gt = Points(np.concatenate(frames), np.concatenate(xys), offset)
    pred = Points(np.concatenate(pframes), np.concatenate(pxy).reshape(-1, 2), offset)
    return evaluate_points(pred, np.concatenate(scores), gt, threshold)


def plot_pr(table: pd.DataFrame, gt: Points, title: str, out: Path, pixel_size_um: float = 0.07) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pred = Points.from_arrays(table["frame"], table["x"], table["y"], gt.n_frames)
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    for gate in GATES_PX:
        p, r = pr_curve(pred, table["score"].to_numpy(np.float64), gt, gate)
        ax.plot(np.r_[0, r], np.r_[p[:1], p] if len(p) else [0], label=f"{gate * pixel_size_um * 1000:.0f} nm")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=9)
    ax.legend(title="gate", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def table1(rows: dict[str, dict[str, dict]], diffusions: dict[str, float | None]) -> tuple[str, pd.DataFrame]:
    """Table 1 as markdown and as a DataFrame; ``rows`` is label -> dataset -> metrics."""
    datasets = list(diffusions)
    cols = [(name, diffusions[name]) for name in datasets]
    header1 = ["D (um^2/s)"] + sum([[f"{d:g}" if d is not None else name, "", ""] for name, d in cols], [])
    header2 = ["eps (nm)"] + ["70", "140", "210"] * len(cols)
    lines = ["| " + " | ".join(header1) + " |", "|" + " --- |" * len(header1), "| " + " | ".join(header2) + " |"]
    records = []
    for label, per in rows.items():
        cells = []
        for name, d in cols:
            if label in PAPER_ROWS:
                vals = PAPER_ROWS[label].get(d)
                vals = list(vals) if vals else [None] * 3
            else:
                m = per.get(name)
                vals = [m["auc"][k] for k in ("70", "140", "210")] if m else [None] * 3
            cells += vals
            for gate, v in zip(("70", "140", "210"), vals):
                records.append({"detector": label, "dataset": name, "diffusion_um2_s": d, "eps_nm": int(gate), "auc": v})
        lines.append("| " + " | ".join([label] + ["" if v is None else f"{v:.2f}" for v in cells]) + " |")
    return "\n".join(lines) + "\n", pd.DataFrame.from_records(records)


def write_evaluation(out: Path, label: str, tables: dict[str, pd.DataFrame], data_paths: dict[str, Path],
                     threshold: float | None = None, extra: dict | None = None) -> dict:
    """Score ``tables`` (dataset -> localisation table) and write the run folder."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics, gts, diffusions = {}, [], {}
    for name, table in tables.items():
        with Store(data_paths[name]) as st:
            gt = ground_truth(st)
            diffusions[name] = dataset_diffusion(st)
            px = st.config["dataset"]["image"]["pixel_size_um"]
        metrics[name] = score_table(table, gt, threshold, px)
        gts.append(gt)
        plot_pr(table, gt, f"{label}: {name}", out / f"pr_{name}.png", px)
        table.to_csv(out / f"predictions_{name}.csv", index=False)
    result = {"detector": label, "threshold": threshold, "datasets": metrics}
    if len(tables) > 1:
        result["pooled"] = pooled_metrics(list(tables.values()), gts, threshold)
    result.update(extra or {})
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    rows = {"TrackPy (paper)": {}, "Keypoint R-CNN (paper)": {}, label: metrics}
    md, df = table1(rows, diffusions)
    more = ["", "| dataset | F1 integral | F1 (2 px) | RMSE (px) | images |", "| --- | --- | --- | --- | --- |"]
    for name, m in metrics.items():
        more.append(f"| {name} | {m['f1_integral']:.3f} | {m['f1']:.3f} | {m['rmse_px']:.3f} | {m['n_images']} |")
    (out / "table.md").write_text(md + "\n".join(more) + "\n")
    df.to_csv(out / "table.csv", index=False)
    return result


def evaluate_detector(detector, data: Path, out: Path, names: list[str] | None = None,
                      progress: bool = True, extra: dict | None = None) -> dict:
    """Run ``detector`` on the test stores of ``data`` and write the run folder."""
    paths = {p.stem: p for p in find_test_stores(data, names)}
    tables, seconds = {}, {}
    for name, path in paths.items():
        with Store(path) as st:
            images = st.read("images")
        t0 = time.perf_counter()
        tables[name] = detector.detect(images, progress=progress)
        seconds[name] = time.perf_counter() - t0
        log.info("%s on %s: %d localisations in %.1f s", detector.name, name, len(tables[name]), seconds[name])
    extra = {**(extra or {}), "detect_seconds": seconds}
    return write_evaluation(out, getattr(detector, "label", detector.name), tables, paths,
                            getattr(detector, "threshold", None), extra)
