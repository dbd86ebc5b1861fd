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


#: What one demo run writes (the cached data and features are shared by all runs).
RUN_OUTPUTS = ("heads", "reports", "summary.md")


def demo_run_folder(out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Where this run's heads, reports and ``summary.md`` go.

    ``out`` itself for the first run, or with ``overwrite`` (replacing that run's outputs);
    otherwise a new ``out/run-N`` (N = 2, 3, ...), so a re-run never replaces earlier heads
    or reports.
    """
    out = Path(out)
    if overwrite or not any((out / name).exists() for name in RUN_OUTPUTS):
        return out
    n = 2
    while (out / f"run-{n}").exists():
        n += 1
    return out / f"run-{n}"


def run_demo(out: str | os.PathLike = "npos-demo", *, model: str = "npos-tiny",
             pretrained: str | None = "none", seed: int = 0, device: str = "auto",
             epochs: int = 30, overwrite: bool = False, run_dir: str | os.PathLike | None = None,
             log: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Run the whole pipeline on the digits dataset; return ``{variant: metrics.json}``.

    Layout of ``out``: ``data/`` (images), ``features/<model>/`` (one store per split, reused
    by every later run made by the same encoder), and the run's outputs ``heads/<variant>/``,
    ``reports/<variant>/``, ``summary.md`` in ``run_dir`` (default
    :func:`demo_run_folder`: ``out`` for the first run or with ``overwrite``, else a new
    ``out/run-N``). Each step is announced through ``log`` (default: the ``npos.demo`` logger
    at INFO level). The demo folder's writer lock is held for the whole run.
    """
    from npos.store.lock import WriterLock

    log = log or get_logger(__name__).info
    out = Path(out)
    with WriterLock(out, what="demo folder"):
        run_dir = Path(run_dir) if run_dir is not None else \
            demo_run_folder(out, overwrite=overwrite)
        stores = _demo_stores(out, model, pretrained, seed, device, log)
        results = _demo_run(stores, run_dir, seed, epochs, device, overwrite, log)
        text = summary_markdown(results, model=model, pretrained=pretrained, seed=seed,
                                epochs=epochs)
        _write_text(run_dir / "summary.md", text, overwrite=overwrite)
    return results


def _demo_stores(out: Path, model: str, pretrained: str | None, seed: int, device: str,
                 log: Callable[[str], None]) -> dict[str, str]:
    """The feature store of every split: reused when complete, else extracted."""
    from npos.device import resolve_device
    from npos.extract import extract_features
    from npos.store import FeatureStore, store_exists

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
    return stores


def _demo_run(stores: dict[str, str], run_dir: Path, seed: int, epochs: int, device: str,
              overwrite: bool, log: Callable[[str], None]) -> dict[str, dict]:
    """Zero-shot evaluation, then each head variant trained and evaluated, into ``run_dir``."""
    from npos.device import resolve_device
    from npos.evaluate import ScoringConfig, evaluate, write_report
    from npos.train_head import train_head

    device = str(resolve_device(device))
    ood = {"near-ood (digits 6-9)": stores["ood-digits"], "far-ood (noise)": stores["ood-noise"]}
    results: dict[str, dict] = {}
    (run_dir / "reports").mkdir(parents=True, exist_ok=True)
    (run_dir / "heads").mkdir(exist_ok=True)
    log(f"[run] heads and reports -> {run_dir}")
    # Detectors by registry name: the zero-shot baseline, then the same plus each head's own.
    zero_shot = evaluate(stores["test"], ood, ScoringConfig(scores=("mcm", "knn"), device=device),
                         train=stores["train"])
    write_report(zero_shot, run_dir / "reports" / "zero-shot", overwrite=overwrite)
    results["zero-shot"] = zero_shot.to_json()
    for variant, changes in DEMO_VARIANTS.items():
        head_dir = run_dir / "heads" / variant
        log(f"[train-head] {variant} -> {head_dir}")
        train_head(stores["train"], str(head_dir), _demo_head_config(seed, epochs, **changes),
                   device=device, overwrite=overwrite)
        result = evaluate(stores["test"], ood,
                          ScoringConfig(scores=("mcm", "knn", "head"), device=device),
                          head=str(head_dir), train=stores["train"])
        write_report(result, run_dir / "reports" / variant, overwrite=overwrite)
        results[variant] = result.to_json()
    return results


def _write_text(path: Path, text: str, *, overwrite: bool) -> None:
    from npos.atomic import atomic_path

    with atomic_path(path, overwrite=overwrite, directory=False, what="demo summary") as tmp:
        tmp.write_text(text, encoding="utf-8")


def _ood_sets(results: dict[str, dict]) -> list[str]:
    first = next(iter(results.values()))["scores"]
    return [s for s in next(iter(first.values())) if s != "average"]


def summary_table(results: dict[str, dict]) -> str:
    """One Markdown table, in percent: every (variant, score) with its model's ID accuracy and
    FPR95 (↓ lower is better) / AUROC (↑ higher is better) per OOD set."""
    sets = _ood_sets(results)
    header = "| model | score | ID acc. % ↑ | " + " | ".join(
        f"{s} FPR95 % ↓ | {s} AUROC % ↑" for s in sets) + " |"
    lines = [header, "|" + "---|" * (3 + 2 * len(sets))]
    for variant, doc in results.items():
        acc = doc.get("id_accuracy")
        acc_cell = f"{100 * acc:.2f}" if acc is not None else "n/a"
        for score, per_set in doc["scores"].items():
            cells = " | ".join(f"{100 * per_set[s]['fpr95']:.2f} | {100 * per_set[s]['auroc']:.2f}"
                               for s in sets)
            lines.append(f"| {variant} | {score} | {acc_cell} | {cells} |")
    return "\n".join(lines)


def inverted_scores(results: dict[str, dict]) -> list[str]:
    """One sentence per (variant, score, OOD set) whose AUROC is below 50 %."""
    sentences = []
    for variant, doc in results.items():
        for score, per_set in doc["scores"].items():
            for name in _ood_sets(results):
                auroc = 100 * per_set[name]["auroc"]
                if auroc < 50:
                    sentences.append(
                        f"The {score} score of {variant} is inverted on {name} (AUROC "
                        f"{auroc:.2f} % < 50 %): it rates these OOD images as more "
                        f"in-distribution than the ID test images, worse than chance.")
    return sentences


def summary_markdown(results: dict[str, dict], *, model: str, pretrained: str | None,
                     seed: int, epochs: int) -> str:
    """The text of ``summary.md``: readable alone (title, setting, units, arrows, table,
    ID accuracy, and a sentence for every inverted score)."""
    weights = "random init" if str(pretrained).lower() == "none" else f"weights {pretrained}"
    setting = (f"ID: digits {ID_DIGITS[0]}-{ID_DIGITS[-1]} (scikit-learn `load_digits`, test "
               "split); near-OOD: the other digits; far-OOD: uniform-noise images. Encoder "
               f"`{model}` ({weights}, seed {seed}); heads trained {epochs} epochs, with NPOS "
               "synthesis (`npos`) and without it (`no-synthesis`); `zero-shot` uses no head.")
    units = ("All numbers are percentages (%). ↑: higher is better (ID accuracy, AUROC); "
             "↓: lower is better (FPR95, the false-positive rate on OOD at 95 % true "
             "positives on ID). Scores rate how in-distribution an image is; AUROC 50 % is "
             "chance.")
    accuracy = "; ".join(f"{variant} {100 * doc['id_accuracy']:.2f} %"
                         if doc.get("id_accuracy") is not None else f"{variant} n/a"
                         for variant, doc in results.items())
    lines = ["# npos demo: OOD detection on handwritten digits", "", setting, "", units, "",
             summary_table(results), "",
             f"ID accuracy (top-1 on the ID test split): {accuracy}."]
    inverted = inverted_scores(results)
    if inverted:
        lines += ["", *inverted]
    if str(pretrained).lower() == "none":
        lines += ["", (f"`{model}` is randomly initialized: these numbers show that the "
                       "pipeline runs, not what NPOS does with CLIP features.")]
    return "\n".join(lines) + "\n"


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
