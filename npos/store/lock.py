"""One writer at a time: a lock file beside every store (and any output folder) being written.

The lock of ``runs/train.zarr`` is ``runs/.train.zarr.lock``: a sibling, so replacing the
store (``--overwrite``) never removes it. It holds JSON naming the holder: host, pid, start
time and command line. A second writer is refused with that holder in the message. A lock
whose pid is no longer running on this host (a run killed with ``kill -9``) is stale and is
taken over with a warning. Locks are released on :meth:`WriterLock.release`, when the context
manager exits, when the owning object is garbage-collected, and at interpreter exit.

Within one process, locks on the same path are shared (counted): the process is one writer.
Under ``torchrun`` only rank 0 takes the lock, for the whole job; the other ranks write the
chunks rank 0 hands them. Locks are local-file-system locks: stores at fsspec URLs
(``s3://``, ``memory://``) are not locked.

Other stages use the same API for their output folders::

    with WriterLock("reports/zero-shot", what="report"):
        ...
"""

from __future__ import annotations

import atexit
import datetime as _dt
import json
import os
import shlex
import socket
import sys
import threading
import uuid
import warnings
from pathlib import Path
from typing import Any

from npos.errors import LockError

_HELD: dict[str, list[Any]] = {}  # lock file -> [count, info]; this process's locks
_GUARD = threading.Lock()


def lock_path(target: str | os.PathLike) -> Path:
    """The lock file of ``target``: ``.NAME.lock`` in the same folder."""
    target = Path(os.path.abspath(os.fspath(target)))
    return target.parent / f".{target.name}.lock"


def is_lockable(target: str | os.PathLike) -> bool:
    """Local paths are locked; fsspec URLs (``s3://``, ``memory://``) are not."""
    return "://" not in os.fspath(target) or os.fspath(target).startswith("file://")


def _command_line() -> str:
    """This process's command line, with ``npos`` for ``python -m npos`` and the script."""
    argv = list(sys.argv)
    first = Path(argv[0]) if argv and argv[0] else Path("python")
    if first.name == "npos" or (first.name == "__main__.py" and first.parent.name == "npos"):
        argv[0] = "npos"
    return shlex.join(argv)


def _secondary_rank() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0


def _process_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (Linux), to tell a reused pid."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(info: dict[str, Any]) -> bool:
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    start = info.get("pid_start")
    return start is None or _process_start(pid) in (None, start)


def _describe(info: dict[str, Any]) -> str:
    command = info.get("command") or "unknown command"
    return (f"pid {info.get('pid')} on {info.get('host')}, since {info.get('started')}: "
            f"{command}")


def _read(path: Path) -> dict[str, Any] | None:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


class WriterLock:
    """A lock file that makes the caller the only writer of ``target``.

    Parameters
    ----------
    target : path
        The store or output folder/file to be written.
    what : str
        Names ``target`` in messages ("store", "report", "head").
    command : str, optional
        The holder's command line, shown to a refused writer (default: ``sys.argv``).
    """

    def __init__(self, target: str | os.PathLike, *, what: str = "store",
                 command: str | None = None) -> None:
        self.target = os.fspath(target)
        self.what = what
        self.command = command if command is not None else _command_line()
        self.path = lock_path(self.target) if is_lockable(self.target) else None
        self.held = False

    def _info(self) -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(),
                "pid_start": _process_start(os.getpid()),
                "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "command": self.command}

    def _create(self, path: Path, info: dict[str, Any]) -> bool:
        """Write the lock file atomically (complete or absent); False if one exists."""
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(info), encoding="utf-8")
            try:
                os.link(tmp, path)  # fails when the lock exists: one creator wins
            except FileExistsError:
                return False
            return True
        except OSError as exc:  # read-only, full, no permission: name the user's path
            raise LockError(f"cannot write {self.what} {self.target!r}: {exc.strerror or exc} "
                            f"(while creating its lock file {str(path)!r})") from None
        finally:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass

    def acquire(self) -> WriterLock:
        """Take the lock, or raise :class:`~npos.errors.LockError` naming its holder."""
        if self.held or self.path is None or _secondary_rank():
            self.held = self.path is not None and not _secondary_rank()
            return self
        path = self.path
        key = str(path)
        with _GUARD:
            if key in _HELD:
                _HELD[key][0] += 1
                self.held = True
                return self
            info = self._info()
            for _ in range(3):
                if self._create(path, info):
                    _HELD[key] = [1, info]
                    self.held = True
                    return self
                holder = _read(self.path)
                if holder is None:
                    continue  # released meanwhile: try again
                if holder.get("host") == info["host"] and not _alive(holder):
                    self._take_over(path, holder)
                    continue
                raise LockError(
                    f"{self.what} {self.target!r} is being written by another process "
                    f"({_describe(holder)}); wait for it to end, or delete {key!r} if it is "
                    "not running")
            raise LockError(f"cannot take the lock {key!r} of {self.what} {self.target!r}")

    def _take_over(self, path: Path, holder: dict[str, Any]) -> None:
        stale = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.replace(path, stale)  # only one taker wins the rename
        except FileNotFoundError:
            return
        stale.unlink(missing_ok=True)
        warnings.warn(f"taking over the stale lock of {self.what} {self.target!r} "
                      f"({_describe(holder)}; that process is gone)", stacklevel=4)

    def release(self) -> None:
        """Give the lock back (the file is removed when this process's last holder ends)."""
        if not self.held:
            return
        self.held = False
        if self.path is None or _secondary_rank():
            return
        key = str(self.path)
        with _GUARD:
            entry = _HELD.get(key)
            if entry is None:
                return
            entry[0] -= 1
            if entry[0] > 0:
                return
            del _HELD[key]
            if _owned(self.path, entry[1]):  # never remove a lock taken over by another
                self.path.unlink(missing_ok=True)

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _owned(path: Path, info: dict[str, Any]) -> bool:
    # A forked child inherits _HELD but never owns its parent's locks.
    return info.get("pid") == os.getpid() and _read(path) == info


def _release_all() -> None:
    for key, (_, info) in list(_HELD.items()):
        if _owned(Path(key), info):
            Path(key).unlink(missing_ok=True)
    _HELD.clear()


atexit.register(_release_all)
