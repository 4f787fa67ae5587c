"""The detector of a user's microscope, estimated from its own recording (models.recordings.calibration).

Checked against data drawn with NumPy's own generators from the compound Poisson-gamma
law (not the simulator's), against the simulator's PMT with spots in the field, and on
the inputs that cannot be calibrated.
"""

import numpy as np
import pytest

from conftest import dataset
from factory.errors import FactoryError
from factory.kernel import simulate
from models.recordings.calibration import calibrate_detector


def pmt_frames(rng, shape, m, g, enf, offset, read):
    """ADU = offset + Gamma(n k, g / k) + N(0, read), n ~ Poisson(m), k = 1 / (F - 1), rounded."""
    k = 1.0 / (enf - 1.0)
    n = rng.poisson(m, shape)
    signal = np.where(n > 0, rng.gamma(np.maximum(n * k, 1e-300), g / k), 0.0)
    return np.floor(offset + signal + read * rng.standard_normal(shape) + 0.5).astype(np.uint16)


def test_photon_transfer_and_third_cumulant_give_back_a_known_detector():
    """A field of pure background (no spots), drawn from the law by NumPy: offset and read
    noise from the dark frames, g F from the variance, F from the third cumulant, each
    within 3% and within three of its own standard uncertainties."""
    rng = np.random.default_rng(3)
    g, enf, offset, read, m = 12.0, 1.35, 120.0, 4.0, 6.0
    frames = pmt_frames(rng, (60, 64, 64), m, g, enf, offset, read)
    dark = pmt_frames(rng, (20, 64, 64), 0.0, g, enf, offset, read)
    cal = calibrate_detector(frames, dark, bootstrap=100)
    truth = {"offset_adu": offset, "read_noise_adu": np.sqrt(read**2 + 1 / 12), "gain_x_enf_adu": g * enf,
             "gain_adu_per_photon": g, "excess_noise_factor": enf, "background_adu": g * m, "n_bkg": m}
    for name, want in truth.items():
        e = getattr(cal, name)
        assert abs(e.value - want) < 0.03 * want, (name, e, want)
        assert e.contains(want, k=3.0), (name, e, want)
    assert cal.photon_counting is False and cal.notes == []
    det = cal.detector_config()
    assert det["type"] == "pmt" and abs(det["offset_adu"] - offset) < 0.5


def test_photon_counting_is_recognised():
    """Counts that are photons (gain 1, offset 0, no excess noise) give the poisson detector."""
    rng = np.random.default_rng(4)
    frames = rng.poisson(5.0, (40, 64, 64)).astype(np.uint16)
    cal = calibrate_detector(frames, np.zeros((10, 64, 64), np.uint16), bootstrap=50)
    assert cal.photon_counting and cal.detector_config() == {"type": "poisson"}
    assert abs(cal.n_bkg.value - 5.0) < 0.1


def test_a_simulated_recording_with_spots_gives_back_its_microscope():
    """The simulator's PMT (a foreign microscope: 0.15 um pixels, gain 8, F 1.3, offset 60,
    read noise 3) with 20 diffusing spots: the spots are masked, the rest within 5%."""
    micro = dict(image={"height_px": 128, "width_px": 128, "pixel_size_um": 0.15},
                 output={"expected": False, "trajectories": False}, background={"n_bkg": 5.0},
                 detector={"type": "pmt", "gain_adu_per_photon": 8.0, "excess_noise_factor": 1.3,
                           "offset_adu": 60.0, "read_noise_adu": 3.0},
                 particles={"count": 20, "n_qd": 10.0, "diffusion_um2_s": 0.1})
    _, ds = dataset(40, 1, **micro)
    frames = simulate(ds, 1)["images"]
    _, dark_ds = dataset(20, 2, **{**micro, "background": {"n_bkg": 0.0}, "particles": {"count": 0}})
    dark = simulate(dark_ds, 2)["images"]
    assert frames.max() > 60 + 8 * 5 * 3  # the spots are really there
    cal = calibrate_detector(frames, dark, bootstrap=50)
    for name, want in {"offset_adu": 60.0, "gain_adu_per_photon": 8.0, "excess_noise_factor": 1.3,
                       "n_bkg": 5.0, "background_adu": 40.0}.items():
        assert abs(getattr(cal, name).value - want) < 0.05 * want, (name, getattr(cal, name), want)


