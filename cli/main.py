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
    report = None if quiet else (lambda line: typer.echo(line, err=True))
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
    from models.outputs import staged_output

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
    import math

    from models.outputs import staged_output

    gates = _gates(gates_nm)
    chosen = [x for x in (detector, model, predictions) if x is not None]
    if len(chosen) != 1:
        raise FactoryError("give exactly one of --detector, --model or --predictions")
    if threshold is not None and not math.isfinite(threshold):
        raise FactoryError(f"--threshold {threshold}: a score cut must be a finite number")
    # An input inside --out (a trackpy.json given to --params) is never removed by --overwrite.
    with staged_output(out, "folder", EVALUATION_FILES, overwrite, what="the evaluation (metrics.json, table.md, ...)",
                       keep=(params,) if params else ()) as stage:
        _evaluate(stage, data, detector, model, predictions, datasets, params, tune_on, tune_images, threshold,
                  gates, target, quiet)
    typer.echo((out / "table.md").read_text())


# What `factory evaluate` writes into --out (glob patterns).
EVALUATION_FILES = ("metrics.json", "table.md", "table.csv", "pr_*.png", "predictions_*.csv", "tracks_*.csv",
                    "trackpy.json", "trackpy3d.json")


def _evaluate(out: Path, data: Path, detector, model, predictions, datasets, params, tune_on: str, tune_images: int,
              threshold, gates, target: Target, quiet: bool) -> None:
    """``factory evaluate`` into the folder ``out``."""
    from models.evaluate import evaluate_detector, find_test_stores, read_predictions_csv, write_evaluation

    if _stack_stores(find_test_stores(data, datasets)):
        _evaluate_stacks(data, out, detector, model, predictions, datasets, tune_on, quiet)
    elif predictions is not None:
        stores = find_test_stores(data, datasets)
        if len(stores) != 1:
            raise FactoryError(f"{data}: --predictions scores one store; pick it with --datasets NAME "
                               f"(found {', '.join(p.stem for p in stores)})")
        from factory.stores import Store

        with Store(stores[0]) as st:
            n = len(st)
        table = read_predictions_csv(predictions, n)
        write_evaluation(out, predictions.stem, {stores[0].stem: table}, {stores[0].stem: stores[0]}, threshold,
                         gates_nm=gates, target=target.value)
    elif detector is not None:
        if detector not in ("trackpy", "trackpy-paper"):
            raise FactoryError(f"--detector {detector}: unknown (built-in: trackpy, trackpy-paper; "
                               "trained networks: --model RUN_DIR)")
        det = _trackpy_detector(data, out, params, tune_on, tune_images, quiet, paper=detector == "trackpy-paper",
                                target=target.value)
        evaluate_detector(det, data, out, datasets, progress=not quiet,
                          extra={"params": det.params.model_dump()}, gates_nm=gates)
    else:
        from models.runs import load_model

        from models.runs import RunFolder

        heads = RunFolder(model).read_config().targets
        det = load_model(model, target=target.value if len(heads) > 1 else None)
        if det.ndim == 3:
            raise FactoryError(f"{model}: a 3D model scores z-stacks; {data} holds images (give stack stores)")
        evaluate_detector(det, data, out, datasets, progress=not quiet, extra={"model": str(model)}, gates_nm=gates)


def _stack_stores(stores: list[Path]) -> bool:
    """Whether the test stores are z-stacks (all of them) or images (none)."""
    from factory.stores import Store
    from models.volumes import is_stack_store

    kinds = {}
    for p in stores:
        with Store(p) as st:
            kinds[p] = is_stack_store(st)
    if len(set(kinds.values())) > 1:
        raise FactoryError(f"{', '.join(str(p) for p in stores)}: mixes z-stacks and images; "
                           "score them in separate runs (--datasets)")
    return any(kinds.values())


