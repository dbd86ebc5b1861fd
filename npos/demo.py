"""The built-in demo dataset: real handwritten digits from scikit-learn as small images.

``load_digits`` (1,797 8×8 scans of handwritten digits, shipped inside scikit-learn) is
split into:

* **ID**: the digits in ``ID_DIGITS``, stratified into ``train/<name>/`` and ``test/<name>/``
  (ImageFolder layout, so extraction reads labels from folder names);
* **near-OOD**: the other digits, unlabeled, in ``ood-digits/``;
* **far-OOD**: seeded uniform-noise images in ``ood-noise/``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from npos.log import get_logger

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ID_DIGITS = (0, 1, 2, 3, 4, 5)
SPLITS = ("train", "test", "ood-digits", "ood-noise")


def write_demo_dataset(root: str | os.PathLike, *, seed: int = 0, image_size: int = 32,
                       test_fraction: float = 0.3, noise_images: int = 300) -> dict[str, Path]:
    """Write the demo images under ``root`` (once) and return ``{split: folder}``.

    The folder is written to a temporary sibling and renamed into place, so an interrupted
    run never leaves a half-written dataset; a complete one with the same parameters is
    reused as is.
    """
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    root = Path(root)
    params = {"seed": seed, "image_size": image_size, "test_fraction": test_fraction,
              "noise_images": noise_images, "id_digits": list(ID_DIGITS)}
    marker = root / "dataset.json"
    folders = {split: root / split for split in SPLITS}
    if marker.exists() and json.loads(marker.read_text()) == params:
        return folders
    if root.exists():
        shutil.rmtree(root)

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    target = digits.target
    is_id = np.isin(target, ID_DIGITS)
    id_idx = np.flatnonzero(is_id)
    train_idx, test_idx = train_test_split(id_idx, test_size=test_fraction, random_state=seed,
                                           stratify=target[id_idx])

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-data-", dir=root.parent))

    def save(pixels: np.ndarray, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(pixels, mode="L").resize((image_size, image_size),
                                                       Image.Resampling.BILINEAR)
        img.save(path)

    for split, indices in (("train", train_idx), ("test", test_idx)):
        for i in indices:
            save(images[i], tmp / split / DIGIT_NAMES[target[i]] / f"{i:04d}.png")
    for i in np.flatnonzero(~is_id):
        save(images[i], tmp / "ood-digits" / f"{i:04d}.png")
    rng = np.random.default_rng(seed)
    for j in range(noise_images):
        save(rng.integers(0, 256, size=(8, 8), dtype=np.uint8), tmp / "ood-noise" / f"{j:04d}.png")
    (tmp / "dataset.json").write_text(json.dumps(params))
    os.replace(tmp, root)
    return folders


#: Head variants the demo trains: NPOS with the package defaults, and the same run without
#: synthesis (the ablation users compare against).
DEMO_VARIANTS = {"npos": {}, "no-synthesis": {"ood_weight": 0.0}}


def _demo_head_config(seed: int, epochs: int, **changes):
    """Head settings scaled to the demo's ~125 training images per class."""
    import dataclasses

    from npos.synthesize import SynthesisConfig
    from npos.train_head import HeadConfig

    synthesis = SynthesisConfig(k=20, select=30, pick=2, candidates=200, keep=2)
    return dataclasses.replace(HeadConfig(epochs=epochs, batch_size=128, queue=100,
                                          synthesis=synthesis, seed=seed), **changes)


def run_demo(out: str | os.PathLike = "npos-demo", *, model: str = "npos-tiny",
             pretrained: str | None = "none", seed: int = 0, device: str = "auto",
             epochs: int = 30,
             log: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Run the whole pipeline on the digits dataset; return ``{variant: metrics.json}``.

    Layout of ``out``: ``data/`` (images), ``features/<model>/`` (one store per split, reused
    on the next run), ``heads/<variant>/``, ``reports/<variant>/``. Heads and reports are
    rewritten on every run; the cached features are reused when they were made by the same
    encoder. Each step is announced through ``log`` (default: the ``npos.demo`` logger at
    INFO level).
    """
    from npos.device import resolve_device
    from npos.evaluate import ScoringConfig, evaluate, write_report
    from npos.extract import extract_features
    from npos.store import FeatureStore, store_exists
    from npos.train_head import train_head

    log = log or get_logger(__name__).info
    out = Path(out)
    device = str(resolve_device(device))
    folders = write_demo_dataset(out / "data", seed=seed)
    slug = f"{model}-{pretrained or 'default'}".replace("/", "_").replace(":", "_")
    feature_dir = out / "features" / slug
    stores: dict[str, str] = {}
    for split, folder in folders.items():
        url = str(feature_dir / f"{split}.zarr")
        stores[split] = url
        if store_exists(url) and FeatureStore.open(url).is_complete:
            log(f"[cache] {split}: reusing {url}")
            continue
        log(f"[extract] {split}: {folder} -> {url}")
        extract_features(str(folder), url, model=model, pretrained=pretrained, seed=seed,
                         device=device, dtype="float32", chunk_rows=512, workers=0,
                         unlabeled=split.startswith("ood"), progress=False)
    ood = {"near-ood (digits 6-9)": stores["ood-digits"], "far-ood (noise)": stores["ood-noise"]}

    results: dict[str, dict] = {}
    (out / "reports").mkdir(exist_ok=True)
    (out / "heads").mkdir(exist_ok=True)
    # Detectors by registry name: the zero-shot baseline, then the same plus each head's own.
    zero_shot = evaluate(stores["test"], ood, ScoringConfig(scores=("mcm", "knn"), device=device),
                         train=stores["train"])
    write_report(zero_shot, out / "reports" / "zero-shot", overwrite=True)
    results["zero-shot"] = zero_shot.to_json()
    for variant, changes in DEMO_VARIANTS.items():
        head_dir = out / "heads" / variant
        log(f"[train-head] {variant} -> {head_dir}")
        train_head(stores["train"], str(head_dir), _demo_head_config(seed, epochs, **changes),
                   device=device, overwrite=True)
        result = evaluate(stores["test"], ood,
                          ScoringConfig(scores=("mcm", "knn", "head"), device=device),
                          head=str(head_dir), train=stores["train"])
        write_report(result, out / "reports" / variant, overwrite=True)
        results[variant] = result.to_json()
    (out / "summary.md").write_text(summary_table(results) + "\n")
    return results


def summary_table(results: dict[str, dict]) -> str:
    """One Markdown table: every (variant, score) with FPR95/AUROC per OOD set and average."""
    first = next(iter(results.values()))["scores"]
    sets = list(next(iter(first.values())).keys())
    header = "| model | score | " + " | ".join(f"{s} FPR95 | {s} AUROC" for s in sets) + " |"
    lines = [header, "|" + "---|" * (2 + 2 * len(sets))]
    for variant, doc in results.items():
        for score, per_set in doc["scores"].items():
            cells = " | ".join(f"{100 * per_set[s]['fpr95']:.2f} | {100 * per_set[s]['auroc']:.2f}"
                               for s in sets)
            lines.append(f"| {variant} | {score} | {cells} |")
    return "\n".join(lines)


def prepare_demo_folder(out: str | os.PathLike) -> Path:
    """Claim ``out`` for the demo: refuse a non-empty folder that is not a demo folder."""
    from npos.errors import StoreExistsError

    out = Path(out)
    marker = out / "npos-demo.json"
    if out.exists() and any(out.iterdir()) and not marker.exists():
        raise StoreExistsError(f"{str(out)!r} exists and is not an npos demo folder; "
                               "choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"created_by": "npos demo"}))
    return out