def test_without_dark_frames_an_even_background_takes_the_excess_noise_as_assumed_and_says_so():
    """An even field has one mean, so the offset cannot be read off a line through the
    tiles: F is taken as known (1.3) and read noise as 0, said in the notes; g F and the
    background then follow from k3 / k2 = g (2F - 1) (here F is 1.35: within 5%)."""
    rng = np.random.default_rng(5)
    g, enf, m = 12.0, 1.35, 6.0
    frames = pmt_frames(rng, (30, 64, 64), m, g, enf, 120.0, 0.0)
    cal = calibrate_detector(frames, None, bootstrap=50)
    assert cal.offset_adu.note.startswith("assumed") and "--dark" in cal.offset_adu.note
    assert cal.excess_noise_factor.value == 1.3 and cal.excess_noise_factor.note.startswith("assumed")
    assert any(n.startswith("read noise: not determined") for n in cal.notes)
    assert abs(cal.gain_x_enf_adu.value - g * enf) < 0.05 * g * enf
    assert abs(cal.background_adu.value - g * m) < 0.05 * g * m


@pytest.mark.parametrize("frames", [np.full((3, 32, 32), 7, np.uint16), np.zeros((0, 32, 32))],
                         ids=["constant", "empty"])
def test_what_cannot_be_calibrated_is_refused_in_one_line(frames):
    with pytest.raises(FactoryError) as e:
        calibrate_detector(frames, source="rec.tif")
    assert str(e.value).startswith("rec.tif:") and "\n" not in str(e.value)


# --- spots and the whole command ---------------------------------------------------------

FOREIGN = dict(image={"height_px": 128, "width_px": 128, "pixel_size_um": 0.12},
               scan={"dwell_us": 4.0, "line_retrace_ms": 0.5},
               output={"expected": False, "trajectories": False},
               detector={"type": "pmt", "gain_adu_per_photon": 12.0, "excess_noise_factor": 1.35,
                         "offset_adu": 80.0, "read_noise_adu": 4.0},
               psf={"sigma_xy_um": 0.25}, background={"n_bkg": 5.0},
               particles={"count": 12, "n_qd": {"type": "uniform", "low": 8.4, "high": 15.6},
                          "diffusion_um2_s": 0.1, "xy_start": {"type": "uniform"},
                          "z_start_um": {"type": "uniform", "low": -1.0, "high": 1.0}})


@pytest.fixture(scope="module")
def foreign_recording(tmp_path_factory):
    """A 30-frame movie of a microscope unlike the paper's, written as TIFFs of ADU, with
    20 dark frames."""
    import tifffile

    root = tmp_path_factory.mktemp("foreign")
    _, ds = dataset(None, 3, n_movies=1, movie={"n_frames": 30, "margin_um": 1.0}, **FOREIGN)
    frames = simulate(ds, 3)["images"]
    _, dark_ds = dataset(20, 4, **{**FOREIGN, "background": {"n_bkg": 0.0}, "particles": {"count": 0}})
    tifffile.imwrite(root / "rec.tif", frames)
    tifffile.imwrite(root / "dark.tif", simulate(dark_ds, 4)["images"])
    return root, frames


