"""z-stacks in the detectors: voxel geometry, the 3D truth, scoring and TrackPy 3D tuning.

Detectors of stacks return ``frame, x, y, z, score, sigma`` in voxel coordinates (x, y
px; z in planes from the first plane).  Scoring converts both sides to micrometres with
the store's pixel size and z step (``StackGeometry``), so gates are physical distances
in 3D and the RMSE splits into xy and z (``models.evaluation.metrics.evaluate_points_3d``).
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from factory.errors import FactoryError, StoreError
from factory.stores import Store
from loaders.datasets import TARGETS, TARGETS_Z, stack_points

from models.detectors.base import Detector
from models.evaluation.metrics import GATES_3D_NM, F1_GATE_3D_NM, Points, best_f1_threshold, evaluate_points_3d, gate_key, pr_auc
from models.detectors.trackpy import DEFAULT_GRID_3D, Params3D, TrackPy3DDetector

log = logging.getLogger(__name__)

STACK_COLUMNS = ("frame", "x", "y", "z_um", "score", "sigma")


@dataclass(frozen=True)
class StackGeometry:
    pixel_size_um: float
    z_step_um: float

    def to_um(self, frame, x, y, z_planes, n_frames: int) -> Points:
        """Voxel coordinates -> Points (x, y, z) in um (z from the first plane)."""
        xyz = np.stack([np.asarray(x, np.float64) * self.pixel_size_um, np.asarray(y, np.float64) * self.pixel_size_um,
                        np.asarray(z_planes, np.float64) * self.z_step_um], 1).reshape(-1, 3)
        return Points(np.asarray(frame, np.int64), xyz, int(n_frames))


def is_stack_store(store: Store) -> bool:
    return store.config["dataset"].get("stack") is not None


def geometry(store: Store) -> StackGeometry:
    ds = store.config["dataset"]
    return StackGeometry(float(ds["image"]["pixel_size_um"]), float(ds["stack"]["z_step_um"]))


def truth_voxels(store: Store, target: str = "centroid", start: int = 0, stop: int | None = None) -> np.ndarray:
    """(N, P, 3) voxel coordinates of the detection targets (``stack_points``)."""
    if TARGETS_Z[target] not in store:
        raise StoreError(f"{store.path}: not a stack store (no {TARGETS_Z[target]} array)")
    return stack_points(store.read(TARGETS[target], start, stop), store.read(TARGETS_Z[target], start, stop),
                        store.read("plane_z_um", start, stop), store.read("n_particles", start, stop),
                        store.read("in_view", start, stop))


def truth_um(store: Store, target: str = "centroid", start: int = 0, stop: int | None = None) -> Points:
    v = truth_voxels(store, target, start, stop)
    mask = np.isfinite(v).all(-1)
    frame = np.nonzero(mask)[0]
    p = v[mask].astype(np.float64)
    return geometry(store).to_um(frame, p[:, 0], p[:, 1], p[:, 2], len(v))


def table_um(table: pd.DataFrame, geom: StackGeometry, n_frames: int) -> Points:
    return geom.to_um(table["frame"], table["x"], table["y"], table["z"], n_frames)


def validate(detector: Detector, stacks: np.ndarray, gt_um: Points, geom: StackGeometry) -> dict:
    """Validation AUCs at the 3D gates and their mean (the model-selection score)."""
    table = detector.detect(stacks)
    pred = table_um(table, geom, len(stacks))
    aucs = [pr_auc(pred, table.score.to_numpy(), gt_um, g / 1000.0) for g in GATES_3D_NM]
    return {"auc": aucs, "mean_auc": float(np.mean(aucs)), "table": table}


def f1_threshold(table: pd.DataFrame, gt_um: Points, geom: StackGeometry) -> float:
    pred = table_um(table, geom, gt_um.n_frames)
    return best_f1_threshold(pred.frame, pred.xy, table.score, gt_um, F1_GATE_3D_NM / 1000.0)


def tune_trackpy(stacks: np.ndarray, gt_um: Points, geom: StackGeometry,
                 grid: dict | None = None) -> tuple[TrackPy3DDetector, list[dict]]:
    """Grid search of TrackPy 3D maximising the mean PR-AUC over the 3D gates on tuning
    data; its F1 threshold (a mass) maximises F1 on the same data."""
    grid = {**DEFAULT_GRID_3D, **(grid or {})}
    keys = list(grid)
    results, best, best_score, best_table = [], None, -1.0, None
    for values in itertools.product(*(grid[k] for k in keys)):
        params = Params3D(**dict(zip(keys, values)))
        if params.diameter_z > stacks.shape[1] + (1 - stacks.shape[1] % 2):
            continue  # wider than the stack
        v = validate(TrackPy3DDetector(params), stacks, gt_um, geom)
        results.append({**params.model_dump(), "auc": v["auc"], "mean_auc": v["mean_auc"]})
        log.info("trackpy 3D %s: mean AUC %.3f", params, v["mean_auc"])
        if v["mean_auc"] > best_score:
            best, best_score, best_table = params, v["mean_auc"], v["table"]
    if best is None:
        raise FactoryError(f"no TrackPy 3D setting fits stacks of {stacks.shape[1]} planes")
    return TrackPy3DDetector(best, f1_threshold(best_table, gt_um, geom)), results


def with_z_um(table: pd.DataFrame, z_step_um: float) -> pd.DataFrame:
    """A detector's voxel table as users get it: ``frame, x, y, z_um, score, sigma``."""
    out = table.copy()
    out["z_um"] = out.pop("z") * z_step_um
    return out[list(STACK_COLUMNS)]


