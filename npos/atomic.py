"""Outputs: checked writable before any work, written whole or not at all, and every
operating-system error while writing them reported against the user's path.

Used by reports, score files, head checkpoints, fine-tuned tails and stores:

* :func:`check_writable` — before any compute: create missing parent folders (the same way
  for every command) and probe the folder with a real small write and delete;
* :func:`atomic_path` — the new output is written to a temporary sibling (same file system)
  and moved into place with ``os.replace``;
* :func:`writing` — any :class:`OSError` (ENOSPC, EROFS, EFBIG, EIO, EDQUOT, EACCES, also
  from zarr, fsspec, safetensors, matplotlib, pyarrow) raised while writing an output
  becomes one :class:`~npos.errors.OutputError` naming the output, never a temporary name
  (:func:`user_path` maps those back).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from npos.errors import NposError, OutputError, OutputExistsError

#: Temporary names npos and zarr create next to an output, and the name they stand for:
#: ``.NAME.tmp-XXXX`` / ``.NAME.old-XXXX`` (atomic_path), ``.NAME.probe-XXXX``
#: (check_writable), ``.NAME.lock`` and its temporaries, ``NAME.<hex>.partial`` (zarr).
_TEMP_NAMES = (re.compile(r"^\.(?P<name>.+)\.(?:tmp|old|probe)-[A-Za-z0-9_]+$"),
               re.compile(r"^\.(?P<name>.+)\.lock(?:\..*)?$"),
               re.compile(r"^(?P<name>.+)\.[0-9a-f]{32}\.partial$"))


def _strip_url(path: str) -> str:
    return path.split("://", 1)[1] if "://" in path else path


def user_path(path: str | os.PathLike) -> str:
    """``path`` with every temporary component replaced by the name it stands for:
    ``/x/.head.tmp-ab12/model.safetensors`` -> ``/x/head/model.safetensors``."""
    parts = str(path).split("/")
    for i, part in enumerate(parts):
        for pattern in _TEMP_NAMES:
            match = pattern.match(part)
            if match:
                parts[i] = match.group("name")
                break
    return "/".join(parts)


def concerns(filename: str | os.PathLike | None, path: str | os.PathLike) -> bool:
    """Whether an error about ``filename`` is about output ``path``: the same path, a file
    inside it, a sibling named after it (``head.partial``, ``x.csv.json``), one of its
    temporaries, or a parent folder being created; an error without a file name (a failed
    ``write``) counts too."""
    if filename is None:
        return True
    name = os.path.abspath(_strip_url(user_path(os.fspath(filename))))
    target = os.path.abspath(_strip_url(os.fspath(path)).rstrip("/") or "/")
    return (name == target or name.startswith(target + "/") or name.startswith(target + ".")
            or target.startswith(name.rstrip("/") + "/"))


@contextmanager
def writing(path: str | os.PathLike, what: str = "output", *,
            before_work: bool = False) -> Iterator[None]:
    """Turn an :class:`OSError` about output ``path`` into one
    :class:`~npos.errors.OutputError` naming ``path`` and ``what`` it is.

    Errors about other files (an input read inside the block) pass unchanged.
    """
    try:
        yield
    except NposError:  # already a message for the user (some are OSErrors too)
        raise
    except OSError as exc:
        if not concerns(exc.filename, path):
            raise
        raise OutputError(os.fspath(path), what, exc, before_work=before_work) from exc


def _parent(path: str) -> str:
    parent = os.path.dirname(path.rstrip("/"))
    return parent or "."


def make_parents(path: str | os.PathLike, what: str = "output", *,
                 before_work: bool = False) -> None:
    """Create the missing parent folders of ``path`` (local or fsspec URL)."""
    path = os.fspath(path)
    with writing(path, what, before_work=before_work):
        if "://" in path and not path.startswith("file://"):
            from fsspec.core import url_to_fs

            fs, inner = url_to_fs(path)
            fs.makedirs(_parent(inner), exist_ok=True)
            return
        parent = Path(_parent(_strip_url(path)))
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:  # a file where a folder is needed
            import errno

            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(parent)) from None


def check_writable(path: str | os.PathLike, what: str = "output") -> str:
    """Make sure ``path`` can be written, before any work: create its missing parent
    folders, then write a small probe file next to it and delete it.

    Raises :class:`~npos.errors.OutputError` (read-only, full, no permission, a file where a
    folder is needed, ...). Returns ``path`` as a string.
    """
    path = os.fspath(path)
    make_parents(path, what, before_work=True)
    name = os.path.basename(path.rstrip("/")) or "output"
    probe_data = b"npos write probe\n" * 256  # 4 KiB: one block, as real writes need
    with writing(path, what, before_work=True):
        if "://" in path and not path.startswith("file://"):
            from fsspec.core import url_to_fs

            fs, inner = url_to_fs(path)
            probe = f"{_parent(inner)}/.{name}.probe-{uuid.uuid4().hex[:8]}"
            fs.pipe_file(probe, probe_data)
            fs.rm_file(probe)
            return path
        fd, probe = tempfile.mkstemp(prefix=f".{name}.probe-", dir=_parent(_strip_url(path)))
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(probe_data)
                f.flush()
                os.fsync(f.fileno())
        finally:
            os.unlink(probe)
    return path


def check_output(path: str | os.PathLike, *, overwrite: bool, what: str) -> Path:
    """Refuse an existing ``path`` unless ``overwrite``; create missing parent folders."""
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise OutputExistsError(f"{what} {str(path)!r} already exists; pass --overwrite to "
                                "replace it")
    make_parents(path, what)
    return path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


@contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool, directory: bool,
                what: str) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to fill; move it into place on success.

    The temporary file or folder lives next to ``path`` (same file system, so the final
    ``os.replace`` is atomic) and is removed if the body raises. An existing ``path`` is only
    replaced with ``overwrite``, and only after the new output is complete. An OS error
    while writing is an :class:`~npos.errors.OutputError` naming ``path``.
    """
    path = check_output(path, overwrite=overwrite, what=what)
    with writing(path, what):
        parent = path.parent
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=parent))
        try:
            if directory:  # mkdtemp makes it private (0700); give it the usual permissions
                umask = os.umask(0)
                os.umask(umask)
                tmp.chmod(0o777 & ~umask)
            target = tmp if directory else tmp / path.name
            yield target
            check_output(path, overwrite=overwrite, what=what)
            if path.exists() or path.is_symlink():
                old = parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
                os.replace(path, old)
                try:
                    os.replace(target, path)
                except BaseException:
                    os.replace(old, path)  # the old output stays what it was
                    raise
                _remove(old)
            else:
                os.replace(target, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
