"""Commands that train detectors and score them on the test stores: train, evaluate,
report."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from cli.options import (Device, Network, Precision, Target, device_option, notes, out_option, overwrite_option,
                         precision_option, quiet_option)
from factory.errors import FactoryError


def _gates(text: str) -> tuple[float, ...]:
    import math

    try:
        gates = tuple(float(g) for g in text.split(",") if g.strip())
    except ValueError:
        raise FactoryError(f"--gates-nm {text}: expected comma-separated distances in nm, e.g. 70,140,210") from None
    if not gates or any(not (g > 0 and math.isfinite(g)) for g in gates):
        raise FactoryError(f"--gates-nm {text}: every gate must be a finite distance > 0 nm")
    return gates


def evaluate(
    data: Path = typer.Option(..., "--data", "-d", help="Folder of stores (its test* stores are scored) or one store."),
    out: Path = out_option("Evaluation folder for metrics.json, table.md, table.csv, pr_*.png."),
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
    gates_nm: Optional[str] = typer.Option(None, "--gates-nm", help="Distance gates of the PR-AUC in nm, comma-separated (default: the "
                                                                      "paper's 70,140,210 for images; 100,200,300 for z-stacks, "
                                                                      "distances in x, y and z)."),
    target: Target = typer.Option(Target.centroid, "--target", help="TrackPy and --predictions: the truth tuned and first scored against "
                                                                    "(centroid: the paper's; exposure: what the laser saw). Trained "
                                                                    "models use their own (a model with a head per target: this head); "
                                                                    "every store is also scored against each truth it holds."),
    precision: Precision = precision_option(Precision.float32),
    overwrite: bool = overwrite_option("Replace the files of an earlier evaluation in --out."),
    quiet: bool = quiet_option("No progress bars."),
) -> None:
    """Score a detector on the test stores: the seed paper's PR-AUC at 70/140/210 nm,
    deepBlink's F1 integral, F1 and RMSE at 140 nm; Table 1 beside the paper's rows.
    z-stacks: the same metrics at 3D gates (100/200/300 nm), the RMSE split into xy and z.

    Gates are physical distances: both sides are scored in micrometres, with each
    store's pixel size (and z step)."""
    from models.evaluation.evaluate import EVALUATION_FILES, evaluate_stores
    from models.recordings.outputs import staged_output

    gates = _gates(gates_nm) if gates_nm is not None else None
    # An input inside --out (a trackpy.json given to --params) is never removed by --overwrite.
    with staged_output(out, "folder", EVALUATION_FILES, overwrite, what="the evaluation (metrics.json, table.md, ...)",
                       keep=(params,) if params else ()) as stage:
        evaluate_stores(data, stage, detector=detector, model=model, predictions=predictions, datasets=datasets,
                        params=params, tune_on=tune_on, tune_images=tune_images, threshold=threshold, gates_nm=gates,
                        target=target.value, precision=precision.value, progress=not quiet, report=notes(quiet))
    typer.echo((out / "table.md").read_text())


def train(
    model: Optional[Network] = typer.Option(None, "--model", "-m", help="The network: spotnet (the default), gridnet, densitynet or "
                                                                        "keypointrcnn for images, dmdetnet3d for z-stacks; without "
                                                                        "--config, that family's built-in parameters."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Folder with the train and val stores (factory build); default: the "
                                                                   "config's data."),
    out: Path = out_option("Run folder: config.yaml, best.pt, last.pt, metrics.json."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Training config YAML (see configs/, or a run folder's "
                                                                       "config.yaml to reproduce it); --model overrides its model."),
    device: Device = device_option(),
    resume: bool = typer.Option(False, "--resume", help="Continue from <out>/last.pt."),
    overwrite: bool = overwrite_option("Replace a trained model already in --out."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Override the config's epochs."),
    max_train_images: Optional[int] = typer.Option(None, "--max-train-images", min=1, help="Use only the first N training images."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Start from a trained run folder (or weights file): overrides the "
                                                                       "config's init_from."),
    quiet: bool = quiet_option("No progress bars."),
) -> None:
    """Train a detector on simulated data, keeping the epoch with the best validation AUC.

    Optimiser, schedule and seed come from the config; the run folder can be passed to
    `factory evaluate --model` and `factory predict`, and its config.yaml back to
    `factory train --config` to reproduce the run."""
    from models.training.train import train as train_run

    run, summary = train_run(config, data, out, model.value if model else None, device.value, resume, overwrite,
                             epochs, max_train_images, init_from, progress=not quiet)
    typer.echo(f"{run}: {summary}")


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
