"""Where a command writes: checked before any work, written whole or not at all.

``check_output`` refuses, in one line and before anything is computed, an output the
command cannot write: a place that is read-only or not a folder, a folder where a file
is to be written (or a file where a folder is), or one holding an earlier output unless
``overwrite`` is given.  ``staged_output`` checks the same, then hands the command a
private staging folder beside the output: everything is written there and moved into
place only when the command succeeds, so a failure or Ctrl-C leaves nothing
half-written and an earlier output as it was.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Literal

from factory.errors import FactoryError

Kind = Literal["file", "folder"]


def earlier_files(folder: Path, patterns: tuple[str, ...]) -> list[str]:
    """Names of the files in ``folder`` that a run writing ``patterns`` would write."""
    try:
        names = sorted(p.name for p in Path(folder).iterdir() if p.is_file())
    except OSError:
        return []
    return [n for n in names if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]


def _nearest_existing(path: Path) -> Path:
    p = Path(os.path.abspath(path))
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def check_output(path: str | Path, kind: Kind, files: tuple[str, ...] = (), overwrite: bool = False,
                 flag: str = "--out", what: str = "") -> Path:
    """Refuse an output ``path`` the command could not or should not write.

    Parameters
    ----------
    path : str or Path
        The output.
    kind : {"file", "folder"}
        One file, or a folder into which the command writes files named by the glob
        patterns ``files`` (those already there are an earlier output).
    files : tuple of str
        Glob patterns of the files a folder output holds.
    overwrite : bool
        Accept an earlier output (it is replaced).
    flag, what : str
        How messages name the option and the output.

    Returns
    -------
    Path
        The existing folder that will hold it (``path`` itself for a folder that exists).

    Raises
    ------
    FactoryError
        A folder where a file is to be written or a file where a folder is, an earlier
        output without ``overwrite``, or a place that cannot be created or written.
    """
    path = Path(path)
    more = f"add --overwrite to replace it, or choose another {flag}"
    if kind == "file":
        if path.is_dir():
            raise FactoryError(f"{path}: is a folder; {flag} is the {what or 'file'} to write")
        if os.path.lexists(path) and not overwrite:
            raise FactoryError(f"{path}: already exists; {more}")
        home = path.parent
    else:
        if os.path.lexists(path) and not path.is_dir():
            raise FactoryError(f"{path}: is a file, not a folder; {flag} is the folder to write "
                               f"{what or 'the outputs'} into")
        earlier = earlier_files(path, files) if path.is_dir() else []
        if earlier and not overwrite:
            listed = ", ".join(earlier[:4]) + (", ..." if len(earlier) > 4 else "")
            raise FactoryError(f"{path}: holds an earlier run ({listed}); {more}")
        home = path
    base = _nearest_existing(home)
    if not base.is_dir():
        raise FactoryError(f"{path}: cannot be created: {base} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=base, prefix=".factory-write-test-"):
            pass
    except OSError as exc:
        raise FactoryError(f"{path}: cannot write there ({base}: {exc.strerror or exc})") from None
    return base


@contextmanager
def staged_output(path: str | Path, kind: Kind, files: tuple[str, ...] = (), overwrite: bool = False,
                  flag: str = "--out", what: str = "", keep: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Check ``path`` (``check_output``), then yield where to write it in a private staging folder.

    The yielded path is a file of the same name, or a folder, in the staging folder.  On
    success the output moves into place (with ``overwrite``, an earlier output's
    ``files`` are removed first, except the inputs ``keep``); on any error the staging
    folder is removed and ``path`` is left as it was.  Raises FactoryError as
    ``check_output`` does, when writing fails (OSError: a full disk), and when the output
    cannot be moved into place (a folder where a file goes).
    """
    path = Path(path)
    base = check_output(path, kind, files, overwrite, flag, what)
    try:
        stage = Path(tempfile.mkdtemp(dir=base, prefix=f".{path.name}.partial-"))
    except OSError as exc:
        raise FactoryError(f"{path}: cannot write there ({base}: {exc.strerror or exc})") from None
    try:
        try:
            yield stage / path.name if kind == "file" else stage
        except OSError as exc:  # a full disk, a quota, a vanished folder
            other = exc.filename and not Path(os.path.abspath(exc.filename)).is_relative_to(os.path.abspath(stage))
            if other:  # a file the work itself opened: named as it is
                raise FactoryError(f"{exc.filename}: {exc.strerror or exc}") from None
            raise FactoryError(f"{path}: cannot write: {exc.strerror or exc}") from None
        try:
            if kind == "file":
                path.parent.mkdir(parents=True, exist_ok=True)
                os.replace(stage / path.name, path)
            else:
                path.mkdir(parents=True, exist_ok=True)
                # Every place checked before anything is replaced: all of the output or none.
                for item in stage.iterdir():
                    if (path / item.name).is_dir() and not item.is_dir():
                        raise FactoryError(f"{path / item.name}: is a folder, where {item.name} is to be written")
                if overwrite:
                    inputs = {os.path.abspath(k) for k in keep}
                    for name in earlier_files(path, files):
                        if os.path.abspath(path / name) not in inputs:
                            (path / name).unlink()
                for item in stage.iterdir():
                    os.replace(item, path / item.name)
        except OSError as exc:
            raise FactoryError(f"{path}: cannot write: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
