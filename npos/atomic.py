"""Atomic outputs: every file or folder npos writes outside a store appears whole or not at all.

Used by reports, score files, head checkpoints and fine-tuned tails. The new output is
written to a temporary sibling (same file system) and moved into place with ``os.replace``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from npos.errors import OutputExistsError


def check_output(path: str | os.PathLike, *, overwrite: bool, what: str) -> Path:
    """Refuse an existing ``path`` unless ``overwrite``; also refuse a missing parent folder."""
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise OutputExistsError(f"{what} {str(path)!r} already exists; pass --overwrite to "
                                "replace it")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"folder {str(parent)!r} for {what} {str(path)!r} does not exist")
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
    replaced with ``overwrite``, and only after the new output is complete.
    """
    path = check_output(path, overwrite=overwrite, what=what)
    parent = path.parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=parent))
    if directory:  # mkdtemp makes it private (0700); give it the usual permissions
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
    target = tmp if directory else tmp / path.name
    try:
        yield target
        check_output(path, overwrite=overwrite, what=what)
        if path.exists() or path.is_symlink():
            old = parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
            os.replace(target, path)
            _remove(old)
        else:
            os.replace(target, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
