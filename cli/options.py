"""What the commands share: the choices they spell out and the options several of them
take.

The choices are spelt out here because the library modules that define them import
torch, too slow to load for `factory --help`; tests keep them equal to the library's.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import typer


def _choice(name: str, *values: str) -> type[Enum]:
    """A choice of the command line: a str Enum whose members are named by their values."""
    return Enum(name, [(v, v) for v in values], type=str, module=__name__)


Format = _choice("Format", "hdf5", "zarr")
Target = _choice("Target", "centroid", "exposure")  # loaders.datasets.TARGETS
# The trainable network families: models.detectors.registry.NETWORKS.
Network = _choice("Network", "spotnet", "gridnet", "densitynet", "keypointrcnn", "dmdetnet3d")
Estimator = _choice("Estimator", "pooled", "cve", "msd")  # models.tracking.tracks.ESTIMATORS
Device = _choice("Device", "cpu", "cuda")
Precision = _choice("Precision", "auto", "float32", "int8")  # models.training.runs.PRECISIONS


def notes(quiet: bool):
    """Where a command's notes go (which settings were used and why): stderr, none with --quiet."""
    return None if quiet else (lambda line: typer.echo(line, err=True))


# How the notes name settings that came from flags.
GIVEN_BY = "the command line"


# The options several commands take.  Each call makes a new option: the flags are the
# same everywhere, the help says what the option means to that command.

def config_argument(help: str) -> Any:
    """CONFIG: a datasets YAML file."""
    return typer.Argument(..., help=help)


def out_option(help: str, default: Any = ...) -> Any:
    """--out / -o: where a command writes (required unless a default is given)."""
    return typer.Option(default, "--out", "-o", help=help)


def format_option(help: str) -> Any:
    """--format / -f: the store format, HDF5 by default."""
    return typer.Option(Format.hdf5, "--format", "-f", help=help)


def only_option(help: str) -> Any:
    """--only: the datasets of a config to work on (repeatable; default all)."""
    return typer.Option(None, "--only", help=help)


def overwrite_option(help: str) -> Any:
    """--overwrite: replace what an earlier run wrote."""
    return typer.Option(False, "--overwrite", help=help)


def quiet_option(help: str = "No progress bar.") -> Any:
    """--quiet / -q: no progress bar (and, where a command writes them, no notes)."""
    return typer.Option(False, "--quiet", "-q", help=help)


def device_option() -> Any:
    """--device: where a network runs."""
    return typer.Option(Device.cpu, "--device", help="cpu or cuda.")


def precision_option(default: Any) -> Any:
    """--precision: the arithmetic a network's inference runs in."""
    return typer.Option(default, "--precision", help="float32, int8 (8-bit integers on the CPU, about 2x faster; SpotNet "
                                                     "models with recorded int8 ranges), or auto (int8 where it can run, "
                                                     "else float32).")


# A recording's pixel size and scan timing: None (not given) by default, the library then
# falls back on the store's or the model's; a command that needs them passes `...`.

def pixel_size_option(help: str, default: Any = None) -> Any:
    return typer.Option(default, "--pixel-size-um", help=help)


def dwell_option(help: str, default: Any = None) -> Any:
    return typer.Option(default, "--dwell-us", help=help)


def line_retrace_option(default: Any = None) -> Any:
    return typer.Option(default, "--line-retrace-ms", help="Line retrace time (ms).")


def frame_flyback_option() -> Any:
    return typer.Option(None, "--frame-flyback-ms", help="Time from a frame's last pixel to the next "
                                                         "frame's first (ms; default one line retrace).")


def scan_direction_option(help: str, default: Any = None) -> Any:
    return typer.Option(default, "--bidirectional/--unidirectional", help=help)


def channel_option() -> Any:
    """--channel: which channel of a recording of several."""
    return typer.Option(None, "--channel", min=0, help="The channel to read (from 0) of a TIFF that holds several "
                                                       "(T x C x H x W, as an ImageJ hyperstack or an OME-TIFF records "
                                                       "its axes); required for such a file.")