def _evaluate_stacks(data: Path, out: Path, detector, model, predictions, datasets, tune_on: str, quiet: bool):
    """``factory evaluate`` on z-stack stores: TrackPy 3D tuned on --tune-on, a 3D model,
    or a CSV of frame, x, y, z_um, score."""
    import numpy as np

    from factory.stores import Store
    from models.evaluate import find_test_stores, read_predictions_csv
    from models.volumes import evaluate_stacks, geometry, truth_um, tune_trackpy

    stores = find_test_stores(data, datasets)
    if predictions is not None:
        from models.metrics import evaluate_points_3d
        from models.volumes import stack_table

        if len(stores) != 1:
            raise FactoryError(f"{data}: --predictions scores one store; pick it with --datasets NAME")
        with Store(stores[0]) as st:
            gt, geom = truth_um(st), geometry(st)
        table = read_predictions_csv(predictions, gt.n_frames, ("frame", "x", "y", "z_um", "score"))
        pred = geom.to_um(table["frame"], table["x"], table["y"], table["z_um"] / geom.z_step_um, gt.n_frames)
        m = {stores[0].stem: evaluate_points_3d(pred, table["score"].to_numpy(np.float64), gt)}
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps({"kind": "stacks", "label": predictions.stem, "datasets": m},
                                                     indent=2))
        (out / "table.md").write_text(stack_table({predictions.stem: m}) + "\n")
    elif detector is not None:
        if detector != "trackpy":
            raise FactoryError(f"--detector {detector}: z-stacks have one built-in detector, trackpy "
                               "(TrackPy 3D, tuned on --tune-on)")
        if tune_on.startswith("test"):
            raise FactoryError(f"--tune-on {tune_on}: tuning on a test set would leak it into the score")
        path = find_test_stores(data, [tune_on])[0]
        with Store(path) as st:
            stacks, gt, geom = st.read("images"), truth_um(st), geometry(st)
        if not quiet:
            typer.echo(f"tuning TrackPy 3D on {path} ({len(stacks)} stacks)...", err=True)
        det, grid = tune_trackpy(stacks, gt, geom)
        out.mkdir(parents=True, exist_ok=True)
        det.save(out / "trackpy3d.json", {"tuned_on": str(path), "tune_stacks": len(stacks), "grid": grid})
        evaluate_stacks(det, stores, out, det.label, extra={"params": det.params.model_dump()})
    else:
        from models.runs import load_model

        det = load_model(model)
        if det.ndim != 3:
            raise FactoryError(f"{model}: a 2D model scores images; {data} holds z-stacks (train dmdetnet3d)")
        evaluate_stacks(det, stores, out, det.label, target=det.target, extra={"model": str(model)})


def _trackpy_detector(data: Path, out: Path, params: Optional[Path], tune_on: str, tune_images: int, quiet: bool,
                      paper: bool = False, target: str = "centroid"):
    """The TrackPy baseline: given parameters, the paper's, or tuned on a non-test store.

    The F1 threshold (a mass) is chosen on the tuning store in every case."""
    from factory.stores import Store
    from models.evaluate import find_test_stores, ground_truth, pixel_size_um
    from models.trackpy_baseline import PAPER, PAPER_LABEL, TrackPyDetector, operating_point, tune

    if params is not None:
        det = TrackPyDetector.from_json(params)
        det.target = target
        return det
    if tune_on.startswith("test"):
        raise FactoryError(f"--tune-on {tune_on}: tuning on a test set would leak it into the score")
    path = find_test_stores(data, [tune_on])[0]
    with Store(path) as st:
        n = min(tune_images, len(st))
        images, gt, px = st.read("images", 0, n), ground_truth(st, target, 0, n), pixel_size_um(st)
    if paper:
        det = TrackPyDetector(PAPER, label=PAPER_LABEL)
        det.threshold = operating_point(det, images, gt, px)
        info = {"threshold_tuned_on": str(path), "tune_images": n, "target": target}
    else:
        if not quiet:
            typer.echo(f"tuning TrackPy on {path} ({n} images, {target} target)...", err=True)
        det, grid = tune(images, gt, px)
        info = {"tuned_on": str(path), "tune_images": n, "target": target, "grid": grid}
        if target == "exposure":
            det.label = "TrackPy (ours, tuned on val, exposure target)"
    det.target = target
    out.mkdir(parents=True, exist_ok=True)
    det.save(out / "trackpy.json", info)
    return det


