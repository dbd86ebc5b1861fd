"""Fixtures of the fine-tuning tests: generated image folders extracted with npos-tiny and
``tokens_layer`` (real extraction, real encoder; the images are generated with PIL)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from npos.synthesize import SynthesisConfig

CLASSES = ("red", "green", "blue")
LAYER = 1
#: Small synthesis settings that fit a queue of 16 rows per class.
SYNTH = SynthesisConfig(k=4, select=8, pick=2, candidates=16, keep=2)


def write_images(root: Path, per_class: int, *, seed: int, labeled: bool = True,
                 broken: int = 0) -> Path:
    """Noisy images whose dominant colour channel is the class (OOD: grey), as PNG/JPEG."""
    rng = np.random.default_rng(seed)
    classes = CLASSES if labeled else ("",)
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.full((32, 32, 3), 90.0)
            if labeled:
                base[..., c] = 220
            pixels = np.clip(base + rng.normal(0, 35, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"img{i:03d}.{'png' if i % 2 else 'jpg'}")
    for i in range(broken):
        (root / classes[0] / f"broken{i}.jpg").write_bytes(b"not an image")
    return root


def extract(data: Path, out: Path, **kw) -> str:
    from npos.extract import extract_features

    params = {"model": "npos-tiny", "dtype": "float32", "workers": 0, "progress": False,
              "chunk_rows": 16, "batch_size": 16, "templates": ["a photo of a {}."], **kw}
    extract_features(str(data), str(out), **params)
    return str(out)


@pytest.fixture(scope="session")
def token_stores(tmp_path_factory) -> dict[str, str]:
    """Stores of npos-tiny with tokens after block 1 (of 3) unless said otherwise:

    * ``train``: 3 classes x 24 images; ``test``: 3 x 8 plus one unreadable file;
      ``ood``: 16 unlabeled grey images;
    * ``ood_layer2``: the OOD images cut after block 2.
    """
    root = tmp_path_factory.mktemp("finetune-data")
    train = write_images(root / "train", 24, seed=0)
    test = write_images(root / "test", 8, seed=1, broken=1)
    ood = write_images(root / "ood", 16, seed=2, labeled=False)
    return {
        "train": extract(train, root / "train.zarr", tokens_layer=LAYER),
        "test": extract(test, root / "test.zarr", tokens_layer=LAYER),
        "ood": extract(ood, root / "ood.zarr", tokens_layer=LAYER, unlabeled=True),
        "ood_layer2": extract(ood, root / "ood2.zarr", tokens_layer=2, unlabeled=True),
    }


@pytest.fixture
def head_config():
    """``head_config(**overrides) -> HeadConfig`` sized for the generated stores."""
    from npos.train_head import HeadConfig

    def make(**overrides) -> HeadConfig:
        params = {"epochs": 2, "batch_size": 16, "lr": 1e-3, "queue": 16, "head": "mlp",
                  "synthesis": SYNTH, "seed": 0, **overrides}
        return HeadConfig(**params)
    return make
