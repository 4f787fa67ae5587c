"""Quantum-dot blinking and log-uniform draws, on both engines (kernel and NumPy).

The laws are written here from the physics (the truncated power law's CDF and mean by
hand, Eq. 1 by hand), not from the simulator's helpers."""

import hashlib
import json
import platform
import sys

import numpy as np
import pytest
from scipy import stats

from conftest import ROOT, assert_same_arrays, dataset, one_line_error, run_cli
from factory.blinking import power_law_duration, power_law_durations
from factory.build import build
from factory.config import dataset_hash, load_config
from factory.kernel import simulate
from factory.rng import new_state
from factory.stores import Store
from test_build import assert_thread_and_batch_invariant

PX, SXY, SZ, NBKG = 0.07, 0.21, 1.36, 8.4
DWELL, RETRACE = 2e-6, 1.1e-3


def cdf(t, alpha, t_min, t_max, cutoff=None):
    """CDF of p(t) ~ t^-(1 + alpha) [exp(-t / cutoff)] on [t_min, t_max]: closed form
    without the cut-off, quadrature on a log grid with it."""
    t = np.asarray(t, np.float64)
    if cutoff is None:
        return np.clip((1 - (t_min / t) ** alpha) / (1 - (t_min / t_max) ** alpha), 0, 1)
    u = np.linspace(np.log(t_min), np.log(t_max), 200001)
    g = np.exp(u)
    dens = g ** -alpha * np.exp(-g / cutoff)  # p(t) dt = p(t) t du
    c = np.concatenate([[0], np.cumsum((dens[1:] + dens[:-1]) / 2 * np.diff(u))])
    return np.interp(np.log(np.clip(t, t_min, t_max)), u, c / c[-1])


def mean(alpha, t_min, t_max):
    """Mean of the truncated power law (no cut-off), by hand."""
    norm = 1 - (t_min / t_max) ** alpha
    return alpha * t_min**alpha / (1 - alpha) * (t_max ** (1 - alpha) - t_min ** (1 - alpha)) / norm


def movie(engine, n_movies, n_frames, **sections):
    return engine(None, n_movies=n_movies, movie={"n_frames": n_frames, **sections.pop("movie", {})}, **sections)


# --- the duration laws ------------------------------------------------------------------


def draw(name, n, alpha, t_min, t_max, cutoff):
    if name == "numba":
        state = new_state(123, 0)
        return np.array([power_law_duration(state, alpha, t_min, t_max, cutoff or 0.0) for _ in range(n)])
    return power_law_durations(np.random.default_rng(123), n, alpha, t_min, t_max, cutoff)


@pytest.mark.parametrize("name", ["numba", "numpy"])
@pytest.mark.parametrize("alpha, cutoff", [(0.5, None), (0.8, None), (0.5, 0.05)])
def test_the_duration_sampler_draws_the_truncated_power_law(name, alpha, cutoff):
    t_min, t_max, n = 1e-4, 1.0, 40000
    t = draw(name, n, alpha, t_min, t_max, cutoff)
    assert t.min() >= t_min and t.max() <= t_max
    assert stats.kstest(t, lambda x: cdf(x, alpha, t_min, t_max, cutoff)).pvalue > 1e-3
    # The test tells neighbouring laws apart: another exponent, or the cut-off left out.
    assert stats.kstest(t, lambda x: cdf(x, alpha + 0.05, t_min, t_max, cutoff)).pvalue < 1e-6
    if cutoff is None:
        se = t.std() / np.sqrt(n)
        assert abs(t.mean() - mean(alpha, t_min, t_max)) < 5 * se
        # Log-binned density slope: -(1 + alpha).
        edges = np.geomspace(t_min, 1e-2, 11)
        h, _ = np.histogram(t, edges)
        centres = np.sqrt(edges[1:] * edges[:-1])
        slope = np.polyfit(np.log(centres), np.log(h / np.diff(edges)), 1)[0]
        assert slope == pytest.approx(-(1 + alpha), abs=0.05)
    else:
        assert stats.kstest(t, lambda x: cdf(x, alpha, t_min, t_max)).pvalue < 1e-6