def test_the_spot_model_fit_gives_back_sigma_xy_and_the_brightness(foreign_recording):
    """sigma_xy within 10% and the median N_qd within 20% of the truth (0.25 um; N_qd
    uniform over 8.4 - 15.6, median 12), through the simulator's own spot model."""
    from models.recordings.calibration import fit_spot_model, to_photons

    root, frames = foreign_recording
    import tifffile

    det = calibrate_detector(frames, tifffile.imread(root / "dark.tif"), bootstrap=20)
    micro = {k: FOREIGN[k] for k in ("image", "scan")}
    micro.update(detector=det.detector_config(), background={"n_bkg": det.n_bkg.value},
                 particles={"count": 10, "diffusion_um2_s": 0.1, "z_start_um": {"type": "uniform", "low": -1.0, "high": 1.0}})
    spots = fit_spot_model(to_photons(frames, det), micro, det, 0.12)
    assert spots.n_spots >= 50
    assert abs(spots.sigma_xy_um.value - 0.25) < 0.10 * 0.25, spots
    assert abs(spots.n_qd.value - 12.0) < 0.20 * 12.0, spots


def test_calibrate_build_train_track_end_to_end(foreign_recording, tmp_path):
    """The README's path, the four commands: `factory calibrate` -> `factory build` ->
    `factory train` (the config calibrate wrote, one short epoch) -> `factory track`.
    The estimates land in the schema's own fields, the report says what was assumed, the
    config builds, the model trains on it, and the recording is tracked with the
    calibrated microscope (its pixel size, its scan, its D range)."""
    import json

    import pandas as pd
    import yaml

    from conftest import run_cli

    root, _ = foreign_recording
    out = tmp_path / "cal"
    r = run_cli("calibrate", root / "rec.tif", "--dark", root / "dark.tif", "--pixel-size-um", "0.12",
                "--dwell-us", "4", "--line-retrace-ms", "0.5", "--out", out)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["calibration.md", "calibration.png", "microscope.yaml", "train.yaml"]
    cfg = yaml.safe_load((out / "microscope.yaml").read_text())["defaults"]
    assert cfg["image"] == FOREIGN["image"] and cfg["scan"]["dwell_us"] == 4.0
    assert cfg["detector"]["type"] == "pmt" and abs(cfg["detector"]["gain_adu_per_photon"] - 12.0) < 1.2
    assert abs(cfg["detector"]["offset_adu"] - 80.0) < 1 and abs(cfg["background"]["n_bkg"] - 5.0) < 0.5
    assert abs(cfg["psf"]["sigma_xy_um"] - 0.25) < 0.025
    report = (out / "calibration.md").read_text()
    assert "| gain (ADU per photon) |" in report and "D range: from a first tracking pass" in report
    d = yaml.safe_load((out / "microscope.yaml").read_text())["defaults"]["particles"]["diffusion_um2_s"]
    assert d["type"] == "log_uniform" and d["low"] < 0.1 < d["high"]  # every particle has D = 0.1
    r = run_cli("build", out / "microscope.yaml", "--out", tmp_path / "data", "--only", "train", "--only", "val", "-q")
    assert r.returncode == 0, r.stderr
    r = run_cli("train", "--config", out / "train.yaml", "--data", tmp_path / "data", "--out", tmp_path / "run",
                "--epochs", "1", "--max-train-images", "128", "--quiet")
    assert r.returncode == 0, r.stderr
    r = run_cli("track", tmp_path / "run", root / "rec.tif", "--out", tmp_path / "tracks", "--pixel-size-um", "0.12",
                "--dwell-us", "4", "--line-retrace-ms", "0.5", "--quiet")
    assert r.returncode == 0, r.stderr
    used = json.loads((tmp_path / "tracks" / "track.json").read_text())
    assert used["pixel_size_um"] == 0.12 and used["max_diffusion_um2_s"] == d["high"], used
    assert used["timing"].startswith("dwell 4 us, line retrace 0.5 ms"), used["timing"]
    tracks = pd.read_csv(tmp_path / "tracks" / "tracks.csv")
    assert len(tracks) and tracks["frame"].max() == 29


def test_calibrate_refuses_a_constant_recording_in_one_line(tmp_path):
    import tifffile

    from conftest import one_line_error, run_cli

    tifffile.imwrite(tmp_path / "flat.tif", np.full((5, 32, 32), 100, np.uint16))
    r = run_cli("calibrate", tmp_path / "flat.tif", "--pixel-size-um", "0.1", "--dwell-us", "2",
                "--line-retrace-ms", "1", "--out", tmp_path / "o")
    one_line_error(r, "flat.tif", "constant")
    assert not (tmp_path / "o").exists()


