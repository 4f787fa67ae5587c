"""The `factory` command: thin wrappers that validate, then call the library."""

from __future__ import annotations

import functools
import json
import logging
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from factory.errors import FactoryError


class _Commands(typer.core.TyperGroup):
    """`factory --help` lists each command with its first sentence whole (wrapped to the
    terminal, not cut with '...')."""

    def format_commands(self, ctx, formatter) -> None:
        rows = [(name, cmd.get_short_help_str(limit=10_000)) for name in self.list_commands(ctx)
                if (cmd := self.get_command(ctx, name)) is not None and not cmd.hidden]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


app = typer.Typer(
    cls=_Commands,
    name="factory",
    help=(
        "Simulate two-photon laser-scanning microscopy of diffusing nanoparticles, "
        "build training sets (HDF5 or Zarr), train and evaluate detectors, and localise particles in recordings."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    # Plain help: rich's option table cuts long option names ("--line-retrace…") on an
    # 80-column terminal; plain help wraps the descriptions and keeps every name whole.
    rich_markup_mode=None,
)


class Format(str, Enum):
    hdf5 = "hdf5"
    zarr = "zarr"


class Target(str, Enum):
    centroid = "centroid"
    exposure = "exposure"


def user_errors(fn):
    """Turn a FactoryError into one line on stderr and exit status 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FactoryError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


def _stderr(quiet: bool):
    """Where a command's notes go (which settings were used and why): stderr, none with --quiet."""
    return None if quiet else (lambda line: typer.echo(line, err=True))


# How the notes name settings that came from flags.
_GIVEN_BY = "the command line"


@app.command()
@user_errors
def build(
    config: Path = typer.Argument(..., help="Datasets YAML file (see `factory schema`)."),
    out: Path = typer.Option(Path("data"), "--out", "-o", help="Output folder for the stores."),
    fmt: Format = typer.Option(Format.hdf5, "--format", "-f", help="Store format: <out>/<name>.h5 or <out>/<name>.zarr."),
    only: Optional[List[str]] = typer.Option(None, "--only", help="Build only this dataset (repeatable)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace stores that already exist (with --shard: rebuild a complete "
                                                              "shard)."),
    shard: Optional[str] = typer.Option(None, "--shard", help="Build only shard I/N (I from 0) of each dataset, or 'auto' inside a SLURM "
                                                              "array job."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no size estimate."),
) -> None:
    """Build the datasets of CONFIG into chunked, compressed stores.

    Each image is simulated from its own random stream (seed, dataset, index), so the
    same config gives the same bytes on any number of threads, processes or shards.
    Stores are written under a temporary name and renamed when complete.  With
    --shard, rerunning skips shards that are complete and valid; `factory finalize`
    then assembles them.
    """
    from factory.build import build as build_stores
    from factory.config import load_config
    from factory.shards import build_shards, parse_shard

    cfg = load_config(config)
    # The size estimate goes to stderr (stdout lists the stores built); --quiet drops it.
    report = _stderr(quiet)
    if shard is not None:
        shard_spec = parse_shard(shard)
        results = build_shards(cfg, out, fmt.value, only, shard_spec, overwrite, progress=not quiet,
                               report=report)
    else:
        shard_spec = None
        results = build_stores(cfg, out, fmt.value, only, overwrite, progress=not quiet, report=report)
    for r in results:
        if r.skipped:
            typer.echo(f"{r.path}: complete and valid, skipped")
        elif shard_spec is not None:
            typer.echo(f"{r.path}: {r.n_images} images, {r.seconds:.2f} s")
        else:
            typer.echo(f"{r.path}: {r.n_images} images, {r.bytes_on_disk / 1e6:.1f} MB, {r.seconds:.2f} s")


@app.command()
@user_errors
def finalize(
    config: Path = typer.Argument(..., help="The datasets YAML the shards were built from."),
    out: Path = typer.Option(Path("data"), "--out", "-o", help="The folder the shards were built into."),
    fmt: Format = typer.Option(Format.hdf5, "--format", "-f", help="Format the shards were built in."),
    only: Optional[List[str]] = typer.Option(None, "--only", help="Finalize only this dataset (repeatable)."),
    copy: bool = typer.Option(False, "--copy", help="HDF5: write one self-contained file instead of a virtual dataset over the shard "
                                                    "files."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a store of another dataset that sits at the final name "
                                                              "(finalizing the same dataset again needs no flag)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Check every shard (present, same config, checksums) and publish the stores.

    HDF5: <out>/<name>.h5 becomes a virtual dataset over <out>/<name>.shards/ (keep that
    folder beside it) or, with --copy, one self-contained file.  Zarr: the shards are
    recorded in the store, its metadata consolidated, and only then does it move from
    <out>/<name>.zarr.shards/ to <out>/<name>.zarr.  A missing or corrupt shard
    is an error naming the shards to rerun.
    """
    from factory.config import load_config
    from factory.finalize import finalize as finalize_stores

    cfg = load_config(config)
    for path in finalize_stores(cfg, out, fmt.value, only, copy, progress=not quiet, overwrite=overwrite):
        typer.echo(f"{path}: finalized")


@app.command()
@user_errors
def verify(
    path: Path = typer.Argument(..., help="A store (.h5 / .zarr) or a folder of stores."),
) -> None:
    """Check finished stores: complete, every shard's checksums, config hash."""
    from factory.finalize import verify_store
    from factory.stores import find_stores

    failed = False
    for p in find_stores(path):
        problems = verify_store(p)
        if problems:
            failed = True
            for line in problems:
                typer.echo(f"error: {line}", err=True)
        else:
            typer.echo(f"{p}: ok")
    if failed:
        raise typer.Exit(1)


@app.command()
@user_errors
def slurm(
    config: Path = typer.Argument(..., help="Datasets YAML file."),
    shards: int = typer.Option(..., "--shards", min=1, help="Array tasks (shards per dataset)."),
    out: Path = typer.Option(Path("data"), "--out", "-o", help="Output folder (on a filesystem every node sees)."),
    fmt: Format = typer.Option(Format.hdf5, "--format", "-f", help="Store format."),
    only: Optional[List[str]] = typer.Option(None, "--only", help="Only this dataset (repeatable)."),
    partition: Optional[str] = typer.Option(None, "--partition", help="SLURM partition."),
    time_limit: str = typer.Option("01:00:00", "--time", help="Time limit per task (SLURM format)."),
    cpus: int = typer.Option(2, "--cpus", min=1, help="CPUs per task (Numba threads)."),
    mem: str = typer.Option("4G", "--mem", help="Memory per task (SLURM format)."),
    copy: bool = typer.Option(False, "--copy", help="HDF5: finalize into one self-contained file."),
    submit: bool = typer.Option(False, "--submit", help="Submit both jobs with sbatch."),
) -> None:
    """Write an sbatch array job that builds the shards and a finalize job that runs
    after it (afterok), into <out>/slurm/; --submit submits both."""
    from factory.config import load_config
    from factory.slurm import sbatch_scripts, submit as submit_jobs, write_scripts

    cfg = load_config(config)
    cfg.select(only)
    build_script, fin_script = write_scripts(
        sbatch_scripts(config, out, shards, fmt.value, only, partition, time_limit, cpus, mem, copy),
        Path(out) / "slurm")
    typer.echo(f"wrote {build_script}\nwrote {fin_script}")
    if submit:
        array, fin = submit_jobs(build_script, fin_script)
        typer.echo(f"submitted array job {array} ({shards} tasks) and finalize job {fin} (afterok:{array})")
    else:
        typer.echo(f"submit with: jid=$(sbatch --parsable {build_script}) && "
                   f"sbatch --dependency=afterok:$jid {fin_script}")


@app.command()
@user_errors
def inspect(
    path: Path = typer.Argument(..., help="A store (.h5 / .zarr) or a folder of stores."),
    brief: bool = typer.Option(False, "--brief", help="One line per store."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show shapes, generation parameters and photon statistics of stores."""
    from factory.inspect_store import format_summary, summarize
    from factory.stores import find_stores

    summaries = [summarize(p) for p in find_stores(path)]
    if as_json:
        typer.echo(json.dumps(summaries, indent=2))
        return
    for s in summaries:
        typer.echo(format_summary(s, brief))


@app.command()
@user_errors
def preview(
    path: Path = typer.Argument(..., help="A store (.h5 / .zarr)."),
    out: Path = typer.Option(..., "--out", "-o", help="Picture to write (.png, .pdf, .svg; .gif animates a movie)."),
    n: int = typer.Option(16, "--n", min=1, max=400, help="Images in the montage (frames in a movie strip)."),
    start: int = typer.Option(0, "--start", min=0, help="Index of the first image."),
    movie: int = typer.Option(0, "--movie", min=0, help="Movie stores: which movie to show."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a picture that is already there."),
) -> None:
    """Draw images with their true trajectories and centroids; for a movie store, a strip
    of one movie's frames (or a .gif of it) with each particle's path and both truths."""
    from factory.errors import StoreError
    from factory.preview import movie_preview, preview as draw
    from factory.stores import Store
    from models.recordings.outputs import staged_output

    if out.suffix.lower() not in (".png", ".pdf", ".svg", ".jpg", ".gif"):
        raise FactoryError(f"{out}: --out must end in .png, .pdf, .svg, .jpg or .gif")
    with staged_output(out, "file", overwrite=overwrite, what="picture") as picture:
        with Store(path) as st:
            is_movie = st.config["dataset"].get("movie") is not None and "exposure_xy" in st
            if start >= len(st):
                raise StoreError(f"{path}: --start {start} is beyond the last image ({len(st) - 1})")
        if is_movie:
            try:
                movie_preview(path, picture, movie, n)
            except ValueError as exc:
                raise StoreError(f"{path}: --movie: {exc}") from None
        elif out.suffix.lower() == ".gif":
            raise FactoryError(f"{out}: a .gif animates a movie store; {path} holds independent images")
        else:
            draw(path, picture, n, start)
    typer.echo(str(out))


def _gates(text: str) -> tuple[float, ...]:
    import math

    try:
        gates = tuple(float(g) for g in text.split(",") if g.strip())
    except ValueError:
        raise FactoryError(f"--gates-nm {text}: expected comma-separated distances in nm, e.g. 70,140,210") from None
    if not gates or any(not (g > 0 and math.isfinite(g)) for g in gates):
        raise FactoryError(f"--gates-nm {text}: every gate must be a finite distance > 0 nm")
    return gates


@app.command()
@user_errors
def evaluate(
    data: Path = typer.Option(..., "--data", "-d", help="Folder of stores (its test* stores are scored) or one store."),
    out: Path = typer.Option(..., "--out", "-o", help="Evaluation folder for metrics.json, table.md, table.csv, pr_*.png."),
    detector: Optional[str] = typer.Option(None, "--detector", help="A built-in detector: trackpy (tuned on --tune-on) or trackpy-paper "
                                                                    "(the seed paper's settings: diameter 7, separation 7, no "
                                                                    "preprocessing)."),
    model: Optional[Path] = typer.Option(None, "--model", help="A trained model's run folder (factory train)."),
    predictions: Optional[Path] = typer.Option(None, "--predictions", help="Score a CSV (frame, x, y, score; pixel-centre origin) "
                                                                           "against --data (one store)."),
    datasets: Optional[List[str]] = typer.Option(None, "--datasets", help="Score only these stores of --data (repeatable)."),
    params: Optional[Path] = typer.Option(None, "--params", help="TrackPy parameters (JSON written by an earlier run); skips tuning."),
    tune_on: str = typer.Option("val", "--tune-on", help="Store of --data to tune TrackPy on (never a test set)."),
    tune_images: int = typer.Option(600, "--tune-images", min=50, help="Images of --tune-on used for tuning."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="With --predictions: score cut for F1 (default: all)."),
    gates_nm: str = typer.Option("70,140,210", "--gates-nm", help="Distance gates of the PR-AUC in nm (converted per store from its "
                                                                  "pixel size)."),
    target: Target = typer.Option(Target.centroid, "--target", help="TrackPy and --predictions: the truth tuned and first scored against "
                                                                    "(centroid: the paper's; exposure: what the laser saw). Trained "
                                                                    "models use their own (a model with a head per target: this head); "
                                                                    "every store is also scored against each truth it holds."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the files of an earlier evaluation in --out."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Score a detector on the test stores: the seed paper's PR-AUC at 70/140/210 nm,
    deepBlink's F1 integral, F1 and RMSE at 140 nm; Table 1 beside the paper's rows.

    Gates are physical distances, converted to pixels with each store's pixel size."""
    from models.evaluation.evaluate import EVALUATION_FILES, evaluate_stores
    from models.recordings.outputs import staged_output

    gates = _gates(gates_nm)
    # An input inside --out (a trackpy.json given to --params) is never removed by --overwrite.
    with staged_output(out, "folder", EVALUATION_FILES, overwrite, what="the evaluation (metrics.json, table.md, ...)",
                       keep=(params,) if params else ()) as stage:
        evaluate_stores(data, stage, detector=detector, model=model, predictions=predictions, datasets=datasets,
                        params=params, tune_on=tune_on, tune_images=tune_images, threshold=threshold, gates_nm=gates,
                        target=target.value, progress=not quiet, report=_stderr(quiet))
    typer.echo((out / "table.md").read_text())


class Network(str, Enum):
    """The trainable network families (models.detectors.registry.NETWORKS, kept equal by a test: the
    registry imports torch, too slow to load for `--help`)."""

    spotnet = "spotnet"
    gridnet = "gridnet"
    densitynet = "densitynet"
    keypointrcnn = "keypointrcnn"
    dmdetnet3d = "dmdetnet3d"


class Estimator(str, Enum):
    cve = "cve"
    msd = "msd"


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


@app.command()
@user_errors
def train(
    model: Optional[Network] = typer.Option(None, "--model", "-m", help="The network: spotnet (the default), gridnet, densitynet or "
                                                                        "keypointrcnn for images, dmdetnet3d for z-stacks; without "
                                                                        "--config, that family's built-in parameters."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Folder with the train and val stores (factory build); default: the "
                                                                   "config's data."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: config.yaml, best.pt, last.pt, metrics.json."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Training config YAML (see configs/, or a run folder's "
                                                                       "config.yaml to reproduce it); --model overrides its model."),
    device: Device = typer.Option(Device.cpu, "--device", help="cpu or cuda."),
    resume: bool = typer.Option(False, "--resume", help="Continue from <out>/last.pt."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a trained model already in --out."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Override the config's epochs."),
    max_train_images: Optional[int] = typer.Option(None, "--max-train-images", min=1, help="Use only the first N training images."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Start from a trained run folder (or weights file): overrides the "
                                                                       "config's init_from."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Train a detector on simulated data, keeping the epoch with the best validation AUC.

    Optimiser, schedule and seed come from the config; the run folder can be passed to
    `factory evaluate --model` and `factory predict`, and its config.yaml back to
    `factory train --config` to reproduce the run."""
    from models.training.config import load_train_config
    from models.recordings.outputs import check_output
    from models.training.runs import RunFolder
    from models.training.train import fit

    # Where the run goes, before anything is read or trained; whether it already holds a
    # trained model (--resume, --overwrite) is for fit to judge.
    check_output(out, "folder", overwrite=True, what="the run (config.yaml, best.pt, last.pt, metrics.json)")
    overrides = {k: v for k, v in {"epochs": epochs, "max_train_images": max_train_images,
                                   "init_from": init_from and str(init_from)}.items() if v is not None}
    if resume and config is None:
        config = RunFolder(out).file(RunFolder.CONFIG)
    cfg = load_train_config(config, model.value if model else None, overrides)
    m = fit(cfg, data, out, device.value, resume, progress=not quiet, overwrite=overwrite)
    best = m["history"][m["best_epoch"] - 1]["val_auc"]
    typer.echo(f"{out}: best epoch {m['best_epoch']} of {cfg.epochs}, validation AUC "
               f"{' / '.join(f'{a:.3f}' for a in best.values())} at {' / '.join(best)} nm, "
               f"F1 threshold {m['threshold']:.3f}, {m['train_seconds'] / 60:.1f} min")


@app.command()
@user_errors
def predict(
    model: str = typer.Argument(..., help="A run folder from `factory train`, a trackpy.json, or 'trackpy' (the paper's settings)."),
    input: Path = typer.Argument(..., help="TIFF (one image or a T x H x W stack), .npy, or a store."),
    out: Path = typer.Option(..., "--out", "-o", help="CSV to write: frame, t_s, x, y, score (+ sigma), pixel-centre origin."),
    pixel_size_um: Optional[float] = typer.Option(None, "--pixel-size-um", help="Also write x_um, y_um (and sigma_um)."),
    dwell_us: Optional[float] = typer.Option(None, "--dwell-us", help="Pixel dwell time (us) of the recording."),
    line_retrace_ms: Optional[float] = typer.Option(None, "--line-retrace-ms", help="Line retrace time (ms)."),
    frame_flyback_ms: Optional[float] = typer.Option(None, "--frame-flyback-ms", help="Time from a frame's last pixel to the next "
                                                                                      "frame's first (ms; default one line retrace)."),
    bidirectional: Optional[bool] = typer.Option(None, "--bidirectional/--unidirectional", help="Scan direction of the recording."),
    all_scores: bool = typer.Option(False, "--all", help="Keep every candidate, not only those above the model's tuned threshold."),
    z_step_um: Optional[float] = typer.Option(None, "--z-step-um", help="3D models: the z step of the stacks (um), where the TIFF does "
                                                                        "not record it."),
    target: Optional[Target] = typer.Option(None, "--target", help="Models with a head per target: centroid (the paper's, the default) "
                                                                   "or exposure (what the laser saw, stamped with its scan time)."),
    device: Device = typer.Option(Device.cpu, "--device", help="cpu or cuda."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the CSV of an earlier run."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
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
                             target=target.value if target else None, device=device.value, progress=not quiet,
                             report=_stderr(quiet), given_by=_GIVEN_BY)
        found.table.to_csv(csv, index=False)
    typer.echo(f"{out}: {len(found.table)} localisations in {found.description}")


@app.command()
@user_errors
def calibrate(
    recording: Path = typer.Argument(..., help="The recording: a T x H x W TIFF (or .npy) of detector values (ADU); one H x W image is "
                                               "one frame."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for microscope.yaml, train.yaml, calibration.md and calibration.png."),
    pixel_size_um: float = typer.Option(..., "--pixel-size-um", help="Pixel size (um)."),
    dwell_us: float = typer.Option(..., "--dwell-us", help="Pixel dwell time (us)."),
    line_retrace_ms: float = typer.Option(..., "--line-retrace-ms", help="Line retrace time (ms)."),
    frame_flyback_ms: Optional[float] = typer.Option(None, "--frame-flyback-ms", help="Time from a frame's last pixel to the next "
                                                                                      "frame's first (ms; default one line retrace)."),
    bidirectional: bool = typer.Option(False, "--bidirectional/--unidirectional", help="Scan direction."),
    dark: Optional[Path] = typer.Option(None, "--dark", help="Frames recorded with the laser blanked (same field size): they pin the "
                                                             "offset and read noise."),
    seed: int = typer.Option(0, "--seed", help="Seed of the simulations run to fit the spot model, and of the config written."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the files of an earlier calibration in --out."),
) -> None:
    """Estimate your microscope from its own recording: detector offset, read noise, gain
    and excess noise factor (from dark frames and the background's cumulants), background,
    PSF width and spot brightness (the simulator's spot model fitted to isolated spots),
    particle density.  Writes a datasets config to build training data for it, a training
    config, and a report with a picture of real beside simulated frames.  Then:
    `factory build OUT/microscope.yaml --out DATA`, `factory train --config OUT/train.yaml
    --data DATA --out RUN`, `factory track RUN RECORDING --out TRACKS`."""
    from models.recordings.calibration import CALIBRATION_FILES, calibrate as run_calibrate
    from models.recordings.outputs import staged_output
    from models.recordings.recording import check_settings

    check_settings(pixel_size_um=pixel_size_um, dwell_us=dwell_us, line_retrace_ms=line_retrace_ms,
                   frame_flyback_ms=frame_flyback_ms)
    with staged_output(out, "folder", CALIBRATION_FILES, overwrite, what=", ".join(CALIBRATION_FILES)) as folder:
        result = run_calibrate(recording, folder, pixel_size_um=pixel_size_um, dwell_us=dwell_us,
                               line_retrace_ms=line_retrace_ms, frame_flyback_ms=frame_flyback_ms,
                               bidirectional=bidirectional, dark=dark, seed=seed)
    d, c = result["detector"], result["config"]
    for note in result["notes"]:  # what could not be estimated, and the default written instead
        if any(w in note for w in ("not estimated", "not determined", "assumed", "saturated")):
            typer.echo(f"{recording}: {note}", err=True)
    typer.echo(f"{out}: gain {d['gain_adu_per_photon']['value']:.4g} ADU/photon, offset {d['offset_adu']['value']:.4g} ADU, "
               f"background {d['n_bkg']['value']:.3g} photons, sigma_xy {c['psf']['sigma_xy_um']:g} um; "
               f"{len(result['notes'])} note(s) in calibration.md")


@app.command()
@user_errors
def track(
    model: str = typer.Argument(..., help="A run folder from `factory train`, a trackpy.json, or 'trackpy' (the paper's settings)."),
    input: Path = typer.Argument(..., help="A movie: a T x H x W TIFF, or a movie store (every movie tracked)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for tracks.csv, diffusion.csv, tracks.png and track.json."),
    pixel_size_um: Optional[float] = typer.Option(None, "--pixel-size-um", help="Pixel size (um); default: the store's, else the model's "
                                                                                "training data."),
    dwell_us: Optional[float] = typer.Option(None, "--dwell-us", help="Pixel dwell time (us)."),
    line_retrace_ms: Optional[float] = typer.Option(None, "--line-retrace-ms", help="Line retrace time (ms)."),
    frame_flyback_ms: Optional[float] = typer.Option(None, "--frame-flyback-ms", help="Time from a frame's last pixel to the next "
                                                                                      "frame's first (ms; default one line retrace)."),
    bidirectional: Optional[bool] = typer.Option(None, "--bidirectional/--unidirectional", help="Scan direction."),
    max_diffusion: Optional[float] = typer.Option(None, "--max-diffusion-um2-s", help="Largest D expected: sets the linking radius "
                                                                                      "(default: the training data's or the store's "
                                                                                      "largest D)."),
    search_range_um: Optional[float] = typer.Option(None, "--search-range-um", help="Linking radius (um), instead of one derived from D "
                                                                                    "and the frame period."),
    memory: int = typer.Option(1, "--memory", min=0, max=10, help="Frames a particle may vanish and still be linked."),
    linker: str = typer.Option("trackpy", "--linker", help="trackpy: one radius, for the largest D (Crocker-Grier with "
                                                           "subnetworks); stitch: a radius for the smallest D, then track "
                                                           "fragments joined by their own D (fields of mixed mobility)."),
    min_diffusion: Optional[float] = typer.Option(None, "--min-diffusion-um2-s", help="Smallest D expected: the first radius "
                                                                                     "of --linker stitch (default: the "
                                                                                     "training data's smallest D)."),
    estimator: Estimator = typer.Option(Estimator.cve, "--estimator", help="D per track: cve (covariance-based, Vestergaard 2014) or msd "
                                                                           "(MSD fit over Michalet's optimal number of lags)."),
    device: Device = typer.Option(Device.cpu, "--device", help="cpu or cuda."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the files of an earlier run in --out."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Localise, link and estimate D: tracks of a movie and the diffusion coefficient of
    each track (covariance-based estimator on each localisation's own time stamp, with
    its 95% confidence interval and the localisation error)."""
    from models.recordings.outputs import staged_output
    from models.tracking.tracks import TRACK_FILES, track_file

    with staged_output(out, "folder", TRACK_FILES, overwrite, what=", ".join(TRACK_FILES)) as folder:
        result = track_file(model, input, folder, pixel_size_um=pixel_size_um, dwell_us=dwell_us,
                            line_retrace_ms=line_retrace_ms, frame_flyback_ms=frame_flyback_ms,
                            bidirectional=bidirectional, max_diffusion_um2_s=max_diffusion,
                            min_diffusion_um2_s=min_diffusion, search_range_um=search_range_um, memory=memory,
                            linker=linker, estimator=estimator.value, device=device.value, progress=not quiet,
                            report=_stderr(quiet), given_by=_GIVEN_BY)
    typer.echo(f"{out}: {result.summary()}")


@app.command()
@user_errors
def report(
    runs: Path = typer.Argument(..., help="Folder holding evaluation run folders (e.g. runs/demo)."),
    data: Path = typer.Option(Path("data"), "--data", "-d", help="Folder with the test stores."),
    datasets: Optional[List[str]] = typer.Option(None, "--datasets", help="Report only these test stores of --data (repeatable)."),
) -> None:
    """Write <runs>/report.md: Table 1 with the paper's rows and every evaluated detector,
    the other metrics, PR curves and predictions drawn over test images (each run of
    report rewrites them: they describe the folder as it is)."""
    from models.recordings.outputs import check_output
    from models.evaluation.report import write_report

    if not runs.is_dir():
        raise FactoryError(f"{runs}: no such folder (the folder holding the evaluation runs to report)")
    check_output(runs, "folder", overwrite=True, flag="RUNS", what="report.md")
    typer.echo(str(write_report(runs, data, datasets=datasets)))


@app.command()
def schema() -> None:
    """List every config field with its type, default (the paper's values) and limits."""
    from factory.config import NAME_RULE
    from factory.inspect_store import schema_lines, size_lines

    typer.echo("Top level: seed (int), defaults (the fields below), datasets (name -> "
               "its size, n_images, n_movies or n_stacks, plus any field below to override).\n"
               f"{NAME_RULE[0].upper()}{NAME_RULE[1:]}.\n")
    for line in size_lines() + schema_lines():
        typer.echo(line)


def main() -> None:
    from factory.perf import tune_malloc

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Zarr reads chunks as asyncio tasks: when one chunk of a damaged store fails, its
    # siblings' exceptions are logged as "never retrieved" at exit, a traceback after the
    # one-line error that already said what is wrong.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    tune_malloc()
    app()


if __name__ == "__main__":
    sys.exit(main())
