"""Commands that work on a microscope's own recordings: predict (localise), calibrate
(fit the simulator to the microscope), track (link and estimate D)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.options import (GIVEN_BY, Device, Estimator, Precision, Target, channel_option, device_option, dwell_option,
                         frame_flyback_option,
                         line_retrace_option, notes, out_option, overwrite_option, pixel_size_option, precision_option,
                         quiet_option, scan_direction_option)
from factory.errors import FactoryError

# The detector a command runs.
_MODEL_HELP = "A run folder from `factory train`, a trackpy.json, or 'trackpy' (the paper's settings)."


def predict(
    model: str = typer.Argument(..., help=_MODEL_HELP),
    input: Path = typer.Argument(..., help="TIFF (one image or a T x H x W stack), .npy, or a store."),
    out: Path = out_option("CSV to write: frame, t_s, x, y, score (+ sigma), pixel-centre origin."),
    channel: Optional[int] = channel_option(),
    pixel_size_um: Optional[float] = pixel_size_option("Also write x_um, y_um (and sigma_um)."),
    dwell_us: Optional[float] = dwell_option("Pixel dwell time (us) of the recording."),
    line_retrace_ms: Optional[float] = line_retrace_option(),
    frame_flyback_ms: Optional[float] = frame_flyback_option(),
    bidirectional: Optional[bool] = scan_direction_option("Scan direction of the recording."),
    all_scores: bool = typer.Option(False, "--all", help="Keep every candidate, not only those above the model's tuned threshold."),
    z_step_um: Optional[float] = typer.Option(None, "--z-step-um", help="3D models: the z step of the stacks (um), where the TIFF does "
                                                                        "not record it."),
    target: Optional[Target] = typer.Option(None, "--target", help="Models with a head per target: centroid (the paper's, the default) "
                                                                   "or exposure (what the laser saw, stamped with its scan time)."),
    device: Device = device_option(),
    precision: Precision = precision_option(Precision.auto),
    overwrite: bool = overwrite_option("Replace the CSV of an earlier run."),
    quiet: bool = quiet_option(),
) -> None:
    """Localise particles in recordings (any image size) and time-stamp each one.

    3D models (dmdetnet3d) take z-stacks (Z x H x W or T x Z x H x W TIFFs, or a stack
    store) and write frame, x, y, z_um (from the first plane), score; the z step comes
    from --z-step-um, else the TIFF's metadata (or the store), else the model's training
    data, and the output says which.

    t_s (seconds from the recording's first pixel) is the scan time at the localisation
    for exposure-target models and TrackPy, and the frame's mean pixel time for
    centroid-target models.  Scan timing: the flags, else the store's own (store input),
    else the model's training data, else the seed paper's; the output says which."""
    from models.recordings.outputs import staged_output
    from models.recordings.predict import predict_file

    if out.suffix.lower() != ".csv":
        raise FactoryError(f"{out}: --out must be a .csv file")
    with staged_output(out, "file", overwrite=overwrite, what="CSV file") as csv:
        found = predict_file(model, input, pixel_size_um=pixel_size_um, dwell_us=dwell_us,
                             line_retrace_ms=line_retrace_ms, frame_flyback_ms=frame_flyback_ms,
                             bidirectional=bidirectional, all_scores=all_scores, z_step_um=z_step_um,
                             target=target.value if target else None, device=device.value,
                             precision=precision.value, progress=not quiet, channel=channel,
                             report=notes(quiet), given_by=GIVEN_BY)
        found.table.to_csv(csv, index=False)
    typer.echo(f"{out}: {len(found.table)} localisations in {found.description}")


def calibrate(
    recording: Path = typer.Argument(..., help="The recording: a T x H x W TIFF (or .npy) of detector values (ADU); one H x W image is "
                                               "one frame."),
    out: Path = out_option("Folder for microscope.yaml, train.yaml, calibration.md and calibration.png."),
    channel: Optional[int] = channel_option(),
    pixel_size_um: float = pixel_size_option("Pixel size (um).", ...),
    dwell_us: float = dwell_option("Pixel dwell time (us).", ...),
    line_retrace_ms: float = line_retrace_option(...),
    frame_flyback_ms: Optional[float] = frame_flyback_option(),
    bidirectional: bool = scan_direction_option("Scan direction.", False),
    dark: Optional[Path] = typer.Option(None, "--dark", help="Frames recorded with the laser blanked (same field size): they pin the "
                                                             "offset and read noise."),
    seed: int = typer.Option(0, "--seed", help="Seed of the simulations run to fit the spot model, and of the config written."),
    overwrite: bool = overwrite_option("Replace the files of an earlier calibration in --out."),
) -> None:
    """Estimate your microscope from its own recording: detector offset, read noise, gain
    and excess noise factor (from dark frames and the background's cumulants), background,
    PSF width and spot brightness (the simulator's spot model fitted to isolated spots),
    particle density.  Writes a datasets config to build training data for it, a training
    config, and a report with a picture of real beside simulated frames.  Then:
    `factory build OUT/microscope.yaml --out DATA`, `factory train --config OUT/train.yaml
    --data DATA --out RUN`, `factory track RUN RECORDING --out TRACKS`."""
    from models.recordings.calibration import CALIBRATION_FILES, Caution, calibrate as run_calibrate
    from models.recordings.outputs import staged_output
    from models.recordings.recording import check_settings

    check_settings(pixel_size_um=pixel_size_um, dwell_us=dwell_us, line_retrace_ms=line_retrace_ms,
                   frame_flyback_ms=frame_flyback_ms)
    with staged_output(out, "folder", CALIBRATION_FILES, overwrite, what=", ".join(CALIBRATION_FILES)) as folder:
        result = run_calibrate(recording, folder, pixel_size_um=pixel_size_um, dwell_us=dwell_us,
                               line_retrace_ms=line_retrace_ms, frame_flyback_ms=frame_flyback_ms,
                               bidirectional=bidirectional, dark=dark, seed=seed, channel=channel)
    warnings = [note for note in result["notes"] if isinstance(note, Caution)]
    for note in warnings:
        typer.echo(f"{recording}: {note}", err=True)
    gain, offset, background = (result["detector"][k]["value"] for k in ("gain_adu_per_photon", "offset_adu", "n_bkg"))
    sigma_xy = result["config"]["psf"]["sigma_xy_um"]
    typer.echo(f"{out}: gain {gain:.4g} ADU/photon, offset {offset:.4g} ADU, background {background:.3g} photons, "
               f"sigma_xy {sigma_xy:g} um; {len(result['notes'])} note(s) in calibration.md")


def track(
    model: str = typer.Argument(..., help=_MODEL_HELP),
    input: Path = typer.Argument(..., help="A movie: a T x H x W TIFF, or a movie store (every movie tracked)."),
    out: Path = out_option("Folder for tracks.csv, diffusion.csv, tracks.png and track.json."),
    channel: Optional[int] = channel_option(),
    pixel_size_um: Optional[float] = pixel_size_option("Pixel size (um); default: the store's, else the model's "
                                                       "training data."),
    dwell_us: Optional[float] = dwell_option("Pixel dwell time (us)."),
    line_retrace_ms: Optional[float] = line_retrace_option(),
    frame_flyback_ms: Optional[float] = frame_flyback_option(),
    bidirectional: Optional[bool] = scan_direction_option("Scan direction."),
    max_diffusion: Optional[float] = typer.Option(None, "--max-diffusion-um2-s", help="Largest D expected (default: the training "
                                                                                      "data's or the store's largest D); the linking "
                                                                                      "radius is for the geometric middle of the "
                                                                                      "smallest and the largest, and no track "
                                                                                      "reaches beyond the radius for the largest "
                                                                                      "(--linker stitch: the largest D a fragment "
                                                                                      "may have)."),
    search_range_um: Optional[float] = typer.Option(None, "--search-range-um", help="Linking radius (um), instead of one derived from D "
                                                                                    "and the frame period."),
    memory: int = typer.Option(1, "--memory", min=0, max=10, help="Frames a particle may vanish and still be linked."),
    linker: str = typer.Option("adaptive", "--linker", help="adaptive: a new track reaches the radius for the middle "
                                                            "of the D range, then each track's reach and cost follow "
                                                            "its own steps, between the radii for the smallest and "
                                                            "the largest D; radius: one radius, for the middle, for "
                                                            "every track (the smallest sum of squared steps, "
                                                            "TrackPy's criterion); stitch: a radius for the smallest "
                                                            "D, then track fragments joined by their own D."),
    min_diffusion: Optional[float] = typer.Option(None, "--min-diffusion-um2-s", help="Smallest D expected (default: the "
                                                                                     "training data's or the store's smallest "
                                                                                     "D)."),
    split: bool = typer.Option(True, "--split/--no-split", help="Cut tracks at steps too long for their own mobility "
                                                                "(p = 0.001 under the track's median step): wrong "
                                                                "links to a neighbour."),
    estimator: Estimator = typer.Option(Estimator.pooled, "--estimator", help="D per track: pooled (each track's own steps, "
                                                                              "the localisation error pooled over the recording, "
                                                                              "weighed against the model's own predicted "
                                                                              "errors), "
                                                                              "cve (covariance-based per track, Vestergaard 2014) "
                                                                              "or msd (MSD fit over Michalet's number of lags)."),
    device: Device = device_option(),
    precision: Precision = precision_option(Precision.auto),
    overwrite: bool = overwrite_option("Replace the files of an earlier run in --out."),
    quiet: bool = quiet_option(),
) -> None:
    """Localise, link and estimate D: tracks of a movie and the diffusion coefficient of
    each track (from its own steps on each localisation's own time stamp, with the
    localisation error pooled over the recording; its 95% confidence interval)."""
    from models.recordings.outputs import staged_output
    from models.tracking.tracks import TRACK_FILES, track_file

    with staged_output(out, "folder", TRACK_FILES, overwrite, what=", ".join(TRACK_FILES)) as folder:
        result = track_file(model, input, folder, pixel_size_um=pixel_size_um, dwell_us=dwell_us,
                            line_retrace_ms=line_retrace_ms, frame_flyback_ms=frame_flyback_ms,
                            bidirectional=bidirectional, max_diffusion_um2_s=max_diffusion,
                            min_diffusion_um2_s=min_diffusion, search_range_um=search_range_um, memory=memory,
                            linker=linker, estimator=estimator.value, split=split, device=device.value,
                            precision=precision.value, progress=not quiet, channel=channel,
                            report=notes(quiet), given_by=GIVEN_BY)
    typer.echo(f"{out}: {result.summary()}")