def runs(on: np.ndarray, dt: float) -> tuple[list, list]:
    """On and off durations in a 0/1 sequence sampled every dt (the first and the last
    run, cut by the recording, left out)."""
    ons, offs = [], []
    for x in on:
        for r in np.split(x, np.flatnonzero(np.diff(x)) + 1)[1:-1]:
            (ons if r[0] == 1 else offs).append(len(r) * dt)
    return np.array(ons), np.array(offs)


def test_on_and_off_periods_of_a_movie_follow_their_laws(engine):
    """A 1 x 1 px movie sampled every 20 us (one dwell, no flyback): each frame's on
    fraction is the state at one instant, so its runs are the on and off periods (to a
    sample, 1 % of the shortest period)."""
    dt, t_min, t_max, cut = 20e-6, 2e-3, 0.2, 0.04
    blink = {"alpha_on": 0.5, "alpha_off": 0.7, "t_min_ms": t_min * 1e3, "t_max_s": t_max,
             "on_cutoff_s": cut, "p_on_start": 0.5}
    out = movie(engine, 30, 100000, movie={"frame_flyback_ms": 0.0}, image={"height_px": 1, "width_px": 1},
                scan={"dwell_us": dt * 1e6}, output={"trajectories": False},
                particles={"diffusion_um2_s": 0.0, "xy_start": {"type": "fixed", "x_px": 0.0, "y_px": 0.0},
                           "blinking": blink})
    assert np.allclose(np.diff(out["frame_start_s"][:100]), dt)
    on = out["on_fraction"][:, 0].reshape(30, -1)
    assert set(np.unique(on)) == {0.0, 1.0}
    ons, offs = runs(on, dt)
    assert len(ons) > 2000 and len(offs) > 2000
    assert stats.kstest(offs, lambda x: cdf(x, 0.7, t_min, t_max)).pvalue > 1e-3
    assert stats.kstest(ons, lambda x: cdf(x, 0.5, t_min, t_max, cut)).pvalue > 1e-3
    assert stats.kstest(ons, lambda x: cdf(x, 0.5, t_min, t_max)).pvalue < 1e-3  # the cut-off shows
    assert abs(offs.mean() - mean(0.7, t_min, t_max)) < 5 * offs.std() / np.sqrt(len(offs))
    # Each frame's image is what the state says: background alone when off.
    e = out["expected"][:, 0, 0]
    assert np.all((e > NBKG + 1) == (out["on_fraction"][:, 0] == 1))


# --- what the images show -----------------------------------------------------------------

ALWAYS = {"t_min_ms": 2e6, "t_max_s": 4000.0, "on_cutoff_s": None}  # one period (over 30 min) covers the movie


def test_an_off_particle_gives_only_background(engine):
    parts = {"count": 2, "diffusion_um2_s": 0.3}
    out = movie(engine, 2, 3, particles={**parts, "blinking": {**ALWAYS, "p_on_start": 0.0}})
    plain = movie(engine, 2, 3, particles=parts)
    assert np.all(out["expected"] == np.float32(NBKG))
    assert plain["expected"].max() > NBKG + 5  # without blinking the particles are seen
    assert np.all(out["on_fraction"] == 0)
    assert np.isnan(out["exposure_xy"]).all() and np.isnan(out["exposure_t_s"]).all()
    # The particles are still there and move as they do without blinking.
    np.testing.assert_array_equal(out["centroids"], plain["centroids"])
    np.testing.assert_array_equal(out["trajectories"], plain["trajectories"])


def test_a_particle_always_on_is_the_particle_without_blinking(engine):
    parts = {"count": {"type": "poisson", "mean": 2.0, "max": 4}, "diffusion_um2_s": 0.5}
    out = movie(engine, 4, 3, particles={**parts, "blinking": {**ALWAYS, "p_on_start": 1.0}})
    plain = movie(engine, 4, 3, particles=parts)
    assert sorted(out) == sorted([*plain, "on_fraction"])
    for name in plain:
        if name != "images":  # the kernel draws the noise of blinking movies from a stream of its own
            np.testing.assert_array_equal(out[name], plain[name], err_msg=name)
    present = np.arange(4)[None, :] < out["n_particles"][:, None]
    assert np.all(out["on_fraction"][present] == 1) and np.isnan(out["on_fraction"][~present]).all()


