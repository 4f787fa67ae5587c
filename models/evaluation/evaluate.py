"""The evaluator: one code path for every detector and for users' CSV files.

``evaluate_stores`` is `factory evaluate`.  It writes into a run folder:

- ``metrics.json``: ``{"datasets": {name: {"auc": {"70": .., "140": .., "210": ..},
  "f1_integral", "f1", "rmse_nm", "rmse_px", "n_images", ...}}, "pooled": {...}}``
  (stacks: ``rmse_xy_nm``, ``rmse_z_nm`` in place of ``rmse_px``)
- ``table.md``: Table 1 of the seed paper with the paper's rows beside ours (images;
  also as ``table.csv``), and the other metrics
- ``pr_<dataset>.png``: the PR curves at the gates
- ``predictions_<dataset>.csv``: the localisation table that was scored
- ``tracks_<dataset>.csv`` (movie stores) and ``trackpy.json`` (TrackPy's parameters)
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from factory.errors import FactoryError, StoreError
from factory.stores import Store, find_stores, is_store_path
from loaders.datasets import store_targets

from models.detectors.base import COLUMNS, Detector
from models.evaluation.fields import MovieTruth, score_particles, summarise
from models.evaluation.metrics import GATES_NM, Gates, Points, evaluate_points, gate_key, gates_for, nm_to_px, pr_curve
from models.evaluation.truth import Geometry, dataset_diffusion, geometry, targets_of, truth
from models.recordings.predict import load_detector
from models.tracking.timing import ScanTiming, time_stamps
from models.tracking.tracks import (blur_r, d_errors, diffusion_table, link, max_diffusion, score_tracks, search_range_px,
                                    truth_tracks)

# A user's table of stack localisations: z in um from the first plane.
STACK_COLUMNS = ("frame", "x", "y", "z_um", "score")

log = logging.getLogger(__name__)

# Table 1 of the seed paper: AUC at 70 / 140 / 210 nm for D = 0.75, 1.0, 1.75 um^2/s.
PAPER_ROWS = {
    "TrackPy (paper)": {0.75: (0.06, 0.42, 0.73), 1.0: (0.04, 0.30, 0.61), 1.75: (0.02, 0.19, 0.47)},
    "Keypoint R-CNN (paper)": {0.75: (0.48, 0.91, 0.99), 1.0: (0.41, 0.87, 0.98), 1.75: (0.26, 0.72, 0.92)},
}


def find_test_stores(data: Path, names: list[str] | None = None) -> list[Path]:
    """Test stores of a data folder: the named ones, or every ``test*`` store.

    Parameters
    ----------
    data : Path
        A folder of stores, or one store (returned as it is, ``names`` unused).
    names : list of str, optional
        Store names (without suffix) to return, in this order.

    Returns
    -------
    list of Path
        The stores' paths.

    Raises
    ------
    StoreError
        No such folder, no store of a given name, or no ``test*`` store.
    """
    data = Path(data)
    if not data.exists():
        raise StoreError(f"{data}: no such data folder or store")
    if is_store_path(data):
        return [data]
    stores = {p.stem: p for p in find_stores(data)}
    if names:
        missing = [n for n in names if n not in stores]
        if missing:
            raise StoreError(f"{data}: no store named {missing[0]} (have: {', '.join(stores) or 'none'})")
        return [stores[n] for n in names]
    tests = [p for n, p in stores.items() if n.startswith("test")]
    if not tests:
        raise StoreError(f"{data}: no test stores (test*.h5 / test*.zarr); build datasets.yaml first")
    return tests


def read_predictions_csv(path: Path, n_frames: int | None = None, columns=COLUMNS) -> pd.DataFrame:
    """A user's localisation table, checked: columns, types, frame range.

    Parameters
    ----------
    path : Path
        The CSV file.
    n_frames : int, optional
        Frames (images or stacks) of the store it is scored against: ``frame`` must lie in
        ``0 .. n_frames - 1``.
    columns : sequence of str
        The columns required: ``COLUMNS`` (``frame, x, y, score``, px) or for stacks
        ``STACK_COLUMNS`` (``frame, x, y, z_um, score``).

    Returns
    -------
    pandas.DataFrame
        The table, ``frame`` as int64.

    Raises
    ------
    FactoryError
        No such file, not a CSV table, a column missing, not numeric or not finite,
        ``frame`` not integer or out of range.
    """
    path = Path(path)
    if not path.exists():
        raise FactoryError(f"{path}: no such file")
    try:
        table = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise FactoryError(f"{path}: not a readable CSV table ({str(exc).splitlines()[0]})") from None
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise FactoryError(f"{path}: missing column(s) {', '.join(missing)} "
                           f"(need {', '.join(columns)}; have {', '.join(map(str, table.columns))})")
    for col in columns:
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


def score_table(table: pd.DataFrame, gt: Points, geom: Geometry, threshold: float | None = None,
                gates: Gates | None = None) -> dict:
    """``evaluate_points`` on a detector's table against truth in um, with the store's geometry.

    Parameters
    ----------
    table : pandas.DataFrame
        A localisation table (``frame, x, y`` px, stacks ``z`` planes or ``z_um``, and
        ``score``).
    gt : Points
        The truth (um).
    geom : Geometry
        The store's pixel size (and z step).
    threshold : float, optional
        The score cut of F1, the F1 integral and the RMSE.
    gates : Gates, optional
        Default: those of the truth's dimension.

    Returns
    -------
    dict
        ``evaluate_points``' metrics with ``pixel_size_um``, and for images the RMSE in
        pixels (``rmse_px``), for stacks ``z_step_um``.
    """
    m = evaluate_points(geom.points(table, gt.n_frames), table["score"].to_numpy(np.float64), gt, threshold, gates)
    return {**m, **_geometry_keys(m, [geom])}


def _geometry_keys(m: dict, geoms: list[Geometry]) -> dict:
    """The geometry keys of metrics over ``geoms``: each None where the stores differ.

    ``pixel_size_um`` where every store has the same pixel size, and for images
    ``rmse_px`` with it; for stacks ``z_step_um`` where every store has the same step.
    """
    px = {g.pixel_size_um for g in geoms}
    one = px.pop() if len(px) == 1 else None
    out = {"pixel_size_um": one}
    if geoms[0].ndim == 2:
        out["rmse_px"] = m["rmse_nm"] / (1000.0 * one) if one is not None else None
    else:
        dz = {g.z_step_um for g in geoms}
        out["z_step_um"] = dz.pop() if len(dz) == 1 else None
    return out


def pooled_metrics(tables: list[pd.DataFrame], gts: list[Points], geoms: list[Geometry],
                   threshold: float | None, gates: Gates | None = None) -> dict:
    """All test sets scored as one (frames renumbered), in um.

    The gates keep their physical size in every store, whatever its pixel size
    (``rmse_px`` is None where the pixel sizes differ).

    Parameters
    ----------
    tables : list of pandas.DataFrame
        A localisation table (px, planes) per store.
    gts : list of Points
        Each store's truth (um).
    geoms : list of Geometry
        Each store's geometry.
    threshold : float or None
        The score cut of F1, the F1 integral and the RMSE (None: every localisation).
    gates : Gates, optional
        Default: those of the truths' dimension.

    Returns
    -------
    dict
        As ``score_table``; ``pixel_size_um`` (and ``z_step_um``) None where the stores
        differ.
    """
    pred = Points.concat([g.points(t, gt.n_frames) for t, gt, g in zip(tables, gts, geoms)])
    score = np.concatenate([t["score"].to_numpy(np.float64) for t in tables])
    m = evaluate_points(pred, score, Points.concat(gts), threshold, gates)
    return {**m, **_geometry_keys(m, geoms)}


def plot_pr(table: pd.DataFrame, gt: Points, geom: Geometry, title: str, out: Path, gates: Gates) -> None:
    """The PR curves at each gate of one test set (images or stacks).

    Parameters
    ----------
    table : pandas.DataFrame
        The localisation table (px, planes) with ``score``.
    gt : Points
        The truth (um).
    geom : Geometry
        The store's geometry.
    title : str
        The figure's title.
    out : Path
        The image file written (PNG).
    gates : Gates
        One curve per PR-AUC gate (nm).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pred = geom.points(table, gt.n_frames)
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    for gate in gates.auc_nm:
        p, r = pr_curve(pred, table["score"].to_numpy(np.float64), gt, gate / 1000.0)
        ax.plot(np.r_[0, r], np.r_[p[:1], p] if len(p) else [0], label=f"{gate_key(gate)} nm")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=9)
    ax.legend(title="gate (3D distance)" if gt.ndim == 3 else "gate", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def table1(rows: dict[str, dict[str, dict]], diffusions: dict[str, float | None],
           gates_nm=GATES_NM) -> tuple[str, pd.DataFrame]:
    """Table 1 as markdown and as a DataFrame.

    The paper's rows are filled in where the gates are the paper's and a store's D
    matches one of its columns.

    Parameters
    ----------
    rows : dict
        Row label -> dataset -> metrics (``auc`` by gate key); labels in ``PAPER_ROWS``
        take the paper's values.
    diffusions : dict
        Dataset -> its fixed D (um^2/s), or None (the column is headed by its name).
    gates_nm : sequence of float
        The PR-AUC gates (nm) shown per dataset.

    Returns
    -------
    markdown : str
        The table, one column per dataset and gate.
    table : pandas.DataFrame
        One record per detector, dataset and gate: ``detector``, ``dataset``,
        ``diffusion_um2_s``, ``eps_nm``, ``auc`` (None where not scored).
    """
    keys = [gate_key(g) for g in gates_nm]
    paper_gates = tuple(keys) == tuple(gate_key(g) for g in GATES_NM)
    datasets = list(diffusions)
    cols = [(name, diffusions[name]) for name in datasets]
    header1 = ["D (um^2/s)"] + sum([[f"{d:g}" if d is not None else name] + [""] * (len(keys) - 1)
                                    for name, d in cols], [])
    header2 = ["eps (nm)"] + keys * len(cols)
    lines = ["| " + " | ".join(header1) + " |", "|" + " --- |" * len(header1), "| " + " | ".join(header2) + " |"]
    records = []
    for label, per in rows.items():
        cells = []
        for name, d in cols:
            if label in PAPER_ROWS:
                vals = PAPER_ROWS[label].get(d) if paper_gates else None
                vals = list(vals) if vals else [None] * len(keys)
            else:
                m = per.get(name)
                vals = [m["auc"].get(k) for k in keys] if m else [None] * len(keys)
            cells += vals
            for gate, v in zip(keys, vals):
                records.append({"detector": label, "dataset": name, "diffusion_um2_s": d,
                                "eps_nm": float(gate), "auc": v})
        lines.append("| " + " | ".join([label] + ["" if v is None else f"{v:.2f}" for v in cells]) + " |")
    return "\n".join(lines) + "\n", pd.DataFrame.from_records(records)


def metrics_table(rows: dict[str, dict[str, dict]]) -> str:
    """Markdown: per detector and test set, the AUC at each gate, F1 integral, F1 and RMSE.

    The RMSE split into xy and z for stacks; any kind of store.

    Parameters
    ----------
    rows : dict
        Row label -> test set -> metrics (``score_table``), of one kind of store; the first
        set's gates and kind head the table.

    Returns
    -------
    str
        The table (RMSE in nm; the number of images or stacks scored), or
        ``"(no test set scored)"``.
    """
    first = next((m for per in rows.values() for m in per.values()), None)
    if first is None:
        return "(no test set scored)"
    gates = list(first["auc"])
    stacks = "rmse_z_nm" in first
    head = (["detector", "test set"] + [f"AUC {g} nm" for g in gates]
            + ["F1 integral", f"F1 ({first['f1_gate_nm']:g} nm)", "RMSE (nm)"]
            + (["RMSE xy (nm)", "RMSE z (nm)"] if stacks else []) + ["stacks" if stacks else "images"])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for label, per in rows.items():
        for name, m in per.items():
            cells = ([label, name] + [f"{m['auc'].get(g, float('nan')):.3f}" for g in gates]
                     + [f"{m['f1_integral']:.3f}", f"{m['f1']:.3f}", f"{m['rmse_nm']:.1f}"]
                     + ([f"{m['rmse_xy_nm']:.0f}", f"{m['rmse_z_nm']:.0f}"] if stacks else [])
                     + [str(m["n_images"])])
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_evaluation(out: Path, label: str, tables: dict[str, pd.DataFrame], data_paths: dict[str, Path],
                     threshold: float | None = None, extra: dict | None = None, gates_nm=None,
                     target: str = "centroid") -> dict:
    """Score ``tables`` and write the run folder, for images, movies and stacks alike.

    ``datasets`` holds the scores against the detector's own ``target``; ``by_target``
    the scores against every truth the store holds (centroid and exposure).

    Parameters
    ----------
    out : Path
        The run folder (created): ``metrics.json``, ``table.md``, for images
        ``table.csv``, and per dataset ``pr_<dataset>.png`` and ``predictions_<dataset>.csv``
        (for stacks with ``z_um`` in place of ``z``).
    label : str
        The detector's label.
    tables : dict
        Dataset -> localisation table (px, planes).
    data_paths : dict
        Dataset -> its store's path.
    threshold : float, optional
        The score cut of F1, the F1 integral and the RMSE.
    extra : dict, optional
        Added to ``metrics.json`` (e.g. ``detect_seconds``, dataset -> s).
    gates_nm : sequence of float, optional
        PR-AUC gates (nm); default: those of the stores' dimension.
    target : {"centroid", "exposure"}
        The detector's own truth; a store without it is scored against centroids.

    Returns
    -------
    dict
        What ``metrics.json`` holds: ``kind``, ``detector``, ``target``, ``threshold``,
        ``gates_nm``, ``datasets``, ``by_target``, ``pooled`` (several datasets) and
        ``extra``'s keys.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics, gts, geoms, diffusions, by_target, kinds = {}, [], [], {}, {}, set()
    for name, table in tables.items():
        with Store(data_paths[name]) as st:
            available = targets_of(st)
            own = target if target in available else "centroid"
            truths = {t: truth(st, t) for t in available}
            diffusions[name] = dataset_diffusion(st)
            geom = geometry(st)
            kinds.add(st.kind)
        gates = gates_for(geom.ndim, gates_nm)
        by_target[name] = {t: score_table(table, g, geom, threshold, gates) for t, g in truths.items()}
        metrics[name] = {**by_target[name][own], "target": own}
        gts.append(truths[own])
        geoms.append(geom)
        plot_pr(table, truths[own], geom, f"{label}: {name}", out / f"pr_{name}.png", gates)
        geom.with_z_um(table).to_csv(out / f"predictions_{name}.csv", index=False)
    kind = "stacks" if "stacks" in kinds else "images"
    result = {"kind": kind, "detector": label, "target": target, "threshold": threshold,
              "gates_nm": list(gates.auc_nm), "datasets": metrics, "by_target": by_target}
    if len(tables) > 1:
        result["pooled"] = pooled_metrics(list(tables.values()), gts, geoms, threshold, gates)
    result.update(extra or {})
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    text = metrics_table({label: metrics}) + "\n"
    if kind == "images":
        md, df = table1({"TrackPy (paper)": {}, "Keypoint R-CNN (paper)": {}, label: metrics}, diffusions,
                        gates.auc_nm)
        text = md + "\n" + text
        df.to_csv(out / "table.csv", index=False)
    (out / "table.md").write_text(text)
    return result


def evaluate_tracks(table: pd.DataFrame, store: Store, target: str, stamps: str,
                    threshold: float | None) -> tuple[pd.DataFrame, dict]:
    """Link each movie's localisations and score links and D per track against the store's truth.

    Localisations above ``threshold`` are time-stamped, linked per movie, and D is
    estimated per track; links and D are scored against the store's truth of ``target``
    (a localisation matches a particle within 210 nm); the same for the true positions as
    tracks (the floor).

    Parameters
    ----------
    table : pandas.DataFrame
        The detector's localisation table of the whole store (px).
    store : Store
        An open movie store with ``exposure_t_s``.
    target : {"centroid", "exposure"}
        The truth scored against.
    stamps : {"scan", "frame"}
        The detector's time stamps (``Detector.timestamps``).
    threshold : float or None
        The score cut (None: every localisation).

    Returns
    -------
    tracks : pandas.DataFrame
        The linked localisations with ``t_s`` (s), ``movie``, ``frame`` within the movie
        and ``track`` (ids unique over the store).
    scores : dict
        ``target``, ``search_range_px``, ``blur_r``, ``links``, ``particles``
        (``fields.summarise``), ``links_between_matched``, ``correct_link_fraction``,
        ``links_to_unmatched_fraction``, ``correct_link_fraction_truth_positions`` (the
        true positions linked the same way: the linker's floor), ``d`` and
        ``d_floor_truth_positions`` (``models.tracking.tracks.d_errors``; None where
        empty).
    """
    ds = store.dataset
    F = ds.movie.n_frames
    h, w = store["images"].shape[1:]
    px = ds.image.pixel_size_um
    timing = ScanTiming.of_dataset(ds, str(store.path))
    period = timing.frame_period_s(h, w)
    r = blur_r(stamps, period, timing.line_period_s(w), timing.active_s(h, w), ds.psf.sigma_xy_um, px)
    search = search_range_px(max_diffusion(ds), period, px)
    gate = nm_to_px(max(GATES_NM), px)
    truth_all = store_targets(store, target)
    diffusion = store.read("diffusion")
    starts = store.read("frame_start_s")
    t_centroid = timing.centroid_t_s(starts, h, w, diffusion.shape[1])
    t_truth = store.read("exposure_t_s") if target == "exposure" else t_centroid
    if threshold is not None:
        table = table[table["score"] >= threshold]
    table = table.assign(t_s=time_stamps(table, h, w, timing, stamps, starts), movie=table["frame"] // F)
    links = matched = correct = 0
    floor_links = [0, 0]  # links between matched points, correct ones: the true positions linked alike
    ests, floors, linked_all, particles = [], [], [], []
    rows = {k: store.read(k) for k in ("centroids", "exposure_xy", "in_view", "n_particles", "diffusion", "exposure_t_s")
            + (("on_fraction",) if "on_fraction" in store else ())}
    r_centroid = blur_r("frame", period, timing.line_period_s(w), timing.active_s(h, w), ds.psf.sigma_xy_um, px)
    movies = range(len(store) // F)
    linked_of = [link(table[table["movie"] == m].assign(frame=lambda d: d["frame"] - m * F), search) for m in movies]
    # D over the whole store at once: the localisation error is pooled over its movies
    # (one microscope), as `factory track` does on a store.
    d_all = diffusion_table(pd.concat(linked_of, ignore_index=True), px, r) if linked_of else None
    for m in movies:
        a, b = m * F, (m + 1) * F
        linked = linked_of[m]
        counts, est = score_tracks(linked, truth_all[a:b], diffusion[a], gate, px, r,
                                   d_all[d_all["movie"] == m].drop(columns="movie"))
        particles.append(score_particles(linked, est, MovieTruth.of_rows(rows, a, b, t_centroid), px, r_centroid)
                         .assign(movie=m))
        linked_all.append(linked.assign(track=linked["track"] + 1_000_000 * m))
        links += counts["links"]
        matched += counts["matched_links"]
        correct += counts["correct_links"]
        ests.append(est)
        # The linker's own floor: the true positions, every particle in view in every
        # frame, linked the same way.  What it gets wrong is particles that come closer
        # than their steps, which no localiser removes.
        f_in, p_in = np.nonzero(np.isfinite(truth_all[a:b]).all(-1))
        as_found = pd.DataFrame({"frame": f_in, "x": truth_all[a + f_in, p_in, 0], "y": truth_all[a + f_in, p_in, 1],
                                 "t_s": t_truth[a + f_in, p_in]})
        floor_counts, _ = score_tracks(link(as_found, search), truth_all[a:b], diffusion[a], gate, px, r)
        floor_links[0] += floor_counts["matched_links"]
        floor_links[1] += floor_counts["correct_links"]
        tt = truth_tracks(truth_all[a:b], t_truth[a:b])
        fl = diffusion_table(tt, px, r, estimator="cve")  # the floor: the CVE on the true positions
        fl["true_D_um2_s"] = np.asarray([diffusion[a, tt[tt.track == k]["slot"].iloc[0]] for k in fl["track"]],
                                        np.float64)
        floors.append(fl)
    est = pd.concat(ests, ignore_index=True) if ests else pd.DataFrame()
    floor = pd.concat(floors, ignore_index=True) if floors else pd.DataFrame()
    tracks = pd.concat(linked_all, ignore_index=True) if linked_all else pd.DataFrame()
    per_particle = pd.concat(particles, ignore_index=True) if particles else pd.DataFrame()
    return tracks, {"target": target, "search_range_px": search, "blur_r": r, "links": links,
                    "particles": summarise(per_particle),
                    "links_between_matched": matched,
            "correct_link_fraction": correct / matched if matched else None,
            "correct_link_fraction_truth_positions": floor_links[1] / floor_links[0] if floor_links[0] else None,
            "links_to_unmatched_fraction": (links - matched) / links if links else None,
            "d": d_errors(est) if len(est) else None, "d_floor_truth_positions": d_errors(floor) if len(floor) else None}


def evaluate_detector(detector: Detector, data: Path, out: Path, names: list[str] | None = None,
                      progress: bool = True, extra: dict | None = None, gates_nm=None) -> dict:
    """Run ``detector`` on the test stores of ``data`` and write the run folder.

    Images, movies or stacks; a movie store's tracks and D per track are scored too
    (``evaluate_tracks``, stores with ``exposure_t_s``).

    Parameters
    ----------
    detector : Detector
        The detector, its ``threshold`` the F1 cut.
    data : Path
        A folder of stores or one store (``find_test_stores``).
    out : Path
        The run folder (``write_evaluation``; also ``tracks_<dataset>.csv``).
    names : list of str, optional
        Only these stores.
    progress : bool
        Progress bars (stderr).
    extra : dict, optional
        Added to ``metrics.json``, with ``detect_seconds`` (s per store).
    gates_nm : sequence of float, optional
        PR-AUC gates (nm).

    Returns
    -------
    dict
        What ``metrics.json`` holds (``write_evaluation``).

    Raises
    ------
    FactoryError
        A 2D detector on stack stores or a 3D one on images.
    StoreError
        Missing or unreadable stores.
    """
    paths = {p.stem: p for p in find_test_stores(data, names)}
    tables, seconds = {}, {}
    for name, path in paths.items():
        with Store(path) as st:
            _check_dimension(detector, st)
            images = st.read("images")
        t0 = time.perf_counter()
        tables[name] = detector.detect(images, progress=progress)
        seconds[name] = time.perf_counter() - t0
        log.info("%s on %s: %d localisations in %.1f s", detector.name, name, len(tables[name]), seconds[name])
    extra = {**(extra or {}), "detect_seconds": seconds}
    tracks = {}
    target = detector.target
    for name, path in paths.items():
        with Store(path) as st:
            if st.kind == "movies" and "exposure_t_s" in st:
                linked, tracks[name] = evaluate_tracks(tables[name], st,
                                                       target if target in targets_of(st) else "centroid",
                                                       detector.timestamps, detector.threshold)
                Path(out).mkdir(parents=True, exist_ok=True)
                linked.to_csv(Path(out) / f"tracks_{name}.csv", index=False)
    if tracks:
        extra["tracks"] = tracks
    return write_evaluation(out, detector.label, tables, paths, detector.threshold, extra, gates_nm,
                            detector.target)


def _check_dimension(detector: Detector, st: Store) -> None:
    if (detector.ndim == 3) != (st.kind == "stacks"):
        have = "z-stacks" if st.kind == "stacks" else "images"
        raise FactoryError(f"{st.path}: holds {have}; {detector.label} scores "
                           f"{'z-stacks' if detector.ndim == 3 else 'images'}"
                           + (" (train dmdetnet3d)" if st.kind == "stacks" else " (give stack stores)"))


# --- the test stores of a data folder in, a scored run folder out: `factory evaluate` ------

# What ``evaluate_stores`` writes into its folder (glob patterns).
EVALUATION_FILES = ("metrics.json", "table.md", "table.csv", "pr_*.png", "predictions_*.csv", "tracks_*.csv",
                    "trackpy.json")


def evaluate_stores(data: str | Path, out: str | Path, *, detector: str | None = None, model: str | Path | None = None,
                    predictions: str | Path | None = None, datasets: list[str] | None = None,
                    params: str | Path | None = None, tune_on: str = "val", tune_images: int = 600,
                    threshold: float | None = None, gates_nm=None, target: str = "centroid",
                    precision: str = "float32", progress: bool = True,
                    report: Callable[[str], None] | None = None) -> dict:
    """Score a detector on the test stores of a data folder (`factory evaluate`).

    Images: the seed paper's PR-AUC at ``gates_nm``, deepBlink's F1 integral, F1 and RMSE
    at 140 nm, Table 1 beside the paper's rows; a movie store's tracks and D per track
    too.  z-stacks (stack stores): the 3D metrics.  Writes ``EVALUATION_FILES`` into
    ``out``: ``metrics.json``, ``table.md``, ``table.csv``, ``pr_<dataset>.png``, the
    localisations scored (``predictions_<dataset>.csv``), ``tracks_<dataset>.csv`` and
    the tuned TrackPy parameters.

    Parameters
    ----------
    data : str or Path
        A folder of stores (its ``test*`` stores are scored) or one store.
    out : str or Path
        The folder to write into (created).
    detector : {"trackpy", "trackpy-paper"}, optional
        A built-in detector: TrackPy tuned on ``tune_on``, or with the seed paper's
        settings (diameter 7, separation 7, no preprocessing; its F1 threshold chosen on
        ``tune_on``).  z-stacks: ``"trackpy"`` (TrackPy 3D, tuned on ``tune_on``).
    model : str or Path, optional
        A trained model's run folder (what ``models.recordings.predict.load_detector`` takes); a
        model with a head per target is scored with its ``target`` head.
    predictions : str or Path, optional
        A CSV to score against ``data`` (one store): ``frame, x, y, score`` (z-stacks:
        ``frame, x, y, z_um, score``), pixel-centre origin.
    datasets : list of str, optional
        Score only these stores of ``data``.
    params : str or Path, optional
        TrackPy parameters (a ``trackpy.json`` of an earlier run, with its threshold): no
        tuning.
    tune_on : str
        The store of ``data`` TrackPy is tuned on (never a test set).
    tune_images : int
        Images of ``tune_on`` used for tuning.
    threshold : float, optional
        With ``predictions``: the score cut for F1 (default: every row counts).
    gates_nm : sequence of float, optional
        Distance gates of the PR-AUC (nm), compared in um: the same physical distance in
        every store, whatever its pixel size.  Default: Table 1's 70, 140, 210 nm for
        images; 100, 200, 300 nm for stacks.
    target : {"centroid", "exposure"}
        TrackPy and ``predictions``: the truth tuned on and first scored against.  Every
        store is also scored against each truth it holds.
    precision : {"float32", "int8", "auto"}
        A trained model's inference arithmetic (``models.training.runs.RunFolder.detector``).
    progress : bool
        Progress bars (stderr).
    report : callable, optional
        Receives the line saying what TrackPy is tuned on; default: this module's
        logger at INFO.

    Returns
    -------
    dict
        What ``metrics.json`` holds: ``datasets`` (per store: ``auc`` by gate in nm,
        ``f1_integral``, ``f1``, ``rmse_nm``, ...), ``pooled`` over several stores,
        ``tracks`` for movie stores, the detector and its settings.

    Raises
    ------
    FactoryError
        Not exactly one of ``detector``, ``model`` and ``predictions``; bad stores,
        files or settings; in one line.
    """
    chosen = [x for x in (detector, model, predictions) if x is not None]
    if len(chosen) != 1:
        raise FactoryError("give exactly one of --detector, --model or --predictions")
    if threshold is not None and not math.isfinite(threshold):
        raise FactoryError(f"--threshold {threshold}: a score cut must be a finite number")
    say = report or log.info
    data, out = Path(data), Path(out)
    predictions = None if predictions is None else Path(predictions)
    stores = find_test_stores(data, datasets)
    stacks = _stack_stores(stores)
    if predictions is not None:
        if len(stores) != 1:
            raise FactoryError(f"{data}: --predictions scores one store; pick it with --datasets NAME "
                               f"(found {', '.join(p.stem for p in stores)})")
        with Store(stores[0]) as st:
            n = len(st)
        table = read_predictions_csv(predictions, n, STACK_COLUMNS if stacks else COLUMNS)
        return write_evaluation(out, predictions.stem, {stores[0].stem: table}, {stores[0].stem: stores[0]},
                                threshold, gates_nm=gates_nm, target=target)
    if detector is not None:
        if stacks and detector != "trackpy":
            raise FactoryError(f"--detector {detector}: z-stacks have one built-in detector, trackpy "
                               "(TrackPy 3D, tuned on --tune-on)")
        if detector not in ("trackpy", "trackpy-paper"):
            raise FactoryError(f"--detector {detector}: unknown (built-in: trackpy, trackpy-paper; "
                               "trained networks: --model RUN_DIR)")
        det = _trackpy_detector(data, out, params, tune_on, tune_images, say, paper=detector == "trackpy-paper",
                                target=target)
        return evaluate_detector(det, data, out, datasets, progress=progress,
                                 extra={"params": det.params.model_dump()}, gates_nm=gates_nm)
    det = load_detector(model, prefer=target, precision=precision)
    return evaluate_detector(det, data, out, datasets, progress=progress,
                             extra={"model": str(model), "precision": getattr(det, "precision", None)},
                             gates_nm=gates_nm)


def _stack_stores(stores: list[Path]) -> bool:
    """Whether the test stores are z-stacks (all of them) or images (none)."""
    kinds = {}
    for p in stores:
        with Store(p) as st:
            kinds[p] = st.kind == "stacks"
    if len(set(kinds.values())) > 1:
        raise FactoryError(f"{', '.join(str(p) for p in stores)}: mixes z-stacks and images; "
                           "score them in separate runs (--datasets)")
    return any(kinds.values())


def _trackpy_detector(data: Path, out: Path, params: str | Path | None, tune_on: str, tune_images: int,
                      say: Callable[[str], None], paper: bool = False, target: str = "centroid"):
    """The TrackPy baseline (2D on images, 3D on stacks): given parameters, the paper's, or tuned on a non-test store.

    Given parameters (``params``, a ``trackpy.json``) come with the threshold saved in
    that file; otherwise the F1 threshold (a mass) is chosen on the tuning store and the
    detector is saved as ``out / "trackpy.json"``.
    """
    from models.detectors.trackpy import PAPER, PAPER_LABEL, TrackPyDetector
    from models.evaluation.tuning import operating_point, tune_trackpy

    if params is not None:
        det = TrackPyDetector.from_json(params)
        det.target = target
        return det
    if tune_on.startswith("test"):
        raise FactoryError(f"--tune-on {tune_on}: tuning on a test set would leak it into the score")
    path = find_test_stores(data, [tune_on])[0]
    with Store(path) as st:
        n = min(tune_images, len(st))
        images, gt, geom = st.read("images", 0, n), truth(st, target, 0, n), geometry(st)
    what = "stacks" if geom.ndim == 3 else "images"
    if paper:
        det = TrackPyDetector(PAPER, label=PAPER_LABEL)
        det.threshold = operating_point(det, images, gt, geom)
        info = {"threshold_tuned_on": str(path), "tune_images": n, "target": target}
    else:
        say(f"tuning TrackPy{' 3D' if geom.ndim == 3 else ''} on {path} ({n} {what}, {target} target)...")
        det, grid = tune_trackpy(images, gt, geom)
        info = {"tuned_on": str(path), "tune_images": n, "target": target, "grid": grid}
        if target == "exposure":
            det.label = f"{det.label[:-1]}, exposure target)"
    det.target = target
    out.mkdir(parents=True, exist_ok=True)
    det.save(out / "trackpy.json", info)
    return det
