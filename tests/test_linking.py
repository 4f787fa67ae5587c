"""The frame-to-frame linker (models.tracking.linking): TrackPy's criterion solved as an
assignment problem.  Checked against trackpy.link itself, by hand, and where TrackPy
has to give up."""

import warnings

import numpy as np
import pandas as pd
import pytest

from models.tracking.linking import link_frames


def links_of(frame: np.ndarray, ids: np.ndarray) -> set:
    """The links of a labelling: pairs of rows consecutive in one track."""
    order = np.lexsort((frame, ids))
    same = ids[order][1:] == ids[order][:-1]
    return set(zip(order[:-1][same].tolist(), order[1:][same].tolist()))


def brownian_scene(rng, n, frames, step_px, detect=0.9):
    pos = rng.uniform(0, 200, (n, 2))
    rows = []
    for t in range(frames):
        pos = pos + rng.normal(0, step_px, pos.shape)
        rows += [(t, *pos[i]) for i in np.flatnonzero(rng.random(n) < detect)]
    return pd.DataFrame(rows, columns=["frame", "x", "y"])


@pytest.mark.parametrize("seed", range(6))
def test_the_links_are_trackpys_own(seed):
    """On scenes whose subnetworks TrackPy solves whole (no adaptive search), its links
    and ours are the same set, gaps bridged by memory included."""
    import trackpy

    rng = np.random.default_rng(seed)
    df = brownian_scene(rng, n=int(rng.integers(10, 40)), frames=25, step_px=rng.uniform(0.5, 3.0))
    radius, memory = rng.uniform(4, 12), int(rng.integers(0, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trackpy.quiet()
        theirs = trackpy.link(df, radius, memory=memory)["particle"].to_numpy()
    ours = link_frames(df["frame"].to_numpy(), df[["x", "y"]].to_numpy(), radius, memory)
    frame = df["frame"].to_numpy()
    assert len(links_of(frame, theirs)) > 100
    assert links_of(frame, ours) == links_of(frame, theirs)


def test_the_smallest_sum_of_squares_decides_by_hand():
    """Tracks at x = 0 and x = 3 in frame 0, points at x = 2 and x = 5 in frame 1.  Either
    0->2 and 3->5 (4 + 4 = 8) or 3->2 with the track at 0 left unlinked (1 + R^2): the
    first from R^2 > 7 on, though the nearest point of both tracks is x = 2."""
    frame = np.array([0, 0, 1, 1])
    xy = np.array([[0.0, 0.0], [3.0, 0.0], [2.0, 0.0], [5.0, 0.0]])
    assert link_frames(frame, xy, 4.0, memory=0).tolist() == [0, 1, 0, 1]
    assert link_frames(frame, xy, 2.7, memory=0).tolist() == [0, 1, 0, 1]  # 8 < 1 + 7.29
    assert link_frames(frame, xy, 2.6, memory=0).tolist() == [0, 1, 1, 2]  # 1 + 6.76 < 8; x = 5 starts a track
    assert link_frames(frame, xy, 0.5, memory=0).tolist() == [0, 1, 2, 3]  # nothing within reach


def test_memory_bridges_a_gap_of_that_many_frames_and_no_more():
    frame = np.array([0, 1, 3, 6])
    xy = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
    assert link_frames(frame, xy, 2.0, memory=0).tolist() == [0, 0, 1, 2]
    assert link_frames(frame, xy, 2.0, memory=1).tolist() == [0, 0, 0, 1]  # 1 -> 3 skips one frame
    assert link_frames(frame, xy, 2.0, memory=2).tolist() == [0, 0, 0, 0]  # 3 -> 6 skips two


def test_a_crowded_field_trackpy_gives_up_on_is_linked_exactly():
    """A lattice of 64 particles 5 px apart moving 0.3 px per frame, linked with a 12 px
    radius: one subnetwork of 64.  The optimum is the true links; TrackPy refuses it
    without its adaptive search (which links with a smaller radius instead)."""
    import trackpy
    from trackpy.linking.utils import SubnetOversizeException

    rng = np.random.default_rng(3)
    g = np.arange(8) * 5.0
    pos = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    frames = [pos + rng.normal(0, 0.3, pos.shape) for _ in range(6)]
    order = [rng.permutation(len(pos)) for _ in frames]  # rows shuffled within each frame
    xy = np.concatenate([f[o] for f, o in zip(frames, order)])
    frame = np.repeat(np.arange(6), len(pos))
    particle = np.concatenate(order)
    ids = link_frames(frame, xy, 12.0, memory=0)
    assert links_of(frame, ids) == links_of(frame, particle)
    with pytest.raises(SubnetOversizeException), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trackpy.link(pd.DataFrame({"frame": frame, "x": xy[:, 0], "y": xy[:, 1]}), 12.0, memory=0)


def test_ids_follow_the_order_tracks_start_and_rows_in_any_order_give_the_same_tracks():
    rng = np.random.default_rng(5)
    df = brownian_scene(rng, 15, 12, 1.0)
    frame, xy = df["frame"].to_numpy(), df[["x", "y"]].to_numpy()
    ids = link_frames(frame, xy, 6.0, 1)
    first = pd.Series(np.arange(len(ids))).groupby(ids).min()
    assert (np.diff(first.to_numpy()) > 0).all() and ids.min() == 0
    perm = rng.permutation(len(frame))
    back = np.empty_like(ids)
    back[perm] = link_frames(frame[perm], xy[perm], 6.0, 1)
    assert links_of(frame, back) == links_of(frame, ids)


@pytest.mark.parametrize("args, words", [
    ((np.array([0, 1]), np.array([[0.0, 0.0], [1.0, np.nan]]), 2.0, 1), "finite"),
    ((np.array([0, 1]), np.zeros((2, 2)), 0.0, 1), "radius_px"),
    ((np.array([0, 1]), np.zeros((2, 2)), float("inf"), 1), "radius_px"),
    ((np.array([0, 1]), np.zeros((2, 2)), 2.0, -1), "memory"),
    ((np.array([0.0, 0.5]), np.zeros((2, 2)), 2.0, 1), "whole"),
    ((np.array([0, 1]), np.zeros((2, 2)), 2.0, 1, (5.0, 3.0)), "own_radius"),
    ((np.array([0, 1]), np.zeros((2, 2)), 2.0, 1, (0.0, 3.0)), "own_radius"),
    ((np.array([0, 1]), np.zeros((2, 2)), 4.0, 1, (1.0, 3.0)), "hold radius_px"),
    ((np.array([0, 1]), np.zeros((2, 2)), 0.5, 1, (1.0, 3.0)), "hold radius_px"),
])
def test_bad_arguments_are_refused(args, words):
    with pytest.raises(ValueError, match=words):
        link_frames(*args)


def test_no_localisations_no_tracks():
    assert link_frames(np.zeros(0, int), np.zeros((0, 2)), 3.0).shape == (0,)


def test_a_tiny_radius_links_by_its_own_scale_and_the_radius_itself_is_within_reach():
    """Positions 1e-9 px apart with a 1e-8 px radius: the nearer track wins, as at any
    scale; a step of exactly the radius (3-4-5) is linked, as by TrackPy."""
    frame = np.array([0, 0, 1])
    xy = np.array([[0.0, 0.0], [1e-9, 0.0], [0.9e-9, 0.0]])
    assert link_frames(frame, xy, 1e-8, 0).tolist() == [0, 1, 1]
    assert link_frames(np.array([0, 1]), np.array([[0.0, 0.0], [3.0, 4.0]]), 5.0, 0).tolist() == [0, 0]


def test_thousands_of_localisations_a_frame_are_linked_in_blocks(monkeypatch):
    """Distances are computed a block of sources at a time: blocks of any size give the
    same tracks."""
    import models.tracking.linking as linking

    rng = np.random.default_rng(9)
    df = brownian_scene(rng, 300, 4, 0.5)
    frame, xy = df["frame"].to_numpy(), df[["x", "y"]].to_numpy()
    whole = link_frames(frame, xy, 3.0, 1)
    monkeypatch.setattr(linking, "PAIRS_PER_BLOCK", 1000)  # 3 sources per block
    assert links_of(frame, link_frames(frame, xy, 3.0, 1)) == links_of(frame, whole)
    adaptive = link_frames(frame, xy, 3.0, 1, (2.0, 6.0))
    monkeypatch.setattr(linking, "PAIRS_PER_BLOCK", 2**20)
    assert links_of(frame, link_frames(frame, xy, 3.0, 1, (2.0, 6.0))) == links_of(frame, adaptive)


@pytest.mark.parametrize("seed", range(4))
def test_pairs_within_reach_of_nothing_else_are_linked_as_the_solver_links_them(seed):
    """Uncontested pairs are linked without the solver; the rest goes to it alone.  The
    assignment is the one the solver gives on every pair at once, in fields from sparse
    to crowded, each source with its own reach and cost."""
    import models.tracking.linking as linking

    rng = np.random.default_rng(seed)
    for n, spread in ((30, 200.0), (200, 60.0), (400, 40.0)):
        src = rng.uniform(0, spread, (n, 2))
        dst = np.concatenate((src + rng.normal(0, 1.5, src.shape), rng.uniform(0, spread, (n // 5, 2))))
        dst = dst[rng.permutation(len(dst))][: n - n // 10]  # some sources lose their particle
        gate2 = rng.uniform(2.0, 6.0, n) ** 2
        scale = rng.uniform(0.5, 3.0, n)
        d2 = ((src[:, None] - dst[None]) ** 2).sum(-1)
        si, di = np.nonzero(d2 <= gate2[:, None])
        whole = np.full(n, -1)
        has = np.unique(si)
        whole[has] = linking._solve(np.searchsorted(has, si), di, d2[si, di], gate2[has], scale[has], len(dst))
        ours = linking._assign(src, dst, gate2, scale)
        assert (ours == whole).all()
        assert (ours >= 0).sum() > n // 2


@pytest.mark.parametrize("seed", range(3))
def test_a_few_contested_pairs_are_solved_densely_as_scipy_solves_them(seed):
    """The dense Hungarian method gives SciPy's assignment on small problems of every
    shape: more sources than destinations and fewer, each with its own reach and cost,
    crowded enough that most pairs compete (sub-pixel positions, so no two assignments
    tie exactly; a tie may be broken otherwise).  A pair at the gate itself is linked,
    contested or not."""
    import models.tracking.linking as linking

    rng = np.random.default_rng(seed)
    solved = 0
    for _ in range(300):
        k, m = (int(x) for x in rng.integers(1, linking.DENSE_MAX + 1, 2))
        src, dst = rng.uniform(0, 10, (k, 2)), rng.uniform(0, 10, (m, 2))
        gate2, scale = rng.uniform(1.0, 5.0, k) ** 2, rng.uniform(0.5, 3.0, k)
        d2 = ((src[:, None] - dst[None]) ** 2).sum(-1)
        si, di = np.nonzero(d2 <= gate2[:, None])
        has = np.unique(si)
        if not len(has):
            continue
        args = (np.searchsorted(has, si), di, d2[si, di], gate2[has], scale[has], m)
        dense = linking._solve_dense(*args)
        assert (dense == linking._solve(*args)).all()
        solved += (dense >= 0).sum() > 1
    assert solved > 200
    # Reach 5 from (0, 0) and (9, 0): (5, 0) is 4 from the second and 5 from the first,
    # which also reaches (3, 4) at exactly 5; the second takes (5, 0), the first (3, 4).
    xy = np.array([[0.0, 0.0], [9.0, 0.0], [3.0, 4.0], [5.0, 0.0]])
    assert link_frames(np.array([0, 0, 1, 1]), xy, 5.0).tolist() == [0, 1, 0, 1]


def test_a_sparse_field_is_linked_without_importing_scipy():
    """Particles far apart, one with a second localisation beside it (a contested pair):
    linking them does not import SciPy (a fifth of a second of a short `factory track`
    call), and the nearer localisation continues the track."""
    import subprocess
    import sys

    code = ("import sys, numpy as np; from models.tracking.linking import link_frames; "
            "g = np.arange(10) * 20.0; xy = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2); "
            "ids = link_frames(np.repeat([0, 1], [100, 101]), np.concatenate((xy, xy + 0.5, [[1.5, 0.0]])), 5.0); "
            "assert (ids[:100] == ids[100:200]).all() and ids[200] == 100; print('scipy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- the adaptive linker: each track's reach and cost from its own steps ----------------


def test_a_track_reaches_as_far_as_its_own_steps_say_by_hand():
    """Radius 4 px for a new track: prior variance ((4 - 2) / 4)^2 = 0.25 px^2 per axis.
    After a first step of 3.5 px its variance is (3.5^2 / 2 + 2 * 0.25) / (1 + 2) = 2.208,
    its reach 4 sqrt(2.208) + 2 = 7.94 px: a second step of 7.5 px is linked, one of
    8.2 px is not; one radius of 4 px links neither.  Past the largest reach nothing is."""
    frame = np.array([0, 1, 2])
    for step, linked in ((7.5, True), (8.2, False)):
        xy = np.array([[0.0, 0.0], [3.5, 0.0], [3.5 + step, 0.0]])
        assert link_frames(frame, xy, 4.0, 0, (2.0, 40.0)).tolist() == ([0, 0, 0] if linked else [0, 0, 1])
        assert link_frames(frame, xy, 4.0, 0).tolist() == [0, 0, 1]
        assert link_frames(frame, xy, 4.0, 0, (2.0, 7.0)).tolist() == [0, 0, 1]
    # a gap of g frames: the variance g times, reach 4 sqrt(2 * 2.208) + 2 = 10.4 px
    xy = np.array([[0.0, 0.0], [3.5, 0.0], [3.5 + 10.0, 0.0]])
    assert link_frames(np.array([0, 1, 3]), xy, 4.0, 1, (2.0, 40.0)).tolist() == [0, 0, 0]
    assert link_frames(np.array([0, 1, 2]), xy, 4.0, 1, (2.0, 40.0)).tolist() == [0, 0, 1]


def test_a_fast_track_does_not_take_a_slow_neighbours_localisation():
    """A slow track standing at x = 0 (steps 0.1 px) and a fast one arriving at x = 3 (steps
    5 px); next frame, localisations at x = 0.5 and x = 10.  Measured in squared pixels
    the fast track would take x = 0.5 (2.5^2, the slow track left unlinked) rather than
    go 7 px; in each track's own variance the slow track keeps x = 0.5 and the fast one
    goes on to x = 10 (what one radius of 12 px does too: 0.25 + 49 < 6.25 + 144)."""
    slow = [[0.0, 0.0], [0.1, 0.0], [0.0, 0.0], [0.1, 0.0], [0.0, 0.0]]
    fast = [[-17.0, 0.0], [-12.0, 0.0], [-7.0, 0.0], [-2.0, 0.0], [3.0, 0.0]]
    frame = np.r_[np.repeat(np.arange(5), 2), 5, 5]
    xy = np.array([p for pair in zip(slow, fast) for p in pair] + [[0.5, 0.0], [10.0, 0.0]])
    ids = link_frames(frame, xy, 6.0, 0, (1.5, 20.0))
    assert ids[-2] == ids[0] and ids[-1] == ids[1]
    assert len(set(ids[0::2][:5])) == 1 and len(set(ids[1::2][:5])) == 1


def test_in_a_field_of_mixed_mobility_fast_tracks_stay_whole_and_links_stay_right():
    """20 slow particles (0.5 px per axis per frame) and 10 fast ones (4 px), every one
    detected, linked with the radius for the middle of the range (4 * 1.41 + 2 = 7.7 px)
    and reach between those for the ends (4 and 18 px): one radius breaks a fast
    particle's track at one step in eight (2D steps past 7.7 px: exp(-7.7^2 / 32) =
    0.16); each track's own reach almost never, and the links it makes are as right."""
    rng = np.random.default_rng(11)
    sd = np.r_[np.full(20, 0.5), np.full(10, 4.0)]
    pos = rng.uniform(0, 300, (30, 2))
    rows = []
    for t in range(40):
        pos = pos + rng.normal(0, 1, pos.shape) * sd[:, None]
        rows += [(t, i, *pos[i]) for i in range(30)]
    df = pd.DataFrame(rows, columns=["frame", "particle", "x", "y"])
    frame, xy, who = df["frame"].to_numpy(), df[["x", "y"]].to_numpy(), df["particle"].to_numpy()

    def breaks_and_wrong(ids):
        links = links_of(frame, ids)
        wrong = sum(who[a] != who[b] for a, b in links)
        fast = who >= 20
        return len(set(zip(who[fast], ids[fast]))) - 10, wrong  # pieces beyond one per fast particle

    one_breaks, one_wrong = breaks_and_wrong(link_frames(frame, xy, 7.7, 0))
    own_breaks, own_wrong = breaks_and_wrong(link_frames(frame, xy, 7.7, 0, (4.0, 18.0)))
    assert one_breaks >= 30  # about 390 steps * 0.16
    assert own_breaks <= one_breaks / 5
    assert own_wrong <= one_wrong
