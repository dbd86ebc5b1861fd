"""Inputs of the extraction: image folders, file lists, class names, and robust decoding.

**Image folder** (``DATA`` is a directory), ImageFolder layout::

    DATA/<class>/**/<image>     one sub-folder per class (any depth below it)
    DATA/**/<image>             no class folders (or ``unlabeled=True``): labels -1

Every non-hidden sub-folder is a class, even an empty one, so two splits with the same folders
get the same label ids. Classes are in sorted order unless ``classes`` fixes the order (then
every folder must be listed). Rows are in sorted order of their relative paths; the relative
path is the row's id. Hidden files and folders (``.name``) are skipped; files count as images
by extension (:data:`IMAGE_EXTENSIONS`, case-insensitive).

**File list** (``DATA`` is a ``.txt`` or ``.csv`` file): one image per line, in the order
given, with an optional label. ``.txt``: ``path`` or ``path<TAB>label`` (or ``path label``
when the path has no spaces); ``.csv``: columns ``path[,label]``, an optional header row
starting with ``path``. Relative paths are relative to the list's folder; the path as written
is the row's id. A label is a class index (class names from ``classes``, else ``"0".."C-1"``)
or a class name (classes sorted unless ``classes`` fixes the order); ``-1`` or empty means
unlabeled. Lines that are blank or start with ``#`` are skipped.

**Decoding** (:func:`decode_image`): every image is converted to 8-bit RGB — grayscale,
palette (with or without transparency), RGBA/LA (alpha dropped, as open_clip's own
``_convert_to_rgb``), CMYK, and 16-bit images (scaled by 1/256). Files that cannot be read
raise :class:`ImageDecodeError` with a short reason: file not found, empty file, not an image,
truncated image, decompression bomb (more pixels than ``PIL.Image.MAX_IMAGE_PIXELS``, 89.5 M by
default; raise that global to allow bigger images), or the decoder's message.
"""

from __future__ import annotations

import csv
import hashlib
import os
import stat
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from npos.errors import NposError, ParameterError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif",
                    ".tiff", ".webp")
LIST_SUFFIXES = (".txt", ".csv")
IMAGENET = "imagenet"
_WNIDS_FILE = Path(__file__).resolve().parents[1] / "data" / "imagenet_wnids.txt"


class DataError(NposError):
    """The input images (folder or file list) cannot be used."""