def test_positions_do_not_depend_on_blinking(engine):
    """Blinking draws from streams of its own: the walk is the walk without blinking."""
    parts = {"count": 3, "diffusion_um2_s": 1.0}
    out = movie(engine, 3, 4, particles={**parts, "blinking": {"t_min_ms": 0.5}})
    plain = movie(engine, 3, 4, particles=parts)
    assert 0 < np.nanmean(out["on_fraction"]) < 1
    for name in ("trajectories", "centroids", "diffusion", "n_qd", "in_view"):
        np.testing.assert_array_equal(out[name], plain[name], err_msg=name)
    assert not np.array_equal(out["expected"], plain["expected"])


def hand_pixel_times(h, w):
    r, c = np.mgrid[0:h, 0:w]
    return r * (w * DWELL + RETRACE) + c * DWELL


def test_on_fraction_and_exposure_are_what_the_image_shows(engine):
    """No background, a fixed particle: a pixel is lit exactly when the particle was on,
    and the exposure-weighted time is the Eq. 1-weighted mean of the lit pixels' times."""
    x0, y0 = 12.0, 11.0
    out = movie(engine, 3, 6, background={"n_bkg": 0.0},
                particles={"diffusion_um2_s": 0.0, "xy_start": {"type": "fixed", "x_px": x0, "y_px": y0},
                           "blinking": {"t_min_ms": 0.5, "t_max_s": 0.2, "alpha_off": 0.3}})
    e = out["expected"].astype(np.float64)
    frac = out["on_fraction"][:, 0]
    lit = (e > 0).reshape(len(e), -1).mean(1)
    np.testing.assert_allclose(frac, lit, atol=1e-6)
    assert (frac == 0).any() and (frac == 1).any() and ((frac > 0) & (frac < 1)).any()
    # Lit pixels carry the full Eq. 1 signal.
    r, c = np.mgrid[0:24, 0:25]
    sig = (10 / (2 * np.pi * SXY**2) * np.exp(-(((c - x0) * PX) ** 2 + ((r - y0) * PX) ** 2) / (2 * SXY**2))
           / (np.sqrt(2 * np.pi) * SZ))
    np.testing.assert_allclose(e, np.where(e > 0, sig, 0.0), rtol=1e-5)
    times = out["frame_start_s"][:, None, None] + hand_pixel_times(24, 25)
    with np.errstate(invalid="ignore"):
        t_hand = (e * times).sum((1, 2)) / e.sum((1, 2))
    np.testing.assert_allclose(out["exposure_t_s"][:, 0], t_hand, rtol=0, atol=1e-8)
    seen = frac > 0
    np.testing.assert_allclose(out["exposure_xy"][seen, 0], [[x0, y0]] * seen.sum(), atol=1e-5)
    assert np.isnan(out["exposure_xy"][~seen, 0]).all() and np.isnan(out["exposure_t_s"][~seen, 0]).all()


def test_stacks_blink_too(engine):
    out = engine(None, n_stacks=4, stack={"n_planes": 3, "z_step_um": 0.5}, image={"height_px": 12, "width_px": 12},
                 particles={"count": 2, "blinking": {"t_min_ms": 0.5}})
    assert out["on_fraction"].shape == (4, 2)
    assert np.all((out["on_fraction"] >= 0) & (out["on_fraction"] <= 1))
    assert np.isnan(out["exposure_xy"][out["on_fraction"] == 0]).all()


# --- blinking off changes nothing ---------------------------------------------------------

# Kernel arrays of these datasets (seed 11), digested with the code before blinking and
# log_uniform existed.  The last bit of exp/log may differ with another libm, so the
# digests are checked where they were recorded (x86-64 Linux).
BEFORE = {
    "images": ("b43ee8228f676629", dict(n_images=40, particles={"count": {"type": "poisson", "mean": 2.0, "max": 4}})),
    "movie": ("02a835b9dd8b6ea7", dict(
        n_images=None, n_movies=3, movie={"n_frames": 4}, image={"height_px": 16, "width_px": 20},
        particles={"count": 3, "diffusion_um2_s": {"type": "uniform", "low": 0.05, "high": 1.0}})),
    "stack": ("46fb3d2b663a2614", dict(
        n_images=None, n_stacks=3, stack={"n_planes": 3, "z_step_um": 0.5}, image={"height_px": 12, "width_px": 12},
        particles={"z_start_um": {"type": "normal", "std": 1.0}}, scan={"substeps_per_dwell": 2})),
    "pmt": ("9bf1e2866a593926", dict(n_images=20, detector={"type": "pmt", "gain_adu_per_photon": 5.0},
                                     particles={"n_qd": {"low": 5.0, "high": 20.0}})),
}


