"""Exclusive, atomic publication of stores and shards.

Every store (and every shard of a sharded build) is written by exactly one process at a
time.  That process holds an advisory lock on ``<out>/.<name>.lock`` (``flock``: the
kernel drops it when the holder exits, SIGKILL included, so a lock left by a dead
process is never mistaken for a live one).  While it holds the lock it

- removes the temporary files that earlier, killed attempts at the same path left
  (their owners are gone: a live owner would hold the lock);
- writes under a temporary name unique to this host and process;
- moves the finished store into place, refusing to replace a store that appeared
  meanwhile unless asked to (``overwrite``).

Two builds of the same store into one folder: the second finds the lock taken and
stops before any work, with one line naming the holder.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

from .errors import FactoryError
from .stores import remove_path, replace_path


class LockBusy(FactoryError):
    """Another live process is writing the same store or shard."""


def tmp_name(path: Path) -> Path:
    """The temporary name this process writes ``path`` under."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial-{socket.gethostname()}-{os.getpid()}")


def lock_path(path: Path) -> Path:
    """The lock file of the store (or shard) at ``path``: ``.<name>.lock`` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


def remove_stale(path: Path) -> None:
    """Temporary files left at ``path`` by earlier attempts; call only with its lock held."""
    path = Path(path)
    for p in path.parent.glob(f".{path.name}.partial-*"):
        remove_path(p)
    for p in path.parent.glob(f".{path.name}.old-*"):
        remove_path(p)


def _holder(lp: Path) -> str:
    try:
        info = json.loads(lp.read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"process {info['pid']} on {info['host']}, since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextmanager
def store_lock(path: Path, what: str = "build", wait: bool = False) -> Iterator[Path]:
    """Hold the exclusive lock of the store (or shard) at ``path``; fail at once if taken.

    With ``wait`` it waits for the lock instead: for the moments-long creation of a
    shared store.  ``what`` names the command in the error (``build``, ``finalize``).
    Raises LockBusy (naming the holder) when taken, FactoryError when the lock file
    cannot be created or locked.

    The lock file is removed on release.  A process that opened it just before the
    removal would lock an unlinked file, so a lock counts only when the file locked is
    still the one at the path (the inode check below), else it is taken again.
    """
    path = Path(path)
    lp = lock_path(path)
    for _ in range(100):
        try:
            fd = os.open(lp, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise FactoryError(f"{lp}: cannot create the lock file ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise FactoryError(f"{lp}: cannot lock ({exc.strerror})") from None
            raise LockBusy(f"{path}: being written by {_holder(lp)}; wait for it to finish, "
                           f"or {what} into another --out") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lp).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    else:  # pragma: no cover - only under a storm of lock and unlock
        raise LockBusy(f"{path}: its lock keeps changing hands; try again")
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.time()}).encode())
        remove_stale(path)
        yield path
    finally:
        try:
            os.unlink(lp)
        except FileNotFoundError:
            pass
        os.close(fd)  # releases the lock


@contextmanager
def store_locks(paths: list[Path], what: str = "build") -> Iterator[list[Path]]:
    """Hold the locks of several stores, taken in sorted order.

    Of two builds that want overlapping stores one gets them all and the other stops,
    never both.
    """
    with ExitStack() as stack:
        for p in sorted(Path(p) for p in paths):
            stack.enter_context(store_lock(p, what))
        yield list(paths)


def publish(tmp: Path, final: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` to ``final`` (the caller holds ``final``'s lock).

    A store that appeared at ``final`` while this one was built (copied there by hand,
    or by a build from an older version that took no lock) is replaced only with
    ``overwrite``; the new store is removed, not left half-visible.
    """
    tmp, final = Path(tmp), Path(final)
    if (final.exists() or final.is_symlink()) and not overwrite:
        remove_path(tmp)
        raise FactoryError(f"{final}: appeared while this build ran; not replaced "
                           "(use --overwrite to replace it)")
    replace_path(tmp, final)