class ImageDecodeError(NposError):
    """One image could not be read; ``reason`` says why in a few words."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot read image {path!r}: {reason}")
        self.path = path
        self.reason = reason


# ---------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class ImageSource:
    """The rows of a store-to-be: image ids (relative paths), labels and class keys.

    Attributes
    ----------
    root : str
        Absolute folder the ids are relative to.
    ids : list of str, length N
        Row ids: paths relative to ``root`` (absolute paths stay absolute).
    labels : ndarray of shape (N,), int32
        Class index per row, -1 where unlabeled.
    classes : list of str or None
        Class keys (folder names or list labels) of label ids 0..C-1; None when unlabeled.
    kind : {"folder", "list"}
    """

    root: str
    ids: list[str]
    labels: np.ndarray
    classes: list[str] | None
    kind: str
    _paths: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Absolute paths as one fixed-width bytes array: DataLoader workers fork and read it
        # without touching per-item Python refcounts (a list of 1M str objects would be
        # copied page by page into every worker).
        paths = [os.path.join(self.root, i).encode("utf-8", "surrogateescape")
                 for i in self.ids]
        object.__setattr__(self, "_paths", np.array(paths, dtype=np.bytes_))

    def __len__(self) -> int:
        return len(self.ids)

    def path(self, index: int) -> str:
        """Absolute path of row ``index``."""
        return bytes(self._paths[index]).decode("utf-8", "surrogateescape")

    @property
    def labeled(self) -> bool:
        return self.classes is not None

    def fingerprint(self) -> str:
        """sha256 over the rows' ids and labels, in row order."""
        digest = hashlib.sha256()
        for row_id, label in zip(self.ids, self.labels.tolist(), strict=True):
            digest.update(f"{row_id}\t{label}\n".encode("utf-8", "surrogateescape"))
        return "sha256:" + digest.hexdigest()

    def describe(self) -> dict[str, Any]:
        """The store's ``source`` attribute."""
        return {"root": self.root, "kind": self.kind, "files": len(self),
                "fingerprint": self.fingerprint(), "classes": self.classes}


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _walk_images(top: str, root: str) -> list[str]:
    """Relative (posix) paths of the image files under ``top``, hidden entries skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = os.path.relpath(dirpath, root)
        for name in filenames:
            if not name.startswith(".") and _is_image(name):
                rel = name if rel_dir == "." else os.path.join(rel_dir, name)
                found.append(Path(rel).as_posix())
    return found


def read_classes_file(path: str | os.PathLike) -> list[str]:
    """Class keys, one per line (blank lines and ``#`` comments skipped); no duplicates."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    keys = [line for line in lines if line and not line.startswith("#")]
    if not keys:
        raise DataError(f"classes file {str(path)!r} lists no classes")
    dup = [key for key, count in Counter(keys).items() if count > 1]
    if dup:
        raise DataError(f"classes file {str(path)!r} lists {dup[0]!r} more than once")
    return keys


def scan_image_folder(root: str | os.PathLike, *, classes: Sequence[str] | None = None,
                      unlabeled: bool = False) -> ImageSource:
    """Rows of an image folder (see the module docstring for the layout)."""
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise DataError(f"image folder {root!r} does not exist")
    with os.scandir(root) as scan:
        entries = sorted(scan, key=lambda e: e.name)
        folders = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
        top_images = [e.name for e in entries
                      if not e.is_dir() and not e.name.startswith(".") and _is_image(e.name)]
    if unlabeled or not folders:
        ids = sorted(_walk_images(root, root))
        if not ids:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {root!r}")
        return ImageSource(root, ids, np.full(len(ids), -1, dtype=np.int32), None, "folder")
    if top_images:
        raise DataError(
            f"{root!r} has class folders and also {len(top_images)} images at its top level "
            f"(e.g. {top_images[0]!r}); move them into a class folder, or pass --unlabeled")
    if classes is None:
        keys = folders
    else:
        keys = list(classes)
        unknown = [f for f in folders if f not in set(keys)]
        if unknown:
            raise DataError(f"folder {unknown[0]!r} of {root!r} is not in the classes list "
                            f"({len(unknown)} folder(s) missing from it)")
    index = {key: i for i, key in enumerate(keys)}
    rows: list[tuple[str, int]] = []
    for folder in folders:
        rows.extend((rel, index[folder]) for rel in _walk_images(os.path.join(root, folder), root))
    if not rows:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {root!r}")
    rows.sort()
    ids = [r[0] for r in rows]
    labels = np.array([r[1] for r in rows], dtype=np.int32)
    return ImageSource(root, ids, labels, keys, "folder")


def _parse_list_rows(path: Path) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".csv":
        records = list(csv.reader(text.splitlines()))
        if records and records[0] and records[0][0].strip().lower() == "path":
            records = records[1:]
        for lineno, rec in enumerate(records, 1):
            fields = [f.strip() for f in rec]
            if not fields or not fields[0] or fields[0].startswith("#"):
                continue
            if len(fields) > 2:
                raise DataError(f"{str(path)!r} row {lineno}: expected 'path[,label]', got "
                                f"{len(fields)} columns")
            rows.append((fields[0], fields[1] if len(fields) == 2 else ""))
        return rows
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "\t" in line:
            file_path, label = (s.strip() for s in line.rsplit("\t", 1))
        else:
            parts = line.split()
            if len(parts) > 2:
                raise DataError(f"{str(path)!r} line {lineno}: expected 'path' or 'path label'; "
                                "separate path and label with a tab when the path has spaces")
            file_path, label = parts[0], parts[1] if len(parts) == 2 else ""
        rows.append((file_path, label))
    return rows


def _as_int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def read_file_list(list_path: str | os.PathLike, *,
                   classes: Sequence[str] | None = None) -> ImageSource:
    """Rows of a ``.txt``/``.csv`` file list (see the module docstring for the format)."""
    path = Path(list_path)
    if path.suffix.lower() not in LIST_SUFFIXES:
        raise DataError(f"a file list must end in .txt or .csv; got {str(path)!r}")
    if not path.is_file():
        raise DataError(f"file list {str(path)!r} does not exist")
    rows = _parse_list_rows(path)
    if not rows:
        raise DataError(f"file list {str(path)!r} lists no images")
    ids = [Path(p).as_posix() for p, _ in rows]
    raw = [label for _, label in rows]
    given = [label for label in raw if label not in ("", "-1")]
    keys = list(classes) if classes is not None else None
    if not given:
        labels = np.full(len(ids), -1, dtype=np.int32)
        return ImageSource(str(path.parent.resolve()), ids, labels, None, "list")
    if all(_as_int(label) is not None for label in given):
        values = [int(label) if label else -1 for label in raw]  # every label parses here
        top = max(values)
        if min(values) < -1:
            raise DataError(f"file list {str(path)!r} has a negative label other than -1")
        if keys is None:
            keys = [str(i) for i in range(top + 1)]
        elif top >= len(keys):
            raise DataError(f"file list {str(path)!r} has label {top} but the classes list "
                            f"has only {len(keys)} classes")
    else:
        if keys is None:
            keys = sorted(set(given))
        index = {key: i for i, key in enumerate(keys)}
        missing = sorted(set(given) - set(index))
        if missing:
            raise DataError(f"label {missing[0]!r} of {str(path)!r} is not in the classes list")
        values = [index[label] if label not in ("", "-1") else -1 for label in raw]
    labels = np.array(values, dtype=np.int32)
    return ImageSource(str(path.parent.resolve()), ids, labels, keys, "list")


def load_image_source(data: str | os.PathLike, *,
                      classes: str | os.PathLike | Sequence[str] | None = None,
                      unlabeled: bool = False) -> ImageSource:
    """An image folder or a file list, by what ``data`` is.

    Parameters
    ----------
    data : path
        A directory (ImageFolder layout) or a ``.txt``/``.csv`` file list.
    classes : path or sequence of str, optional
        Class keys in label order (a file with one key per line, or a list).
    unlabeled : bool
        Ignore class folders / labels: every row gets label -1.
    """
    if isinstance(classes, (str, os.PathLike)):
        classes = read_classes_file(classes)
    if os.path.isdir(data):
        return scan_image_folder(data, classes=classes, unlabeled=unlabeled)
    if not os.path.exists(data):
        raise DataError(f"input {str(data)!r} does not exist (expected an image folder or a "
                        ".txt/.csv file list)")
    source = read_file_list(data, classes=classes)
    if unlabeled and source.labeled:
        source = ImageSource(source.root, source.ids, np.full(len(source), -1, dtype=np.int32),
                             None, source.kind)
    return source


# ---------------------------------------------------------------------------- class names
def imagenet_class_names() -> dict[str, str]:
    """WordNet id -> open_clip's curated ImageNet-1k class name (1000 entries)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    wnids = _WNIDS_FILE.read_text(encoding="utf-8").split()
    if len(wnids) != len(IMAGENET_CLASSNAMES):  # pragma: no cover - packaging error
        raise DataError(f"{str(_WNIDS_FILE)!r} has {len(wnids)} ids; expected "
                        f"{len(IMAGENET_CLASSNAMES)}")
    return dict(zip(wnids, IMAGENET_CLASSNAMES, strict=True))


def read_class_names(spec: str | os.PathLike | Mapping[str, str]) -> dict[str, str]:
    """A class key -> readable name map.

    ``"imagenet"`` is the built-in WordNet-id map of ImageNet-1k (open_clip's curated names).
    A file has one class per line: ``key<TAB>name``, or ``key name words`` (the first
    whitespace-separated word is the key, the rest the name: the format of ImageNet's
    ``LOC_synset_mapping.txt``). Blank lines and ``#`` comments are skipped.
    """
    if isinstance(spec, Mapping):
        return {str(k): str(v) for k, v in spec.items()}
    if str(spec) == IMAGENET:
        return imagenet_class_names()
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"class names file {str(path)!r} does not exist (or pass 'imagenet')")
    mapping: dict[str, str] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, name = line.partition("\t") if "\t" in line else line.partition(" ")
        key, name = key.strip(), name.strip()
        if not name:
            raise DataError(f"{str(path)!r} line {lineno}: expected 'key<TAB>name' or "
                            "'key name'")
        if key in mapping:
            raise DataError(f"{str(path)!r} names class {key!r} twice")
        mapping[key] = name
    if not mapping:
        raise DataError(f"class names file {str(path)!r} is empty")
    return mapping


def readable_class_names(keys: Sequence[str], mapping: Mapping[str, str] | None) -> list[str]:
    """Readable name of every class key (the keys themselves without a map)."""
    if mapping is None:
        return list(keys)
    missing = [k for k in keys if k not in mapping]
    if missing:
        raise DataError(f"the class names map has no name for class {missing[0]!r} "
                        f"({len(missing)} of {len(keys)} classes missing)")
    return [mapping[k] for k in keys]


# ---------------------------------------------------------------------------- decoding
def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img)
        # 16-bit data (I;16*, or 'I' with values above 8 bits) is scaled to 8 bits; PIL's own
        # conversion would clip everything above 255 to white.
        if mode != "I" or arr.max(initial=0) > 255:
            arr = np.clip(arr.astype(np.int64), 0, 65535) >> 8
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 if np.nanmax(arr, initial=0.0) <= 1.0 else 1.0
        arr = np.clip(np.nan_to_num(arr * scale), 0, 255).round()
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns when palette transparency is dropped directly
    return img.convert("RGB")


def decode_image(path: str) -> Image.Image:
    """Read an image file fully and convert it to 8-bit RGB.

    Raises
    ------
    ImageDecodeError
        With a short ``reason``: file not found, not a regular file, empty file, not an image,
        truncated image, decompression bomb, or the decoder's message.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ImageDecodeError(path, "file not found") from None
    except OSError as exc:
        raise ImageDecodeError(path, f"cannot access file ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        # A FIFO or device named like an image would block or never end.
        raise ImageDecodeError(path, "not a regular file")
    if info.st_size == 0:
        raise ImageDecodeError(path, "empty file")
    try:
        with warnings.catch_warnings():
            # A warning means "more pixels than MAX_IMAGE_PIXELS"; refuse instead of decoding.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                return _to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(path, f"decompression bomb ({exc})") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(path, "not an image (unknown format)") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        message = str(exc) or type(exc).__name__
        if "truncated" in message.lower():
            raise ImageDecodeError(path, f"truncated image ({message})") from None
        raise ImageDecodeError(path, f"cannot decode ({message})") from None


class ImageDataset(torch.utils.data.Dataset):
    """Decoded, preprocessed images of an :class:`ImageSource`, failures included.

    ``dataset[i]`` is ``(i, image, reason)``: ``image`` a float tensor of ``image_shape``
    (zeros when the file failed) and ``reason`` an empty string or why the file failed. A
    failure never raises here, so one bad file cannot take a DataLoader worker down; the
    extraction loop decides what to do with it.
    """

    def __init__(self, source: ImageSource, transform: Callable,
                 image_shape: Sequence[int]) -> None:
        self.source = source
        self.transform = transform
        self.image_shape = tuple(int(s) for s in image_shape)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, str]:
        path = self.source.path(index)
        try:
            image = self.transform(decode_image(path))
        except ImageDecodeError as exc:
            return index, torch.zeros(self.image_shape), exc.reason
        if tuple(image.shape) != self.image_shape:
            raise ParameterError(f"the preprocessing made {tuple(image.shape)} of {path!r}; "
                                 f"expected {self.image_shape}")
        return index, image, ""
