"""The TrackPy baseline: ``trackpy.locate`` per image, scored by integrated mass.

Its parameters are tuned by a grid search on the training/validation data only (never
on a test set) and saved as JSON beside the evaluation.
"""

from __future__ import annotations

import itertools
import json
import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .base import as_table, check_images, empty_table, register

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrackPyParams:
    diameter: int = 7
    minmass: float = 0.0
    separation: float | None = None  # trackpy's default: diameter + 1
    percentile: float = 64.0
    preprocess: bool = True

    def to_json(self) -> dict:
        return asdict(self)


@register("trackpy")
class TrackPyDetector:
    """Intensity-based localisation (Crocker-Grier, as implemented by TrackPy)."""

    name = "trackpy"
    label = "TrackPy (ours)"

    def __init__(self, params: TrackPyParams | None = None, threshold: float | None = None, **kwargs):
        self.params = params or TrackPyParams(**kwargs)
        # Mass above which a localisation counts for F1 (the AUCs rank every one).
        self.threshold = threshold

    @classmethod
    def from_json(cls, path: str | Path) -> "TrackPyDetector":
        data = json.loads(Path(path).read_text())
        return cls(TrackPyParams(**data["params"]), data.get("threshold"))

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        data = {"detector": self.name, "params": self.params.to_json(), "threshold": self.threshold}
        Path(path).write_text(json.dumps({**data, **(extra or {})}, indent=2))

    def detect(self, images, progress: bool = False) -> pd.DataFrame:
        import trackpy
        from tqdm.auto import tqdm

        trackpy.quiet()
        images = check_images(images)
        p = self.params
        frames, xs, ys, masses, sizes = [], [], [], [], []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i in tqdm(range(len(images)), desc="trackpy", unit="img", disable=not progress):
                f = trackpy.locate(
                    images[i], p.diameter, minmass=p.minmass, separation=p.separation,
                    percentile=p.percentile, preprocess=p.preprocess,
                )
                if len(f):
                    frames.append(np.full(len(f), i))
                    xs.append(f["x"].to_numpy())
                    ys.append(f["y"].to_numpy())
                    masses.append(f["mass"].to_numpy())
                    sizes.append(f["size"].to_numpy())
        if not frames:
            return empty_table(("sigma",))
        # TrackPy's `size` is the radius of gyration of the spot, in px: a spread, not an
        # uncertainty, but the closest thing it reports.
        return as_table(np.concatenate(frames), np.concatenate(xs), np.concatenate(ys),
                        np.concatenate(masses), sigma=np.concatenate(sizes))


DEFAULT_GRID = {
    "diameter": [5, 7, 9],
    "minmass": [0.0],
    "separation": [None],
    "percentile": [50.0, 64.0, 80.0],
    "preprocess": [True, False],
}


def tune(images: np.ndarray, centroids: np.ndarray, n_particles: np.ndarray,
         grid: dict | None = None) -> tuple[TrackPyDetector, list[dict]]:
    """Grid search maximising the mean PR-AUC over the three gates on tuning data.

    Returns the tuned detector and every grid point's scores.  Its F1 threshold (a
    mass) is the one that maximises F1 on the same data.
    """
    from .metrics import GATES_PX, Points, pr_auc

    grid = {**DEFAULT_GRID, **(grid or {})}
    gt = Points.from_centroids(centroids, n_particles)
    results = []
    keys = list(grid)
    best, best_score = None, -1.0
    for values in itertools.product(*(grid[k] for k in keys)):
        params = TrackPyParams(**dict(zip(keys, values)))
        table = TrackPyDetector(params).detect(images)
        pred = Points.from_arrays(table.frame, table.x, table.y, len(images))
        aucs = [pr_auc(pred, table.score.to_numpy(), gt, g) for g in GATES_PX]
        score = float(np.mean(aucs))
        results.append({**params.to_json(), "auc": aucs, "mean_auc": score})
        log.info("trackpy %s: mean AUC %.3f", params, score)
        if score > best_score:
            best, best_score, best_table = params, score, table
    # The F1 operating point: the mass threshold that maximises F1 on the tuning data.
    from .metrics import f1_rmse

    masses = np.unique(np.quantile(best_table.score, np.linspace(0, 0.99, 100)))
    f1s = []
    for m in masses:
        sel = best_table[best_table.score >= m]
        f1s.append(f1_rmse(Points.from_arrays(sel.frame, sel.x, sel.y, len(images)), gt)[0])
    return TrackPyDetector(best, float(masses[int(np.argmax(f1s))])), results
