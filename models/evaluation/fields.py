"""Scores per particle on real-size fields.

Of the particles a movie shows, how many a pipeline tracks, and for how many it gets D
right.

Link counts (``tracks.score_tracks``) say how clean the tracks are; what a user
publishes is a D per particle.  So every particle in view for at least
``MIN_FRAMES_IN_VIEW`` consecutive frames (and, when it blinks, on in at least half of
them) is scored: it has a matched track when at least ``MATCH_SHARE`` of a track's
points lie within ``MATCH_PX`` of its centroid or of where the laser saw it (exposure
position) in the same frame; its D is that of its longest matched track with a D; that D
is right when within a factor ``D_FACTOR`` of the truth.  The floor is the CVE on the
particle's true centroids over the same run of frames, less the frames a blinking
particle spent off (on for less than ``ON_SHARE`` of the frame): what a perfect
localiser and linker would give from what the microscope shows, with the CVE.  The
pooled estimator that tracks get (``models.tracking.diffusion``) does better than the
CVE on a field; its own floor, on all the true centroids of the movie at once, is
reported beside (``floor_pooled_D_um2_s``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from models.tracking.tracks import MATCH_SHARE, diffusion_table

MIN_FRAMES_IN_VIEW = 10
MATCH_PX = 3.0
D_FACTOR = 1.5
ON_SHARE = 0.5  # a blinking particle counts as visible in a frame when on for half of it


@dataclass
class MovieTruth:
    """The truth of one movie, per frame and particle slot (px, pixel-centre origin).

    Attributes
    ----------
    centroids : ndarray
        (F, P, 2) trajectory centroids (x, y) in px; NaN where a particle is not in view.
    exposure_xy : ndarray
        (F, P, 2) exposure-weighted positions (x, y) in px, NaN where not in view.
    centroid_t_s : ndarray
        (F, P) the centroids' times (s).
    exposure_t_s : ndarray
        (F, P) the exposure-weighted times (s).
    diffusion : ndarray
        (P,) each particle's D (um^2/s).
    on_fraction : ndarray or None
        (F, P) the share of the frame a blinking particle was on (None: it never blinks).
    """

    centroids: np.ndarray
    exposure_xy: np.ndarray
    centroid_t_s: np.ndarray
    exposure_t_s: np.ndarray
    diffusion: np.ndarray
    on_fraction: np.ndarray | None = None

    @classmethod
    def of_rows(cls, rows: dict, start: int, stop: int, centroid_t_s: np.ndarray) -> "MovieTruth":
        """One movie (rows ``start .. stop``) of a store's or ``factory.kernel.simulate``'s arrays.

        Parameters
        ----------
        rows : dict
            Array name -> array over rows: ``centroids``, ``exposure_xy``, ``in_view``,
            ``n_particles``, ``diffusion``, ``exposure_t_s``, and ``on_fraction`` where the
            particles blink (absent, or of another shape, otherwise).
        start, stop : int
            The movie's rows (``stop`` excluded).
        centroid_t_s : ndarray
            (N, P) the centroids' times (s) over the same rows as ``rows``.

        Returns
        -------
        MovieTruth
            Positions NaN outside the first ``n_particles`` slots and where ``in_view`` is 0;
            ``diffusion`` of the movie's first row.
        """
        from loaders.datasets import truth_points

        h = w = np.inf  # in_view already says whether a centroid lies in the field
        sl = slice(start, stop)
        c = truth_points(rows["centroids"][sl], rows["n_particles"][sl], rows["in_view"][sl], True, h, w)
        e = truth_points(rows["exposure_xy"][sl], rows["n_particles"][sl], rows["in_view"][sl], True, h, w)
        on = rows.get("on_fraction")  # absent (or a placeholder) when the particles do not blink
        on = np.asarray(on[sl], np.float32) if on is not None and np.shape(on)[:2] == np.shape(rows["in_view"]) else None
        return cls(c.astype(np.float64), e.astype(np.float64), np.asarray(centroid_t_s[sl], np.float64),
                   np.asarray(rows["exposure_t_s"][sl], np.float64), np.asarray(rows["diffusion"][start], np.float64), on)


def longest_run(ok: np.ndarray) -> tuple[int, int]:
    """(start, stop) of the longest run of True in a 1D mask ((0, 0) when none).

    Parameters
    ----------
    ok : ndarray
        A 1D boolean mask.

    Returns
    -------
    tuple of int
        ``stop`` excluded; the first of equally long runs.
    """
    best, a = (0, 0), None
    for i, v in enumerate(np.r_[ok, False]):
        if v and a is None:
            a = i
        elif not v and a is not None:
            if i - a > best[1] - best[0]:
                best = (a, i)
            a = None
    return best


def visible_frames(truth: MovieTruth, particle: int, start: int, stop: int) -> np.ndarray:
    """The frames of ``start .. stop`` (stop excluded) in which ``particle`` can be seen.

    Every frame when it does not blink; else those in which it was on for at least
    ``ON_SHARE`` of the frame.
    """
    f = np.arange(start, stop)
    return f if truth.on_fraction is None else f[truth.on_fraction[f, particle] >= ON_SHARE]


def scored_runs(truth: MovieTruth, min_frames: int = MIN_FRAMES_IN_VIEW) -> dict[int, tuple[int, int]]:
    """The particles scored, each with its longest run of frames in view.

    Parameters
    ----------
    truth : MovieTruth
        The movie's truth.
    min_frames : int
        The shortest run scored (frames).

    Returns
    -------
    dict of int to tuple of int
        Particle slot -> (start, stop) frames of its longest run in view, for runs of at
        least ``min_frames`` in which a blinking particle is on (``ON_SHARE`` of a frame)
        in at least half of the frames.
    """
    inview = np.isfinite(truth.centroids).all(-1)
    out = {}
    for p in range(inview.shape[1]):
        a, b = longest_run(inview[:, p])
        if b - a < min_frames:
            continue
        if len(visible_frames(truth, p, a, b)) < 0.5 * (b - a):
            continue
        out[p] = (a, b)
    return out


def match_tracks(tracks: pd.DataFrame, truth: MovieTruth, match_px: float = MATCH_PX,
                 share: float = MATCH_SHARE) -> dict[int, int]:
    """The particle each track follows (tracks that follow none are left out).

    Parameters
    ----------
    tracks : pandas.DataFrame
        Linked localisations: ``frame`` (of the movie), ``x``, ``y`` (px) and ``track``.
    truth : MovieTruth
        The movie's truth.
    match_px : float
        A point is near a particle within this distance (px) of its centroid or its
        exposure position in the same frame.
    share : float
        A track follows the particle most of its points are near when that is at least
        this share of them.

    Returns
    -------
    dict of int to int
        Track id -> particle slot.
    """
    if len(tracks) == 0:
        return {}
    near = _near(tracks, truth, match_px)
    ids = tracks["track"].to_numpy()
    uniq, inv = np.unique(ids, return_inverse=True)
    counts = np.zeros((len(uniq), near.shape[1]), np.int64)
    np.add.at(counts, inv, near.astype(np.int64))
    n = np.bincount(inv)
    best = counts.argmax(1)
    hit = counts[np.arange(len(uniq)), best] >= share * n
    return {int(t): int(p) for t, p, h in zip(uniq, best, hit) if h}


def _near(points: pd.DataFrame, truth: MovieTruth, match_px: float) -> np.ndarray:
    """Whether each point lies near each particle: (points, P) booleans.

    A point (``frame``, ``x``, ``y``) is near a particle within ``match_px`` of its centroid
    or its exposure position in that frame; a particle not in view (NaN) is never near.
    """
    f = points["frame"].to_numpy(np.int64)
    xy = points[["x", "y"]].to_numpy(np.float64)
    with np.errstate(invalid="ignore"):
        dc = np.hypot(*(xy[:, None, :] - truth.centroids[f]).transpose(2, 0, 1))
        de = np.hypot(*(xy[:, None, :] - truth.exposure_xy[f]).transpose(2, 0, 1))
        return np.fmin(dc, de) <= match_px


def detected_share(localisations: pd.DataFrame, truth: MovieTruth, match_px: float = MATCH_PX) -> dict[int, float]:
    """Each scored particle's share of its visible frames with a localisation near it.

    What the detector saw of a particle, before any linking: a frame of its scored run
    (``scored_runs``; a blinking particle's off frames left out, ``visible_frames``)
    counts when a localisation of that frame lies within ``match_px`` of the particle's
    centroid or exposure position (``match_tracks``'s near).  It separates a particle the
    linker lost from one the microscope hardly shows (far from the focal plane).

    Parameters
    ----------
    localisations : pandas.DataFrame
        One movie's localisations: ``frame``, ``x``, ``y`` (px).
    truth : MovieTruth
        The movie's truth.
    match_px : float
        The distance within which a localisation is near (px).

    Returns
    -------
    dict of int to float
        Particle slot -> share (0 - 1).
    """
    hits = np.zeros(truth.centroids.shape[:2], np.int64)  # (frames, P): localisations near
    np.add.at(hits, localisations["frame"].to_numpy(np.int64), _near(localisations, truth, match_px))
    out = {}
    for p, (a, b) in scored_runs(truth).items():
        frames = visible_frames(truth, p, a, b)
        out[p] = float((hits[frames, p] > 0).mean()) if len(frames) else 0.0
    return out


def score_particles(tracks: pd.DataFrame, d_table: pd.DataFrame, truth: MovieTruth, pixel_size_um: float,
                    floor_r: float, d_column: str = "D_um2_s") -> pd.DataFrame:
    """One row per scored particle: its true D, its matched tracks' D and the floors.

    Whether a track follows it, the D of its longest matched track with a D
    (``d_table``: ``track`` and ``d_column``), and two floors on its true centroids over
    its run in view, the frames a blinking particle spent off left out
    (``visible_frames``), blur coefficient ``floor_r``: the CVE, and the pooled estimator
    (``models.tracking.tracks.diffusion_table``).

    Parameters
    ----------
    tracks : pandas.DataFrame
        Linked localisations of one movie: ``frame``, ``x``, ``y`` (px), ``track``.
    d_table : pandas.DataFrame
        D per track: ``track`` and ``d_column``.
    truth : MovieTruth
        The movie's truth.
    pixel_size_um : float
        The pixel size (um).
    floor_r : float
        The motion-blur coefficient of the floor's estimates
        (``models.tracking.tracks.blur_r``).
    d_column : str
        The column of ``d_table`` holding D (um^2/s).

    Returns
    -------
    pandas.DataFrame
        ``particle`` (slot), ``frames_in_view``, ``true_D_um2_s``, ``matched`` (a track
        follows it), ``D_um2_s`` (NaN: no matched track with a D), ``floor_D_um2_s`` (the
        CVE on each particle's true centroids alone) and ``floor_pooled_D_um2_s`` (the
        pooled estimator on all of them at once: its localisation variance, about 0, from
        every particle), D in um^2/s.
    """
    runs = scored_runs(truth)
    owner = match_tracks(tracks, truth)
    d_of = dict(zip(d_table["track"].to_numpy(), d_table[d_column].to_numpy())) if len(d_table) else {}
    length = tracks.groupby("track").size().to_dict() if len(tracks) else {}
    rows, true_pos = [], []
    for p, (a, b) in runs.items():
        mine = [t for t, q in owner.items() if q == p]
        with_d = [t for t in mine if t in d_of and np.isfinite(d_of[t])]
        est = d_of[max(with_d, key=lambda t: length[t])] if with_d else np.nan
        f = visible_frames(truth, p, a, b)
        true_pos.append(pd.DataFrame({"track": p, "frame": f, "t_s": truth.centroid_t_s[f, p],
                                      "x": truth.centroids[f, p, 0], "y": truth.centroids[f, p, 1]}))
        rows.append({"particle": p, "frames_in_view": b - a, "true_D_um2_s": float(truth.diffusion[p]),
                     "matched": bool(mine), "D_um2_s": float(est)})
    out = pd.DataFrame(rows, columns=["particle", "frames_in_view", "true_D_um2_s", "matched", "D_um2_s"])
    true_pos = pd.concat(true_pos, ignore_index=True) if true_pos else pd.DataFrame(columns=["track", "frame", "t_s", "x", "y"])
    for column, estimator in (("floor_D_um2_s", "cve"), ("floor_pooled_D_um2_s", "pooled")):
        fl = diffusion_table(true_pos, pixel_size_um, floor_r, estimator=estimator)
        out[column] = out["particle"].map(dict(zip(fl["track"], fl["D_um2_s"]))).astype(np.float64)
    return out


def within(est: np.ndarray, true: np.ndarray, factor: float = D_FACTOR) -> np.ndarray:
    """D within a factor of the truth (a missing or non-positive estimate is not).

    Parameters
    ----------
    est : ndarray
        Estimated D (um^2/s); NaN where missing.
    true : ndarray
        True D (um^2/s).
    factor : float
        Within means ``true / factor <= est <= factor * true``.

    Returns
    -------
    ndarray
        A boolean per estimate.
    """
    est, true = np.asarray(est, np.float64), np.asarray(true, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (est > 0) & (est <= factor * true) & (est >= true / factor)


def summarise(per_particle: pd.DataFrame) -> dict:
    """Shares over the scored particles: with a matched track, and with D right.

    With D within ``D_FACTOR`` (ours and the floor's), and the median
    |log10(D_est / D_true)| of those with a D.

    Parameters
    ----------
    per_particle : pandas.DataFrame
        ``score_particles`` rows, of one movie or several.

    Returns
    -------
    dict
        ``particles`` (count), ``matched``, ``d_within``, ``floor_d_within``,
        ``floor_pooled_d_within`` (shares) and
        ``median_abs_log10`` (over the positive estimates; None without one); all but
        ``particles`` None when no particle was scored.
    """
    t = per_particle
    n = len(t)
    if n == 0:
        return {"particles": 0, "matched": None, "d_within": None, "floor_d_within": None,
                "floor_pooled_d_within": None, "median_abs_log10": None}
    est, true = t["D_um2_s"].to_numpy(np.float64), t["true_D_um2_s"].to_numpy(np.float64)  # object when a part was empty
    with np.errstate(invalid="ignore"):
        ok = est > 0
    err = np.abs(np.log10(est[ok] / true[ok]))
    return {"particles": n, "matched": float(t["matched"].astype(bool).mean()),
            "d_within": float(within(est, true).mean()),
            "floor_d_within": float(within(t["floor_D_um2_s"].to_numpy(np.float64), true).mean()),
            "floor_pooled_d_within": float(within(t["floor_pooled_D_um2_s"].to_numpy(np.float64), true).mean())
            if "floor_pooled_D_um2_s" in t else None,
            "median_abs_log10": float(np.median(err)) if len(err) else None}


def plot_field(mean: np.ndarray, tracks: pd.DataFrame, per_particle: dict[str, pd.DataFrame], out,
               title: str = ""):
    """One field: tracks over its mean image, and estimated against true D per particle.

    Parameters
    ----------
    mean : ndarray
        The movie's mean image (H, W).
    tracks : pandas.DataFrame
        The tracks drawn: ``track``, ``x``, ``y`` (px).
    per_particle : dict of str to pandas.DataFrame
        Pipeline label -> its ``score_particles`` table; the floor is drawn from the
        first one's ``floor_D_um2_s``.
    out : str or Path
        The picture's file.
    title : str
        Above the tracks.

    Returns
    -------
    matplotlib.figure.Figure
        The figure written; its right panel's legend gives each pipeline's share of
        particles with D within ``D_FACTOR``.
    """
    from matplotlib.figure import Figure

    from models.tracking.tracks import draw_tracks

    fig = Figure(figsize=(10.5, 5.2))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.05]})
    draw_tracks(left, mean, tracks, title)
    rows = list(per_particle.items())
    if rows:
        rows.append(("floor: the CVE on the true positions", rows[0][1].rename(
            columns={"D_um2_s": "_", "floor_D_um2_s": "D_um2_s"})))
    true_all = np.concatenate([t["true_D_um2_s"].to_numpy() for _, t in rows]) if rows else np.ones(1)
    lo, hi = float(np.nanmin(true_all)) / 3, float(np.nanmax(true_all)) * 3
    x = np.geomspace(lo, hi, 50)
    right.fill_between(x, x / D_FACTOR, x * D_FACTOR, color="0.9", label=f"within {D_FACTOR:g}x")
    right.plot(x, x, color="0.5", lw=0.8)
    for (label, t), marker in zip(rows, ("o", "s", "^", "v", "D", "x")):
        est = t["D_um2_s"].to_numpy(np.float64)
        ok = np.isfinite(est) & (est > 0)
        share = float(within(est, t["true_D_um2_s"].to_numpy()).mean()) if len(t) else float("nan")
        right.scatter(t["true_D_um2_s"].to_numpy()[ok], np.clip(est[ok], lo, hi), s=14, marker=marker,
                      alpha=0.75, label=f"{label}: {share:.2f} within")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlim(lo, hi)
    right.set_ylim(lo, hi)
    right.set_xlabel("true D (um^2/s)")
    right.set_ylabel("estimated D (um^2/s)")
    right.set_title("D per particle (no D: left out; beyond the axes: drawn at the edge)", fontsize=8)
    right.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return fig
