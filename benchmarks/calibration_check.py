"""Held-out check of `factory calibrate`: recordings of five microscopes unlike the
paper's, simulated and written as TIFFs of ADU, calibrated as a user would (with and
without 20 dark frames), every estimate against the truth.

    python benchmarks/calibration_check.py [--out DIR] [--microscopes 5] [--seed 0]

Without dark frames only the detector is estimated (`calibrate_detector`).  Each
microscope is drawn from the ranges of the held-out check (pixel 0.1-0.2 um, dwell
1-8 us, PMT gain 5-50 ADU/photon with an offset, read noise 2-10 ADU, background 2-20
photons, N_qd 4-20 with a +-30% spread, sigma_xy 0.18-0.3 um, 20-40 particles in a
256 x 256 px field, 50 frames).  Prints one table row per microscope and quantity:
the error and whether the truth lies within two reported standard uncertainties.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def microscope(rng) -> dict:
    """One foreign microscope, drawn from the held-out ranges."""
    return {"pixel_size_um": round(float(rng.uniform(0.1, 0.2)), 3), "dwell_us": round(float(rng.uniform(1, 8)), 2),
            "line_retrace_ms": round(float(rng.uniform(0.3, 1.5)), 2),
            "gain": round(float(rng.uniform(5, 50)), 2), "enf": round(float(rng.uniform(1.15, 1.6)), 3),
            "offset": round(float(rng.uniform(20, 500)), 1), "read": round(float(rng.uniform(2, 10)), 2),
            "n_bkg": round(float(rng.uniform(2, 20)), 2), "n_qd": round(float(rng.uniform(4, 20)), 2),
            "sigma_xy": round(float(rng.uniform(0.18, 0.3)), 3), "count": int(rng.integers(20, 41))}


# The example of `make microscope`: a lab's microscope unlike the paper's (the flags of
# its recording are written in the Makefile).
EXAMPLE = {"pixel_size_um": 0.15, "dwell_us": 4.0, "line_retrace_ms": 0.6, "gain": 15.0, "enf": 1.35,
           "offset": 120.0, "read": 5.0, "n_bkg": 6.0, "n_qd": 12.0, "sigma_xy": 0.24, "count": 30}


def sections(m: dict) -> dict:
    return dict(image={"height_px": 256, "width_px": 256, "pixel_size_um": m["pixel_size_um"]},
                scan={"dwell_us": m["dwell_us"], "line_retrace_ms": m["line_retrace_ms"]},
                output={"expected": False, "trajectories": False},
                detector={"type": "pmt", "gain_adu_per_photon": m["gain"], "excess_noise_factor": m["enf"],
                          "offset_adu": m["offset"], "read_noise_adu": m["read"]},
                psf={"sigma_xy_um": m["sigma_xy"]}, background={"n_bkg": m["n_bkg"]},
                particles={"count": {"type": "poisson", "mean": m["count"], "max": 3 * m["count"]},
                           "n_qd": {"type": "uniform", "low": 0.7 * m["n_qd"], "high": 1.3 * m["n_qd"]},
                           "diffusion_um2_s": {"type": "log_uniform", "low": 0.02, "high": 0.5},
                           "xy_start": {"type": "uniform"},
                           "z_start_um": {"type": "uniform", "low": -1.0, "high": 1.0}})


TRUTH_KEYS = ("centroids", "exposure_xy", "in_view", "n_particles", "diffusion", "exposure_t_s", "frame_start_s",
              "on_fraction")


def record(m: dict, folder: Path, seed: int, name: str = "movie", dark: bool = True) -> tuple[Path, Path | None]:
    """The movie (50 frames) and 20 dark frames of microscope ``m``, as TIFFs of ADU,
    and the movie's truth (``NAME.truth.npz``: the simulator's per-frame arrays)."""
    import tifffile

    from factory.config import parse_config
    from factory.kernel import simulate

    s = sections(m)
    cfg = parse_config({"seed": seed, "datasets": {
        "movie": {"n_movies": 1, "movie": {"n_frames": 50, "margin_um": 1.0}, **s},
        "dark": {"n_images": 20, **{**s, "background": {"n_bkg": 0.0}, "particles": {"count": 0}}}}})
    rec = folder / f"{name}.tif"
    rows = simulate(cfg.datasets["movie"], cfg.seed)
    tifffile.imwrite(rec, rows["images"])
    np.savez_compressed(folder / f"{name}.truth.npz", **{k: rows[k] for k in TRUTH_KEYS if k in rows})
    if not dark:
        return rec, None
    dark_path = folder / "dark.tif"
    tifffile.imwrite(dark_path, simulate(cfg.datasets["dark"], cfg.seed + 1)["images"])
    return rec, dark_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="keep the recordings and calibrations here (default: a temporary folder)")
    ap.add_argument("--microscopes", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--example", type=Path, metavar="DIR",
                    help="only write the example recording (movie.tif, dark.tif) of `make microscope` into DIR")
    args = ap.parse_args()
    if args.example:
        args.example.mkdir(parents=True, exist_ok=True)
        rec, dark = record(EXAMPLE, args.example, args.seed)
        print(f"{rec}, {dark}: 50 frames of 256 x 256 px and 20 dark frames of the example microscope {EXAMPLE}")
        return
    import tifffile

    from models.recordings.calibration import calibrate, calibrate_detector

    rng = np.random.default_rng(args.seed)
    root = args.out or Path(tempfile.mkdtemp(prefix="calibration-check-"))
    print("| microscope | dark | offset | gain | F | background (photons) | g F | background (ADU) | sigma_xy | median N_qd | s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for i in range(args.microscopes):
        m = microscope(rng)
        folder = root / f"microscope{i}"
        folder.mkdir(parents=True, exist_ok=True)
        rec, dark = record(m, folder, args.seed + 10 * i)
        truth = {"offset_adu": m["offset"], "gain_adu_per_photon": m["gain"], "excess_noise_factor": m["enf"],
                 "n_bkg": m["n_bkg"], "gain_x_enf_adu": m["gain"] * m["enf"], "background_adu": m["gain"] * m["n_bkg"]}
        for with_dark in (True, False):
            out = folder / ("dark" if with_dark else "nodark")
            out.mkdir(exist_ok=True)
            t = time.perf_counter()
            if with_dark:
                r = calibrate(rec, out, pixel_size_um=m["pixel_size_um"], dwell_us=m["dwell_us"],
                              line_retrace_ms=m["line_retrace_ms"], dark=dark, seed=args.seed)
            else:  # the detector only: what the recording alone can give
                r = {"detector": calibrate_detector(tifffile.imread(rec), seed=args.seed).to_dict(), "spots": None}
            secs = time.perf_counter() - t
            cells = []
            for key, want in truth.items():
                e = r["detector"][key]
                err = 100 * (e["value"] / want - 1)
                inside = abs(e["value"] - want) <= 2 * e["sigma"] if np.isfinite(e["sigma"]) else False
                cells.append(f"{err:+.1f}%{' (in)' if inside else ''}")
            sp = r["spots"]
            for key, want in (("sigma_xy_um", m["sigma_xy"]), ("n_qd", m["n_qd"])):
                if sp is None:
                    cells.append("-")
                    continue
                e = sp[key]
                inside = abs(e["value"] - want) <= 2 * e["sigma"]
                cells.append(f"{100 * (e['value'] / want - 1):+.1f}%{' (in)' if inside else ''}")
            desc = (f"{m['pixel_size_um']} um, {m['dwell_us']} us, g {m['gain']}, F {m['enf']}, o {m['offset']}, "
                    f"r {m['read']}, bkg {m['n_bkg']}, N {m['n_qd']}, s {m['sigma_xy']}, {m['count']} particles")
            print(f"| {desc} | {'yes' if with_dark else 'no'} | " + " | ".join(cells) + f" | {secs:.0f} |", flush=True)


if __name__ == "__main__":
    main()