def evaluate_stacks(detector: Detector, stores: list[Path], out: Path, label: str, target: str = "centroid",
                    extra: dict | None = None) -> dict:
    """Score a stack detector on stack stores and write ``metrics.json``, ``table.md``
    and ``predictions_<name>.csv`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for path in stores:
        with Store(path) as st:
            if not is_stack_store(st):
                raise StoreError(f"{path}: not a stack store (a 3D detector scores z-stacks)")
            stacks = st.read("images")
            gt = truth_um(st, target)
            geom = geometry(st)
        t0 = time.perf_counter()
        table = detector.detect(stacks)
        seconds = time.perf_counter() - t0
        pred = table_um(table, geom, len(stacks))
        m = evaluate_points_3d(pred, table.score.to_numpy(np.float64), gt, detector.threshold)
        m.update({"seconds": seconds, "stacks_per_s": len(stacks) / max(seconds, 1e-9),
                  "pixel_size_um": geom.pixel_size_um, "z_step_um": geom.z_step_um, "planes": stacks.shape[1]})
        results[Path(path).stem] = m
        with_z_um(table, geom.z_step_um).to_csv(out / f"predictions_{Path(path).stem}.csv", index=False)
    metrics = {"kind": "stacks", "label": label, "target": target, "threshold": detector.threshold,
               "gates_nm": list(GATES_3D_NM), "datasets": results, **(extra or {})}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "table.md").write_text(stack_table({label: results}) + "\n")
    return metrics


def stack_table(rows: dict[str, dict[str, dict]]) -> str:
    """Markdown: per detector and stack test set, AUCs at the 3D gates, F1 integral, F1,
    RMSE in xy and in z."""
    gates = [gate_key(g) for g in GATES_3D_NM]
    head = (["detector", "test set"] + [f"AUC {g} nm" for g in gates]
            + ["F1 integral", f"F1 ({F1_GATE_3D_NM} nm)", "RMSE xy (nm)", "RMSE z (nm)", "stacks/s"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, datasets in rows.items():
        for name, m in datasets.items():
            cells = [label, name] + [f"{m['auc'][g]:.3f}" for g in gates] + [
                f"{m['f1_integral']:.3f}", f"{m['f1']:.3f}", f"{m['rmse_xy_nm']:.0f}", f"{m['rmse_z_nm']:.0f}",
                f"{m.get('stacks_per_s', float('nan')):.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_stack(stack: np.ndarray, truth_vox: np.ndarray, predictions: dict, geom: StackGeometry, out: Path,
               title: str) -> None:
    """One stack seen from above (maximum over z) and from the side (maximum over y, z
    drawn to scale), with the true centroids (green crosses) and each detector's
    localisations (circles)."""
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


def write_volume_report(runs: Path, tests: dict[str, Path]) -> Path:
    """``<runs>/report.md`` for z-stack test stores: every stack evaluation under ``runs``
    in one table, and the first test stack drawn with each detector's localisations."""
    runs = Path(runs)
    evals = {}
    for m in sorted(runs.glob("*/metrics.json")):
        if m.parent.name.startswith("."):  # an evaluation still being written (models.recordings.outputs)
            continue
        data = json.loads(m.read_text())
        if data.get("kind") == "stacks":
            label = data["label"] if data["label"] not in evals else f"{data['label']} [{m.parent.name}]"
            evals[label] = (m.parent, data)
    rows = {label: {n: v for n, v in d["datasets"].items() if n in tests} for label, (_, d) in evals.items()}
    names = ", ".join(f"`{n}`" for n in tests)
    lines = [f"# Report: {runs.name}", "",
             f"z-stack detection on {names}: PR-AUC at 3D gates of {' / '.join(map(str, GATES_3D_NM))} nm "
             "(distance in um in x, y and z), deepBlink's F1 integral (0 - 300 nm), F1 and the RMSE of matched "
             f"pairs at {F1_GATE_3D_NM} nm, split into xy and z.  The truth is each particle's centroid over the "
             "stack's pixel steps (in the field, within the planes).", "", stack_table(rows), ""]
    first = next(iter(tests))
    with Store(tests[first]) as st:
        stack, geom = st.read("images", 0, 1)[0], geometry(st)
        truth = truth_voxels(st, "centroid", 0, 1)[0]
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
    out = runs / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out
