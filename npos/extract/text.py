"""Zero-shot class embeddings from a prompt ensemble.

For class ``c`` with readable name ``name``: embed ``template.replace("{}", name)`` for every
template, L2-normalize each text embedding, average, and L2-normalize the mean (CLIP's
prompt-ensembling recipe, as the NPOS reference code does).

The default ensemble is the 18 templates the NPOS reference code uses for ImageNet
(``CLIP_based/OOD/CLIP/CLIP_ft.py``), which are CLIP's CIFAR prompt set from
``openai/CLIP: data/prompts.md``; 12 of them are also among open_clip's 80
``OPENAI_IMAGENET_TEMPLATES``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from npos.errors import ParameterError
from npos.encoder import autocast

if TYPE_CHECKING:
    from open_clip import CLIP

#: The 18 prompt templates of the NPOS reference code (CLIP's CIFAR prompt set).
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
)


def validate_templates(templates: Sequence[str]) -> list[str]:
    """Check that there is at least one template and each has exactly one ``{}``."""
    templates = [str(t) for t in templates]
    if not templates:
        raise ParameterError("at least one prompt template is needed")
    for template in templates:
        if template.count("{}") != 1:
            raise ParameterError(
                f"prompt template {template!r} must contain '{{}}' exactly once (where the "
                "class name goes)")
    return templates


def load_templates(path: str | os.PathLike[str]) -> list[str]:
    """Read templates from a text file: one per line; blank lines and ``#`` comments skipped."""
    text = Path(path).read_text(encoding="utf-8")
    lines = [line.strip() for line in text.splitlines()]
    templates = [line for line in lines if line and not line.startswith("#")]
    if not templates:
        raise ParameterError(f"templates file {str(path)!r} has no templates")
    return validate_templates(templates)


@torch.inference_mode()
def text_embeddings(clip: CLIP, tokenizer: Callable, class_names: Sequence[str],
                    templates: Sequence[str] = DEFAULT_TEMPLATES, *,
                    batch_size: int = 512) -> np.ndarray:
    """Prompt-ensemble text embedding of every class, on the model's device (in float32, as
    stored: see :mod:`npos.encoder.precision`).

    Parameters
    ----------
    clip : open_clip model
        Its ``encode_text`` is used.
    tokenizer : callable
        open_clip tokenizer of the model.
    class_names : sequence of str, length C
        Readable class names.
    templates : sequence of str, length T
        Prompt templates, each with one ``{}``.
    batch_size : int
        Prompts per forward pass.

    Returns
    -------
    ndarray of shape (C, D), float32
        Unit-norm rows, one per class.
    """
    templates = validate_templates(templates)
    names = [str(n) for n in class_names]
    if not names:
        raise ParameterError("text embeddings need at least one class name")
    device = next(clip.parameters()).device
    prompts = [t.replace("{}", name) for name in names for t in templates]
    parts = []
    for start in range(0, len(prompts), batch_size):
        tokens = tokenizer(prompts[start:start + batch_size]).to(device)
        with autocast(device, "float32"):
            emb = clip.encode_text(tokens)
        parts.append(torch.nn.functional.normalize(emb.float(), dim=-1))
    per_prompt = torch.cat(parts).reshape(len(names), len(templates), -1)
    return torch.nn.functional.normalize(per_prompt.mean(dim=1), dim=-1).cpu().numpy()

