"""The `factory` command: the Typer app, its entry point and the global setup.

The commands live by what they work on:

- cli/data.py: the simulated stores (build, finalize, verify, slurm, inspect, preview, schema);
- cli/detectors.py: detectors on those stores (train, evaluate, report);
- cli/recordings.py: a microscope's own recordings (predict, calibrate, track);
- cli/options.py: the choices and options they share.

Each command validates its arguments, then calls the library; a user error (FactoryError)
ends any command with one line on stderr and exit status 2 (user_errors, below).
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import warnings
from typing import NoReturn

import typer

from cli import data, detectors, recordings
from cli.options import Device, Estimator, Format, Network, Target
from factory.errors import FactoryError

__all__ = ["app", "main", "user_errors", "Device", "Estimator", "Format", "Network", "Target"]


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


# In the order `factory --help` lists them: the order of a first session, from building
# the data to reporting on the detectors, then the config reference.
_COMMANDS = (data.build, data.finalize, data.verify, data.slurm, data.inspect, data.preview,
             detectors.evaluate, detectors.train, recordings.predict, recordings.calibrate, recordings.track,
             detectors.report, data.schema)
for _command in _COMMANDS:
    app.command()(user_errors(_command))


UNAWAITED = r"coroutine .* was never awaited"  # the warning main() drops (see _quiet_zarr_leftovers)


def _quiet_zarr_leftovers() -> None:
    """Keep a damaged Zarr store's error to its one line.

    Zarr reads chunks as asyncio tasks.  When one chunk fails, the read raises (the
    store's one-line StoreError) and its sibling tasks are left behind; at exit they
    report themselves: exceptions "never retrieved" (asyncio's log), reads never started
    ("coroutine ... was never awaited", a RuntimeWarning) and reads closed mid-way
    ("Exception ignored in: <coroutine ...>", the unraisable hook), each a traceback after
    the line that already said what is wrong.  The hook silences Zarr's coroutines only;
    the warning cannot be told by its source, and this project has no coroutines of its own.
    """
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", message=UNAWAITED, category=RuntimeWarning)

    def hook(unraisable) -> None:
        code = getattr(unraisable.object, "cr_code", None)
        if code is not None and f"{os.sep}zarr{os.sep}" in code.co_filename:
            return
        sys.__unraisablehook__(unraisable)

    sys.unraisablehook = hook


def _terminated(signum, frame) -> None:
    sys.stderr.write("error: terminated (SIGTERM)\n")
    raise SystemExit(128 + signum)


def _sigterm_by_default() -> None:
    # A process forked by a library (trackpy.batch's worker pool) would inherit the
    # handler above; its pool stops it with SIGTERM, and an exception raised there, in the
    # middle of the worker's own exit, can leave a lock it shares with the command taken
    # and the command waiting for it forever.  The worker ends as SIGTERM ends a process.
    # (The forking thread is the child's main thread, so it may set the handler.)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def handle_sigterm() -> None:
    """SIGTERM (SLURM at a job's time limit, `kill`) ends the command as Ctrl-C does: the
    cleanup in ``finally`` blocks runs, so no staging folder or half output is left.
    Processes forked from it end on SIGTERM as any process does."""
    signal.signal(signal.SIGTERM, _terminated)
    os.register_at_fork(after_in_child=_sigterm_by_default)


def main() -> NoReturn:
    """Run the command of ``sys.argv`` and end the process with its exit status."""
    from factory.perf import tune_malloc

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _quiet_zarr_leftovers()
    tune_malloc()
    handle_sigterm()
    # No out-of-tree PyTorch device (an entry point of another package) is ever used here
    # (--device is cpu or cuda); looking for them scans every installed package's metadata.
    os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
    try:
        app()
    except SystemExit as exc:
        _leave(exc.code)
    _leave(0)


def _leave(code: int | str | None) -> NoReturn:
    """End the process with ``code`` (as ``sys.exit`` reads it), skipping the interpreter's
    teardown.

    Tearing down the modules a command imported (PyTorch's alone hold about a million
    objects and many C++ libraries) takes a fifth to a third of a second, more than the
    work of a short command.  Everything a process owes the outside world at exit still
    happens: the functions registered with ``atexit`` run (logging's flush, h5py's and
    Zarr's closing of what is open), then both output streams are flushed; the operating
    system frees the rest.
    """
    import atexit

    atexit._run_exitfuncs()  # the same functions, in the same order, as a normal exit
    if isinstance(code, str):  # sys.exit("message"): the message on stderr, status 1
        sys.stderr.write(f"{code}\n")
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`factory ... | head`) or stream
            pass
    os._exit(0 if code is None else int(code))


if __name__ == "__main__":
    sys.exit(main())
