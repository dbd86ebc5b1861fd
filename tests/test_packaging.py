"""The wheel carries the package's data files, and setuptools raises no packaging warning.

The wheel is built from a copy of the sources (so the checkout gets no ``build/`` or
``*.egg-info``) by setuptools' PEP 517 backend in a subprocess, whose output is checked for
the "Package would be ignored" warning that precedes dropping a data folder from wheels.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA_FILES = ("imagenet_wnids.txt", "npos-tiny.json", "py.typed")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[Path, str]:
    """Build the wheel once; return its path and the build's combined output."""
    pytest.importorskip("setuptools", reason="setuptools builds the wheel ([dev] installs it)")
    src = tmp_path_factory.mktemp("src")
    shutil.copytree(ROOT / "npos", src / "npos", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    out = src / "dist"
    proc = subprocess.run(
        [sys.executable, "-c",
         f"from setuptools import build_meta; print(build_meta.build_wheel({str(out)!r}))"],
        cwd=src, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    return out / proc.stdout.strip().splitlines()[-1], log


def test_wheel_contains_the_data_files(wheel):
    path, _ = wheel
    with zipfile.ZipFile(path) as zf:
        by_name = {PurePosixPath(n).name: n for n in zf.namelist()}
        for name in DATA_FILES:
            assert name in by_name, f"{name} missing from {path.name}"
            assert by_name[name].startswith("npos/")
            # Same bytes as in the checkout (found there by name too: the folder may move).
            source = next(p for p in (ROOT / "npos").rglob(name) if "__pycache__" not in p.parts)
            assert zf.read(by_name[name]) == source.read_bytes()
        assert not any(n.startswith(("benchmarks/", "tests/")) for n in zf.namelist())
        assert not any("__pycache__" in n for n in zf.namelist())


def test_wheel_build_has_no_packaging_warning(wheel):
    _, log = wheel
    assert "would be ignored" not in log.lower()
    assert "absent from the `packages` configuration" not in log