class Network(str, Enum):
    """The trainable network families (models.registry.NETWORKS, kept equal by a test: the
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
    from models.config import load_train_config
    from models.outputs import check_output
    from models.runs import RunFolder
    from models.train import fit

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


# A physical flag takes the limits of the config field it stands for (`factory schema`):
# flag -> (field, what it is, unit).
_PHYSICAL_FLAGS = {
    "--pixel-size-um": ("image.pixel_size_um", "a pixel size", "um"),
    "--dwell-us": ("scan.dwell_us", "a dwell time", "us"),
    "--line-retrace-ms": ("scan.line_retrace_ms", "a time", "ms"),
    "--frame-flyback-ms": ("movie.frame_flyback_ms", "a time", "ms"),
    "--z-step-um": ("stack.z_step_um", "a z step", "um"),
}


def _check_flags(**flags) -> None:
    """One line for a physical flag that is not finite or outside its config field's
    limits (``flags``: flag name with '_' for '-' and no leading '--' -> value or None).
    Flags without a config field (--max-diffusion-um2-s, --search-range-um) must be
    finite and > 0."""
    import math

    from factory.inspect_store import check_against_field

    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        if value is None:
            continue
        if flag in _PHYSICAL_FLAGS:
            problem = check_against_field(flag, value, *_PHYSICAL_FLAGS[flag])
        else:
            problem = None if math.isfinite(value) and value > 0 else f"{flag} {value}: must be a finite number > 0"
        if problem:
            raise FactoryError(problem)


def _with_flags(timing, **flags):
    """``timing`` with the timing flags that were given replacing its values."""
    import dataclasses

    given = {k: v for k, v in flags.items() if v is not None}
    if not given:
        return timing
    return dataclasses.replace(timing, **given, source=f"the command line ({', '.join(given)}) and {timing.source}")


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
    from models.outputs import staged_output

    if out.suffix.lower() != ".csv":
        raise FactoryError(f"{out}: --out must be a .csv file")
    _check_flags(pixel_size_um=pixel_size_um, dwell_us=dwell_us, line_retrace_ms=line_retrace_ms,
                 frame_flyback_ms=frame_flyback_ms, z_step_um=z_step_um)
    with staged_output(out, "file", overwrite=overwrite, what="CSV file") as csv:
        table, what = _predict(model, input, pixel_size_um, dwell_us, line_retrace_ms, frame_flyback_ms,
                               bidirectional, all_scores, z_step_um, target, device, quiet)
        table.to_csv(csv, index=False)
    typer.echo(f"{out}: {len(table)} localisations in {what}")


def _predict(model: str, input: Path, pixel_size_um, dwell_us, line_retrace_ms, frame_flyback_ms, bidirectional,
             all_scores: bool, z_step_um, target, device, quiet: bool):
    """The localisation table of ``factory predict`` and what it was found in."""
    from models.predict import load_detector, predict as run_predict, training_timing
    from models.recording import open_recording
    from models.timing import ScanTiming

    det = load_detector(model, device.value, prefer=target.value if target else None)
    if target is not None and det.target != target.value:
        raise FactoryError(f"{model}: --target {target.value}: the model has no {target.value} output "
                           f"(it finds the {det.target} target)")
    if det.ndim == 3:
        return _predict_stacks(det, Path(model), input, z_step_um, pixel_size_um, all_scores, quiet)
    # Read a chunk of frames at a time: a recording of any length fits in memory.
    with open_recording(input) as images:
        frame_start = None
        from factory.stores import Store, is_store_path

        if is_store_path(input):
            with Store(input) as st:
                timing = ScanTiming.of_store_config(st.config["dataset"], f"the store {input}")
                frame_start = st.read("frame_start_s") if "frame_start_s" in st else None
        else:
            timing = (training_timing(Path(model)) if Path(model).is_dir() else None) or ScanTiming()
        timing = _with_flags(timing, dwell_us=dwell_us, line_retrace_ms=line_retrace_ms,
                             frame_flyback_ms=frame_flyback_ms, bidirectional=bidirectional)
        if not quiet:
            typer.echo(f"scan timing: {timing.describe()}", err=True)
        thr = None if all_scores else det.threshold
        table = run_predict(det, images, pixel_size_um, progress=not quiet, timing=timing, frame_start_s=frame_start,
                            min_score=thr)
    return table, f"{len(images)} frame(s) of {images.shape[1]} x {images.shape[2]} px"


def _predict_stacks(det, model: Path, input: Path, z_step_um, pixel_size_um, all_scores: bool, quiet: bool):
    """``factory predict`` with a 3D model: stacks in, (x, y, z_um) out."""
    from factory.inspect_store import check_against_field
    from factory.stores import Store, is_store_path
    from models.predict import read_stacks, tiff_z_step_um
    from models.volumes import with_z_um

    stacks = read_stacks(input)
    trained = det.z_step_um
    source = "--z-step-um"
    if z_step_um is None and is_store_path(input):
        with Store(input) as st:
            stack = st.config["dataset"].get("stack")
        z_step_um, source = (stack or {}).get("z_step_um"), f"the store {input}"
    if z_step_um is None and input.suffix.lower() in (".tif", ".tiff"):
        z_step_um, source = tiff_z_step_um(input), f"the TIFF's metadata ({input})"
    if z_step_um is None and trained:
        z_step_um, source = trained, f"the model's training data ({model})"
    if z_step_um is None:
        raise FactoryError(f"{input}: the z step is not recorded; give --z-step-um")
    problem = check_against_field(f"{input}: the z step from {source} is", z_step_um, *_PHYSICAL_FLAGS["--z-step-um"])
    if problem:
        raise FactoryError(problem)
    if not quiet:
        typer.echo(f"z step: {z_step_um:g} um (from {source})", err=True)
        if trained and abs(z_step_um - trained) > 1e-6 * trained:
            typer.echo(f"note: the model was trained on stacks {trained:g} um apart; its z targets assume "
                       "that step", err=True)
    table = det.detect(stacks, progress=not quiet)
    table = with_z_um(table, z_step_um)
    if pixel_size_um is not None:
        table["x_um"] = table["x"] * pixel_size_um
        table["y_um"] = table["y"] * pixel_size_um
    if det.threshold is not None and not all_scores:
        table = table[table.score >= det.threshold]
    n, z, h, w = stacks.shape
    return table, f"{n} stack(s) of {z} planes of {h} x {w} px"


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
    from models.calibration import CALIBRATION_FILES, calibrate as run_calibrate
    from models.outputs import staged_output

    _check_flags(pixel_size_um=pixel_size_um, dwell_us=dwell_us, line_retrace_ms=line_retrace_ms,
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
    from factory.stores import is_store_path
    from models.outputs import staged_output

    from models.tracks import LINKERS

    if linker not in LINKERS:
        raise FactoryError(f"--linker {linker}: unknown (have: {', '.join(LINKERS)})")
    _check_flags(pixel_size_um=pixel_size_um, dwell_us=dwell_us, line_retrace_ms=line_retrace_ms,
                 frame_flyback_ms=frame_flyback_ms, max_diffusion_um2_s=max_diffusion, search_range_um=search_range_um,
                 min_diffusion_um2_s=min_diffusion)
    if not is_store_path(input) and input.suffix.lower() not in (".tif", ".tiff"):
        raise FactoryError(f"{input}: give a T x H x W TIFF or a movie store (.h5 / .zarr)")
    with staged_output(out, "folder", TRACK_FILES, overwrite, what=", ".join(TRACK_FILES)) as folder:
        msg = _track(model, input, folder, pixel_size_um, dwell_us, line_retrace_ms, frame_flyback_ms, bidirectional,
                     max_diffusion, search_range_um, memory, estimator, device, quiet, linker, min_diffusion)
    typer.echo(f"{out}: {msg}")


TRACK_FILES = ("tracks.csv", "diffusion.csv", "tracks.png", "track.json")


def _track(model: str, input: Path, out: Path, pixel_size_um, dwell_us, line_retrace_ms, frame_flyback_ms,
           bidirectional, max_diffusion, search_range_um, memory: int, estimator, device, quiet: bool,
           linker: str = "trackpy", min_diffusion: float | None = None) -> str:
    """``factory track`` into the folder ``out``; the line to report."""
    from factory.config import ImageSpec, ParticleSpec, PSFSpec
    from factory.stores import Store, is_store_path
    from models.predict import load_detector, training_data_config
    from models.recording import open_recording
    from models.timing import ScanTiming
    from models.tracks import max_diffusion as max_diffusion_of, min_diffusion as min_diffusion_of, plot_tracks, track_recording

    # What the laser saw, with its own time stamp, is what D needs: a network with a head
    # per target tracks with its exposure head.
    det = load_detector(model, device.value, prefer="exposure")
    if det.ndim == 3:
        raise FactoryError(f"{model}: a 3D model (it localises in z-stacks, Z x H x W); `factory track` links "
                           "localisations through a 2D movie (T x H x W): give a 2D model or 'trackpy'")
    # Read a chunk of frames at a time: a recording of any length fits in memory.
    with open_recording(input) as images:
        if len(images) < 2:
            raise FactoryError(f"{input}: one frame of {images.shape[1]} x {images.shape[2]} px; tracking needs a movie (T x H x W)")
        frame_start, movie_frames = None, None
        if is_store_path(input):
            with Store(input) as st:
                cfg = st.config["dataset"]
                source = f"the store {input}"
                if cfg.get("movie") is None:
                    raise FactoryError(f"{input}: holds independent images, not movies")
                frame_start, movie_frames = st.read("frame_start_s"), cfg["movie"]["n_frames"]
        else:
            cfg, source = training_data_config(Path(model)) if Path(model).is_dir() else (None, None)
        timing = _with_flags(ScanTiming.of_store_config(cfg, source) if cfg else ScanTiming(), dwell_us=dwell_us,
                             line_retrace_ms=line_retrace_ms, frame_flyback_ms=frame_flyback_ms, bidirectional=bidirectional)
        # Without the training data's config: the schema's defaults (the paper's microscope).
        px = pixel_size_um or (cfg["image"]["pixel_size_um"] if cfg else ImageSpec().pixel_size_um)
        d_max = max_diffusion or (max_diffusion_of(cfg) if cfg else ParticleSpec().diffusion_um2_s.high)
        d_min = min(min_diffusion or (min_diffusion_of(cfg) if cfg else ParticleSpec().diffusion_um2_s.low), d_max)
        sigma_xy = cfg["psf"]["sigma_xy_um"] if cfg else PSFSpec().sigma_xy_um
        if not quiet:
            span = f"from {d_min:g} " if linker == "stitch" else ""
            typer.echo(f"scan timing: {timing.describe()}; pixel {px:g} um; linking ({linker}) for D {span}up to "
                       f"{d_max:g} um^2/s", err=True)
        tracks, diff, used = track_recording(det, images, timing, px, d_max,
                                             search_range_um / px if search_range_um else None, memory, sigma_xy,
                                             frame_start, movie_frames, progress=not quiet, estimator=estimator.value,
                                             linker=linker, min_diffusion_um2_s=d_min)
        cols = ["movie"] if "movie" in tracks else []
        cols += ["frame", "t_s", "x", "y", "score"] + (["sigma"] if "sigma" in tracks else []) + ["track", "x_um", "y_um"]
        tracks[cols].to_csv(out / "tracks.csv", index=False)
        diff.to_csv(out / "diffusion.csv", index=False)
        first = tracks[tracks["movie"] == 0] if "movie" in tracks else tracks
        plot_tracks(images.mean_frame(movie_frames), first, out / "tracks.png",
                    f"{Path(input).name}: {first['track'].nunique()} tracks")
    (out / "track.json").write_text(json.dumps({**used, "timing": timing.describe(), "pixel_size_um": px,
                                                 "max_diffusion_um2_s": d_max, "model": str(model),
                                                 "target": det.target}, indent=2))
    return (f"{tracks['track'].nunique()} tracks, {len(diff)} with D (>= 5 frames), "
            f"median D {diff['D_um2_s'].median() if len(diff) else float('nan'):.3f} um^2/s")


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
    from models.outputs import check_output
    from models.report import write_report

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