def digest(arrays: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        h.update(k.encode())
        h.update(np.ascontiguousarray(arrays[k]).tobytes())
    return h.hexdigest()[:16]


@pytest.mark.skipif(sys.platform != "linux" or platform.machine() != "x86_64", reason="digests recorded on x86-64 Linux")
@pytest.mark.parametrize("case", sorted(BEFORE))
def test_without_blinking_every_array_is_as_before(case):
    want, sections = BEFORE[case]
    cfg, ds = dataset(seed=11, **sections)
    assert digest(simulate(ds, cfg.seed)) == want


def test_blinking_null_is_blinking_absent(tmp_path):
    for i, extra in enumerate(({}, {"particles": {"blinking": None}})):
        cfg, _ = dataset(None, 3, "a", n_movies=2, movie={"n_frames": 3}, **extra)
        build(cfg, tmp_path / str(i), progress=False)
    with Store(tmp_path / "0" / "a.h5") as a, Store(tmp_path / "1" / "a.h5") as b:
        assert a.names == b.names and "on_fraction" not in a.names
        assert a.attrs["config"] == b.attrs["config"] and "blinking" not in a.attrs["config"]
        assert a.attrs["dataset_hash"] == b.attrs["dataset_hash"]
    assert_same_arrays(tmp_path / "0" / "a.h5", tmp_path / "1" / "a.h5")


# Dataset hashes of the repository's configs, recorded before blinking and log_uniform.
REPOSITORY_HASHES = {
    "datasets.yaml": {"train": "f2958037f1c95414", "val": "caaec0da2e6be369", "test_d075": "56de7cbd8ba1efcf",
                      "test_d100": "729ed71ceb6b657a", "test_d175": "c3f69a776c108482",
                      "movies_train": "b9232cf7f23b6c80", "movies_val": "34a885c6a2cff87f",
                      "test_movies": "270c1ec7a040490c"},
    "crowded.yaml": {"train": "b6ba1ef889d9f33f", "val": "09a79b55b313abab", "test_crowded": "c4ebde6d7ffd5249"},
    "volumes.yaml": {"volumes_train": "2784dd6777889cd2", "volumes_val": "fcb66f5cda626d83",
                     "test_volumes": "dd141c4a01697cae"},
}


@pytest.mark.parametrize("name", sorted(REPOSITORY_HASHES))
def test_repository_dataset_hashes_are_unchanged(name):
    cfg = load_config(ROOT / name)
    assert {n: dataset_hash(cfg.seed, d) for n, d in cfg.datasets.items()} == REPOSITORY_HASHES[name]


def test_a_blinking_store_holds_on_fraction_and_reads_back_its_config(tmp_path):
    cfg, ds = dataset(None, 2, "b", n_movies=2, movie={"n_frames": 3},
                      particles={"count": 2, "blinking": {"alpha_on": 0.6, "on_cutoff_s": None}})
    build(cfg, tmp_path, progress=False)
    with Store(tmp_path / "b.h5") as st:
        np.testing.assert_array_equal(st.read("on_fraction"), simulate(ds, cfg.seed)["on_fraction"])
        assert "on" in st["on_fraction"].attrs["units"]
        assert json.loads(st.attrs["config"])["dataset"]["particles"]["blinking"]["alpha_on"] == 0.6
        assert dataset_hash(cfg.seed, st.dataset) == st.attrs["dataset_hash"] == dataset_hash(cfg.seed, ds)
        assert st.dataset.particles.blinking == ds.particles.blinking
    # Blinking is part of what the arrays are: another law, another hash.
    _, other = dataset(None, 2, "b", n_movies=2, movie={"n_frames": 3},
                       particles={"count": 2, "blinking": {"alpha_on": 0.7, "on_cutoff_s": None}})
    assert dataset_hash(2, other) != dataset_hash(2, ds)


def test_blinking_movies_are_identical_with_one_and_two_threads_and_any_batch():
    cfg, ds = dataset(None, n_movies=8, movie={"n_frames": 4}, image={"height_px": 16, "width_px": 16},
                      particles={"count": {"type": "poisson", "mean": 3, "max": 5},
                                 "diffusion_um2_s": {"type": "log_uniform", "low": 0.02, "high": 0.5},
                                 "blinking": {"t_min_ms": 0.3}})
    assert_thread_and_batch_invariant(cfg, ds, [(0, 4), (4, 20), (20, 32)])


# --- log-uniform draws ------------------------------------------------------------------


def test_log_uniform_d_is_uniform_in_log_d(engine):
    low, high = 0.02, 0.5
    out = engine(300, image={"height_px": 8, "width_px": 8},
                 particles={"count": 12, "diffusion_um2_s": {"type": "log_uniform", "low": low, "high": high},
                            "n_qd": {"type": "log_uniform", "low": 5.0, "high": 20.0}})
    for values, (a, b) in ((out["diffusion"], (low, high)), (out["n_qd"], (5.0, 20.0))):
        v = values.astype(np.float64).ravel()
        assert v.min() >= a * (1 - 1e-6) and v.max() <= b * (1 + 1e-6)
        la, lb = np.log10(a), np.log10(b)
        assert stats.kstest(np.log10(v), stats.uniform(la, lb - la).cdf).pvalue > 1e-3
        assert stats.kstest(v, stats.uniform(a, b - a).cdf).pvalue < 1e-6  # not uniform in D


def test_log_uniform_takes_the_draw_uniform_takes(engine):
    """Same seed, same draws: log_uniform maps the one uniform that uniform uses, so the
    streams after it (the starts here) are the same."""
    low, high = 0.02, 0.5
    runs_ = {t: engine(50, image={"height_px": 10, "width_px": 10},
                       particles={"count": 3, "diffusion_um2_s": {"type": t, "low": low, "high": high}})
             for t in ("uniform", "log_uniform")}
    u_lin = (runs_["uniform"]["diffusion"].astype(np.float64) - low) / (high - low)
    u_log = np.log(runs_["log_uniform"]["diffusion"].astype(np.float64) / low) / np.log(high / low)
    np.testing.assert_allclose(u_log, u_lin, atol=2e-6)
    np.testing.assert_array_equal(runs_["uniform"]["trajectories"][:, :, 0], runs_["log_uniform"]["trajectories"][:, :, 0])


@pytest.mark.parametrize("bounds, words", [("low: 0.5, high: 0.1", "must be > low"),
                                           ("low: 0.5, high: 0.5", "must be > low"),
                                           ("low: 0.0, high: 0.5", "greater than 0")])
def test_bad_log_uniform_bounds_are_one_line_and_nothing_is_written(tmp_path, bounds, words):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("seed: 1\ndatasets:\n  a:\n    n_images: 4\n    particles:\n"
                   f"      diffusion_um2_s: {{type: log_uniform, {bounds}}}\n")
    r = run_cli("build", cfg, "--out", tmp_path / "out")
    one_line_error(r, "particles.diffusion_um2_s", words, str(cfg))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("blink, words", [({"t_min_ms": 50.0, "t_max_s": 0.01}, "t_max_s"),
                                          ({"on_cutoff_s": 1e-6}, "on_cutoff_s"),
                                          ({"alpha_on": 0.0}, "alpha_on"),
                                          ({"p_on_start": 1.5}, "p_on_start"),
                                          ({"t_min": 1.0}, "unknown key")])
def test_bad_blinking_is_refused_naming_the_field(blink, words):
    from factory.config import parse_config
    from factory.errors import ConfigError

    with pytest.raises(ConfigError, match=words) as err:
        parse_config({"seed": 1, "datasets": {"a": {"n_images": 1, "particles": {"blinking": blink}}}})
    assert "datasets.a.particles.blinking" in str(err.value)


def test_a_dataset_overriding_bounds_keeps_the_log_uniform_of_the_defaults():
    from factory.config import LogUniform, parse_config

    cfg = parse_config({"seed": 1, "defaults": {"particles": {"diffusion_um2_s": {
        "type": "log_uniform", "low": 0.02, "high": 0.5}}}, "datasets": {
        "a": {"n_images": 1, "particles": {"diffusion_um2_s": {"high": 0.3}}},
        "b": {"n_images": 1, "particles": {"diffusion_um2_s": {"type": "uniform", "low": 0.1, "high": 0.3}}}}})
    assert cfg.datasets["a"].particles.diffusion_um2_s == LogUniform(low=0.02, high=0.3)
    assert cfg.datasets["b"].particles.diffusion_um2_s.type == "uniform"
