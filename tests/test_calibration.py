"""The detector of a user's microscope, estimated from its own recording (models.calibration).

Checked against data drawn with NumPy's own generators from the compound Poisson-gamma
law (not the simulator's), against the simulator's PMT with spots in the field, and on
the inputs that cannot be calibrated.
"""

import numpy as np
import pytest

from conftest import dataset
from factory.errors import FactoryError
from factory.kernel import simulate
from models.calibration import calibrate_detector


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


def test_without_dark_frames_an_even_background_leaves_the_offset_undetermined_and_says_so():
    rng = np.random.default_rng(5)
    frames = pmt_frames(rng, (30, 64, 64), 6.0, 12.0, 1.35, 120.0, 4.0)
    cal = calibrate_detector(frames, None, bootstrap=50)
    assert cal.offset_adu.note.startswith("not determined") and "--dark" in cal.offset_adu.note
    assert any(n.startswith("offset: not determined") for n in cal.notes)


@pytest.mark.parametrize("frames", [np.full((3, 32, 32), 7, np.uint16), np.zeros((0, 32, 32))],
                         ids=["constant", "empty"])
def test_what_cannot_be_calibrated_is_refused_in_one_line(frames):
    with pytest.raises(FactoryError) as e:
        calibrate_detector(frames, source="rec.tif")
    assert str(e.value).startswith("rec.tif:") and "\n" not in str(e.value)
