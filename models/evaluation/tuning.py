"""Choosing a detector on data with truth, for images and stacks alike.

The model-selection score (``validate``), the operating point (``f1_threshold``) and the
TrackPy grid search (``tune_trackpy``).  Never run on a test set.
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pandas as pd

from factory.errors import FactoryError

from models.detectors.base import Detector
from models.evaluation.metrics import Points, best_f1_threshold, f1_rmse, gates_for, pr_auc
from models.evaluation.truth import Geometry

log = logging.getLogger(__name__)


def validate(detector: Detector, images: np.ndarray, gt: Points, geom: Geometry) -> dict:
    """The detector's AUCs at its dimension's gates and their mean, the model-selection score.

    Parameters
    ----------
    detector : Detector
        Any detector; every localisation is ranked (no threshold).
    images : ndarray
        Images (N, H, W), or stacks (N, Z, H, W) for a 3D detector.
    gt : Points
        Their truth (um); its dimension chooses the gates (``gates_for``).
    geom : Geometry
        Turns the detector's table (px, planes) into um.

    Returns
    -------
    dict
        ``auc`` (list of the AUCs, one per gate of ``gates_for(gt.ndim).auc_nm``),
        ``mean_auc`` (their mean) and ``table`` (the localisation table scored).
    """
    table = detector.detect(images)
    pred = geom.points(table, len(images))
    aucs = [pr_auc(pred, table["score"].to_numpy(np.float64), gt, g / 1000.0) for g in gates_for(gt.ndim).auc_nm]
    return {"auc": aucs, "mean_auc": float(np.mean(aucs)), "table": table}


def f1_threshold(pairs: list[tuple[pd.DataFrame, Points, Geometry]]) -> float:
    """The score cut maximising F1 at the F1 gate over (table, truth, geometry) pairs at once.

    The stores pool in um, so their pixel sizes may differ.

    Parameters
    ----------
    pairs : list of tuple
        (table, truth, geometry) per store: a localisation table (px, planes) with
        ``score``, its truth as ``Points`` (um) and the store's ``Geometry``; all of one
        dimension.

    Returns
    -------
    float
        The cut (``best_f1_threshold`` at ``gates_for(ndim).f1_nm``), in the detector's
        score units.
    """
    pred = Points.concat([geom.points(table, gt.n_frames) for table, gt, geom in pairs])
    gt = Points.concat([gt for _, gt, _ in pairs])
    score = np.concatenate([table["score"].to_numpy(np.float64) for table, _, _ in pairs])
    return best_f1_threshold(pred, score, gt, gates_for(gt.ndim).f1_nm / 1000.0)


def operating_point(detector: Detector, images: np.ndarray, gt: Points, geom: Geometry) -> float:
    """The score cut maximising F1 on tuning data, for a detector as it is.

    Parameters
    ----------
    detector : Detector
        Any detector.
    images : ndarray
        Tuning images (N, H, W), or stacks (N, Z, H, W) for a 3D detector.
    gt : Points
        Their truth (um).
    geom : Geometry
        The tuning store's geometry.

    Returns
    -------
    float
        ``f1_threshold`` of the detector's table, in its score units.
    """
    return f1_threshold([(detector.detect(images), gt, geom)])


def tune_trackpy(images: np.ndarray, gt: Points, geom: Geometry, grid: dict | None = None):
    """Grid search of TrackPy maximising the mean PR-AUC over the gates on tuning data.

    TrackPy 2D on images, TrackPy 3D (a ``diameter_z``) on stacks.  Settings whose
    ``diameter_z`` is wider than the stack are skipped.

    Parameters
    ----------
    images : ndarray
        Tuning images (N, H, W), or stacks (N, Z, H, W) when ``geom`` has a z step.
    gt : Points
        Their truth (um).
    geom : Geometry
        The tuning store's geometry.
    grid : dict, optional
        ``Params`` field -> values to try, replacing those of
        ``models.detectors.trackpy.default_grid(geom.ndim)``.

    Returns
    -------
    detector : TrackPyDetector
        The best setting, labelled ``LABEL`` or ``LABEL_3D``, with its F1 threshold (a
        mass) chosen on the same data as its ``threshold``.
    results : list of dict
        Every grid point tried: its parameters, ``auc`` (per gate) and ``mean_auc``.

    Raises
    ------
    FactoryError
        No setting of the grid fits the stacks.
    """
    from models.detectors.trackpy import LABEL, LABEL_3D, Params, TrackPyDetector, default_grid

    grid = {**default_grid(geom.ndim), **(grid or {})}
    keys = list(grid)
    results, best, best_score, best_table = [], None, -1.0, None
    for values in itertools.product(*(grid[k] for k in keys)):
        params = Params(**dict(zip(keys, values)))
        if params.diameter_z is not None and params.diameter_z > images.shape[1] + (1 - images.shape[1] % 2):
            continue  # wider than the stack
        v = validate(TrackPyDetector(params), images, gt, geom)
        results.append({**params.model_dump(), "auc": v["auc"], "mean_auc": v["mean_auc"]})
        log.info("trackpy %s: mean AUC %.3f", params, v["mean_auc"])
        if v["mean_auc"] > best_score:
            best, best_score, best_table = params, v["mean_auc"], v["table"]
    if best is None:
        raise FactoryError(f"no TrackPy setting fits stacks of {images.shape[1]} planes")
    det = TrackPyDetector(best, f1_threshold([(best_table, gt, geom)]), label=LABEL_3D if geom.ndim == 3 else LABEL)
    return det, results


def tune_user_pipeline(frames: np.ndarray, gt: Points, pixel_size_um: float, sigma_xy_um: float,
                       search_range_px: float):
    """The TrackPy user pipeline's diameter and ``minmass`` that maximise F1 on a tuning movie.

    The diameter is odd (px, at least 3), from 2.5 to 4.5 PSF sigmas: where a user
    looking at the spots would set it.  For each, ``minmass`` is the F1 threshold of its masses.

    Parameters
    ----------
    frames : ndarray
        A tuning movie (N, H, W), as its recording holds it (``user_locate``).
    gt : Points
        Its truth (um).
    pixel_size_um : float
        The pixel size (um).
    sigma_xy_um : float
        The lateral PSF sigma (um).
    search_range_px : float
        The linking radius (px) of the pipeline returned.

    Returns
    -------
    UserPipeline
        The diameter and ``minmass`` with the highest F1 at the F1 gate, and
        ``search_range_px``.
    """
    from models.detectors.trackpy import UserPipeline, user_locate

    geom = Geometry(pixel_size_um)
    s = sigma_xy_um / pixel_size_um
    lo, hi = max(3, int(round(2.5 * s)) | 1), max(3, int(round(4.5 * s)) | 1)
    gate_um = gates_for(2).f1_nm / 1000.0
    best = (-1.0, lo, 0.0)
    for d in range(lo, hi + 1, 2):
        f = user_locate(frames, d, 0.0)
        table = pd.DataFrame({"frame": f["frame"].to_numpy(np.int64), "x": f["x"], "y": f["y"], "score": f["mass"]})
        cut = f1_threshold([(table, gt, geom)])
        pred = geom.points(table, gt.n_frames).select(table["score"].to_numpy() >= cut)
        f1, _ = f1_rmse(pred, gt, gate_um)
        log.info("trackpy user pipeline: diameter %d, minmass %.1f: F1 %.3f", d, cut, f1)
        if f1 > best[0]:
            best = (f1, d, cut)
    return UserPipeline(diameter=best[1], minmass=best[2], search_range_px=search_range_px)
