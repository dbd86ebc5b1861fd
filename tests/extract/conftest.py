"""Fixtures of the extraction tests: generated image folders (good, odd and broken files)."""

from __future__ import annotations

import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import npos

REPO_ROOT = Path(npos.__file__).resolve().parents[1]
CLASSES = ("cat", "dog", "fox")
#: Extraction settings shared by the tests: tiny model, float32 storage, no worker processes.
TINY = {"model": "npos-tiny", "dtype": "float32", "workers": 0, "progress": False}


def random_rgb(rng, height=None, width=None) -> Image.Image:
    height = height or int(rng.integers(20, 64))
    width = width or int(rng.integers(20, 64))
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels but holds no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def write_odd_images(folder: Path, rng) -> dict[str, str]:
    """Images in unusual modes that must be converted, not skipped. Returns name -> mode."""
    folder.mkdir(parents=True, exist_ok=True)
    base = random_rgb(rng, 30, 40)
    base.convert("L").save(folder / "gray.jpg")
    base.convert("P").save(folder / "palette.png")
    base.convert("P").save(folder / "palette_transparent.png", transparency=0)
    base.convert("RGBA").save(folder / "rgba.png")
    base.convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65536, (30, 40)).astype(np.uint16)).save(folder / "deep.png")
    base.convert("1").save(folder / "bilevel.png")
    return {"gray.jpg": "L", "palette.png": "P", "palette_transparent.png": "P",
            "rgba.png": "RGBA", "cmyk.jpg": "CMYK", "deep.png": "I;16", "bilevel.png": "1"}


def write_bad_files(folder: Path, rng) -> dict[str, str]:
    """Files that cannot be read. Returns name -> expected start of the failure reason."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.jpg").write_bytes(b"")
    random_rgb(rng, 48, 48).save(folder / "whole.jpg", quality=95)
    data = (folder / "whole.jpg").read_bytes()
    (folder / "whole.jpg").unlink()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "notes.jpg").write_text("this is a text file, not a picture\n")
    (folder / "bomb.png").write_bytes(png_header(20000, 20000))       # PIL: error
    (folder / "bomb_warning.png").write_bytes(png_header(10000, 9000))  # PIL: warning
    return {"empty.jpg": "empty file", "truncated.jpg": "truncated image",
            "notes.jpg": "not an image", "bomb.png": "decompression bomb",
            "bomb_warning.png": "decompression bomb"}


def make_folder(root: Path, per_class: int = 6, *, seed: int = 0, classes=CLASSES) -> Path:
    """ImageFolder layout with random RGB JPEGs/PNGs (some in nested sub-folders)."""
    rng = np.random.default_rng(seed)
    for c in classes:
        for i in range(per_class):
            sub = root / c / ("nested" if i % 4 == 3 else "")
            sub.mkdir(parents=True, exist_ok=True)
            random_rgb(rng).save(sub / f"img{i:03d}.{'png' if i % 2 else 'jpg'}")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """3 classes x 6 RGB images."""
    return make_folder(tmp_path / "data")


@pytest.fixture
def messy_folder(tmp_path) -> tuple[Path, dict[str, str], dict[str, str]]:
    """3 classes of RGB images, plus odd-mode images in 'dog' and broken files in 'fox'."""
    root = make_folder(tmp_path / "messy", per_class=4)
    rng = np.random.default_rng(1)
    odd = write_odd_images(root / "dog", rng)
    bad = write_bad_files(root / "fox", rng)
    return root, {f"dog/{k}": v for k, v in odd.items()}, {f"fox/{k}": v for k, v in bad.items()}


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for child processes that must import this checkout of npos."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep)
    env.update(extra)
    return env


def npos_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "npos", *args]


def assert_same_store(a, b) -> None:
    """Every array equal (NaN == NaN) and every attribute equal except the creation time."""
    names = sorted(a._group.array_keys())
    assert names == sorted(b._group.array_keys())
    for name in names:
        np.testing.assert_array_equal(np.asarray(a.array(name)[...]),
                                      np.asarray(b.array(name)[...]), err_msg=name)
    attrs_a = {k: v for k, v in a.attrs.items() if k != "created"}
    attrs_b = {k: v for k, v in b.attrs.items() if k != "created"}
    assert attrs_a == attrs_b


# Helpers as fixtures: with --import-mode=importlib test modules cannot import conftest.
@pytest.fixture
def tiny() -> dict:
    return dict(TINY)


@pytest.fixture
def folder_factory():
    """``folder_factory(root, per_class=6, seed=0, classes=CLASSES) -> Path``."""
    return make_folder


@pytest.fixture
def same_store():
    return assert_same_store


@pytest.fixture
def child():
    """``child.env(**extra)`` and ``child.npos(*args)`` for subprocess tests."""
    class Child:
        env = staticmethod(subprocess_env)
        npos = staticmethod(npos_command)
    return Child


@pytest.fixture(scope="session")
def base_store(tmp_path_factory):
    """``(folder, store_url)``: one complete float32 store (chunk_rows 8) of a 3 x 6 image
    folder, built once per session. Tests that change either copy them first."""
    from npos.extract import extract_features

    root = make_folder(tmp_path_factory.mktemp("base") / "data")
    url = str(root.parent / "base.zarr")
    extract_features(root, url, chunk_rows=8, **TINY)
    return root, url