def test_a_recording_without_spots_says_what_was_not_estimated(tmp_path):
    """Background only: the detector is estimated, the PSF and brightness are not, and
    calibration.md says which defaults were written."""
    import tifffile

    from conftest import run_cli

    rng = np.random.default_rng(6)
    tifffile.imwrite(tmp_path / "bg.tif", pmt_frames(rng, (20, 64, 64), 6.0, 10.0, 1.3, 50.0, 3.0))
    tifffile.imwrite(tmp_path / "dark.tif", pmt_frames(rng, (10, 64, 64), 0.0, 10.0, 1.3, 50.0, 3.0))
    r = run_cli("calibrate", tmp_path / "bg.tif", "--dark", tmp_path / "dark.tif", "--pixel-size-um", "0.1",
                "--dwell-us", "2", "--line-retrace-ms", "1", "--out", tmp_path / "o")
    assert r.returncode == 0, r.stderr
    report = (tmp_path / "o" / "calibration.md").read_text()
    assert "PSF width and brightness: not estimated" in report and "sigma_xy 0.21 um" in report


def test_a_recording_too_short_for_tracks_keeps_the_default_d_range_and_says_so(foreign_recording, tmp_path):
    import tifffile

    from models.recordings.calibration import calibrate

    root, frames = foreign_recording
    tifffile.imwrite(tmp_path / "short.tif", frames[:4], photometric="minisblack")
    r = calibrate(tmp_path / "short.tif", tmp_path, pixel_size_um=0.12, dwell_us=4.0, line_retrace_ms=0.5,
                  dark=root / "dark.tif")
    assert any(n.startswith("D range: not estimated (4 frame(s), too short for a track") for n in r["notes"])
    assert r["config"]["particles"]["diffusion_um2_s"] == {"type": "log_uniform", "low": 0.02, "high": 0.5}


def test_a_saturated_recording_keeps_the_paper_spots_and_says_so(foreign_recording, tmp_path):
    """Spot cores clipped at a ceiling: the detector is still calibrated from the
    background, the spot model is not fitted to clipped spots (one line says so and
    which defaults were written), and a recording clipped everywhere is refused."""
    import tifffile
    import yaml

    from conftest import one_line_error, run_cli

    root, frames = foreign_recording
    ceiling = np.percentile(frames, 99.8)
    tifffile.imwrite(tmp_path / "sat.tif", np.minimum(frames, ceiling).astype(frames.dtype))
    flags = ["--pixel-size-um", "0.12", "--dwell-us", "4", "--line-retrace-ms", "0.5"]
    r = run_cli("calibrate", tmp_path / "sat.tif", "--dark", root / "dark.tif", *flags, "--out", tmp_path / "o")
    assert r.returncode == 0, r.stderr
    said = [line for line in r.stderr.splitlines() if "PSF width and brightness: not estimated" in line]
    assert len(said) == 1 and f"ceiling {ceiling:g} ADU" in said[0] and "sigma_xy 0.21 um" in said[0], r.stderr
    # The cautions (marked as such where they are written) reach stderr, the plain notes only the report.
    report = (tmp_path / "o" / "calibration.md").read_text()
    assert any(line.startswith(f"{tmp_path / 'sat.tif'}: saturated: ") for line in r.stderr.splitlines()), r.stderr
    assert "particle count:" in report and "particle count:" not in r.stderr
    psf = yaml.safe_load((tmp_path / "o" / "microscope.yaml").read_text())["defaults"]["psf"]
    assert psf["sigma_xy_um"] == 0.21
    tifffile.imwrite(tmp_path / "white.tif", np.minimum(frames, np.median(frames)).astype(frames.dtype))
    r = run_cli("calibrate", tmp_path / "white.tif", *flags, "--out", tmp_path / "w")
    one_line_error(r, "white.tif", "ceiling")
    assert not (tmp_path / "w").exists()


