"""Fixtures of the fault tests: a fault-injecting fsspec file system (``faulty://``), small
generated stores and images, and checks that an error is told in one line."""

from __future__ import annotations

import os
import re
from pathlib import Path

import fsspec
import numpy as np
import pytest
from click.testing import CliRunner
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from benchmarks.feature_world import make_feature_world, write_world
from npos.cli import cli
from npos.store import FeatureStore

#: Names npos or zarr give temporary files; none may appear in a message or stay behind.
TEMP_NAME = re.compile(r"\.tmp-|\.old-|\.probe-|\.[0-9a-f]{32}\.partial")


class FaultPlan:
    """What ``faulty://`` does: count every write (a whole file) and every byte written; with
    ``code`` set, raise ``OSError(code)`` at write number ``after_writes + 1`` or at the
    write that would pass ``after_bytes`` bytes in all."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.code: int | None = None
        self.after_writes: int | None = None
        self.after_bytes: int | None = None
        self.writes = 0
        self.written = 0

    def fail(self, code: int, *, after_writes: int | None = None,
             after_bytes: int | None = None) -> None:
        self.code, self.after_writes, self.after_bytes = code, after_writes, after_bytes
        self.writes = self.written = 0

    def _maybe_raise(self, path: str) -> None:
        if self.code is None:
            return
        if (self.after_writes is not None and self.writes > self.after_writes) or \
                (self.after_bytes is not None and self.written > self.after_bytes):
            raise OSError(self.code, os.strerror(self.code), path)

    def opened(self, path: str) -> None:
        self.writes += 1
        self._maybe_raise(path)

    def wrote(self, path: str, n: int) -> None:
        self.written += n
        self._maybe_raise(path)


PLAN = FaultPlan()


class FaultyFileSystem(LocalFileSystem):
    """A local folder behind the ``faulty://`` protocol whose writes fail as :data:`PLAN`
    says (disk full, I/O error, read-only file system).

    A write is a whole-file put (``pipe_file``, which zarr uses) that succeeds or leaves
    nothing, as on object stores (s3://, gs://); local stores cannot tear a file either
    (zarr writes them to a temporary file and renames it).
    """

    protocol = ("faulty",)

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("auto_mkdir", True)
        super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        if path.startswith("faulty://"):
            path = path[len("faulty://"):]
        return LocalFileSystem._strip_protocol(path)

    def unstrip_protocol(self, name):
        return f"faulty://{self._strip_protocol(name)}"

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        path = self._strip_protocol(path)
        PLAN.opened(path)
        PLAN.wrote(path, len(value))
        return super().pipe_file(path, value, mode=mode, **kwargs)


@pytest.fixture
def faulty():
    """The :class:`FaultPlan` of the ``faulty://`` file system (registered for the test)."""
    fsspec.register_implementation("faulty", FaultyFileSystem, clobber=True)
    PLAN.reset()
    yield PLAN
    PLAN.reset()


def run(*args: str):
    """``npos ARGS`` in this process; returns click's Result."""
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_one_line_error(result, *needles: str) -> str:
    """Exit code 2, no traceback, exactly one ``Error:`` line holding every needle and no
    temporary name; returns that line. ``result``: click's Result or a CompletedProcess."""
    if hasattr(result, "exit_code"):
        code, output = result.exit_code, result.output
    else:
        code, output = result.returncode, result.stderr
    assert code == 2, output
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, output
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not TEMP_NAME.search(lines[0]), lines[0]
    return lines[0]


def no_temporaries(folder: Path) -> list[str]:
    """Temporary files or folders left anywhere under ``folder``."""
    return [str(p) for p in Path(folder).rglob("*") if TEMP_NAME.search(p.name)]


def same_store(a: str, b: str) -> None:
    """Every array of store ``a`` equals the one of ``b`` (NaN equal to NaN)."""
    fa, fb = FeatureStore.open(a), FeatureStore.open(b)
    assert fa.verify() == [] and fb.verify() == []
    names = sorted(fa._group.array_keys())
    assert names == sorted(fb._group.array_keys())
    for name in names:
        x, y = np.asarray(fa.array(name)[...]), np.asarray(fb.array(name)[...])
        assert x.dtype == y.dtype and x.shape == y.shape, name
        if x.dtype.kind == "f":
            assert np.array_equal(x, y, equal_nan=True), name
        else:
            assert np.array_equal(x, y), name


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> dict[str, str]:
    """4 ID classes x 30 train / 20 test rows (D=64), 2 held-out classes, as local stores."""
    w = make_feature_world(n_classes=4, n_heldout=2, dim=64, subspace=8, n_train=30,
                           n_test=20, seed=0)
    return write_world(w, tmp_path_factory.mktemp("world"), chunk_rows=32)


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> Path:
    """A labeled image folder: 2 classes x 10 PNG images (32 x 32)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c, name in enumerate(("red", "blue")):
        (root / name).mkdir()
        for i in range(10):
            pixels = np.full((32, 32, 3), 90.0)
            pixels[..., 2 * c] = 220
            pixels = np.clip(pixels + rng.normal(0, 30, pixels.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"img{i:02d}.png")
    return root


#: Settings of train-head that fit the world's 30 rows per class, quick on a CPU.
HEAD_ARGS = ["--batch-size", "32", "--queue", "30", "--k", "10", "--select", "20",
             "--candidates", "50", "--device", "cpu", "--seed", "1"]


@pytest.fixture(scope="session")
def cli_checks():
    """The helpers of this folder's tests (``--import-mode=importlib`` cannot import
    conftest): ``run``, ``assert_one_line_error``, ``no_temporaries``, ``same_store``,
    ``HEAD_ARGS``."""
    from types import SimpleNamespace

    return SimpleNamespace(run=run, assert_one_line_error=assert_one_line_error,
                           no_temporaries=no_temporaries, same_store=same_store,
                           HEAD_ARGS=HEAD_ARGS)