def test_a_recording_of_the_papers_microscope_gives_back_the_papers_values(tmp_path):
    """The seed paper's microscope (photon counting, 0.07 um pixels, 2 us dwell, 1.1 ms
    retrace, sigma_xy 0.21 um, 8.4 background photons, N_qd 10 +-30%), recorded as a user
    would (a TIFF of counts, no dark frames): photon counting is recognised, and the
    background, sigma_xy and median N_qd come back within 5%, 10% and 20%."""
    import tifffile

    from models.recordings.calibration import calibrate

    paper = dict(image={"height_px": 128, "width_px": 128, "pixel_size_um": 0.07},
                 output={"expected": False, "trajectories": False},
                 particles={"count": 10, "n_qd": {"type": "uniform", "low": 7.0, "high": 13.0},
                            "diffusion_um2_s": 0.1, "xy_start": {"type": "uniform"},
                            "z_start_um": {"type": "uniform", "low": -1.0, "high": 1.0}})
    _, ds = dataset(None, 5, n_movies=1, movie={"n_frames": 30, "margin_um": 1.0}, **paper)
    tifffile.imwrite(tmp_path / "paper.tif", simulate(ds, 5)["images"])
    r = calibrate(tmp_path / "paper.tif", tmp_path, pixel_size_um=0.07, dwell_us=2.0, line_retrace_ms=1.1)
    c = r["config"]
    assert c["detector"]["type"] == "poisson", c["detector"]
    assert c["background"]["n_bkg"] == pytest.approx(8.4, rel=0.05)
    assert c["psf"]["sigma_xy_um"] == pytest.approx(0.21, rel=0.10)
    assert r["spots"]["n_qd"]["value"] == pytest.approx(10.0, rel=0.20)


def test_the_brightness_uncertainty_counts_dots_not_spots():
    """Spots of one dot in many frames are one draw of its brightness: the standard error
    of the median is that of the dots, ~1.2533 sd / sqrt(n_dots) (the median's asymptotic
    law), not sd / sqrt(n_spots); and linking puts each dot's spots together."""
    from models.recordings.calibration import cluster_bootstrap_medians, dots

    rng = np.random.default_rng(4)
    n_dots, frames = 40, 25
    brightness = rng.normal(10.0, 2.0, n_dots)
    values = np.repeat(brightness, frames) + rng.normal(0, 0.05, n_dots * frames)
    cluster = np.repeat(np.arange(n_dots), frames)
    se = float(np.std(cluster_bootstrap_medians(values[None], cluster, n_boot=400, seed=1)[:, 0], ddof=1))
    want = 1.2533 * 2.0 / np.sqrt(n_dots)  # 0.40
    assert 0.7 * want < se < 1.4 * want, (se, want)
    assert se > 3 * 1.2533 * 2.0 / np.sqrt(n_dots * frames)  # the spot count's error is 5x smaller

    # Dots 60 px apart, each moving < 2 px per frame and missed in two frames: one id each.
    where = [(f, 30 + 60 * k + int(rng.integers(-1, 2)), 40 + 60 * (k % 2)) for k in range(4) for f in range(12)
             if f not in (5, 6)]
    ids = dots(np.array(where), 10.0)
    for k in range(4):
        mine = {ids[i] for i, w in enumerate(where) if abs(w[1] - (30 + 60 * k)) <= 1}
        assert len(mine) == 1
    assert len(set(ids)) == 4


def test_d_range_marks_a_default_written_for_want_of_tracks_as_a_caution():
    from models.recordings.calibration import Caution, d_range

    _, short = d_range({"D_um2_s": [0.1, 0.2], "n_tracks": 2, "frames": 3})
    _, measured = d_range({"D_um2_s": [0.05, 0.1, 0.2, 0.3, 0.4, 0.1], "n_tracks": 6, "frames": 50})
    assert isinstance(short, Caution) and short.startswith("D range: not estimated")
    assert not isinstance(measured, Caution) and measured.startswith("D range: from a first tracking pass")
