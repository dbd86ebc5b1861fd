"""open_clip loading: the npos model-config registry, weights identity, seeded creation of a
frozen encoder, and its preprocessing.

**npos-tiny.** npos ships one open_clip model config, ``npos-tiny``
(``npos/encoder/model_configs/npos-tiny.json``: 32x32 images, 8x8 patches, a 3-block ViT of
width 64, a 2-block text tower of width 32, 32-dim embeddings). It is registered with
open_clip when this module is imported, so ``open_clip.create_model("npos-tiny")`` works too.
There are no weights for it: it is always **random-init** and exists for tests and the offline
demo, where it runs on a CPU in seconds. Its embeddings carry no semantics.

**Seeded random init.** Every random-init encoder (``pretrained="none"``) is built under
``torch.manual_seed(seed)`` on the CPU, inside a forked RNG so the caller's global RNG state is
untouched. The same model name and seed therefore give bit-identical weights in every process:
each torchrun rank, every resumed run, and the fine-tuning tail built later from the store's
``model`` and ``seed`` attributes. Always build encoders through :func:`create_encoder`.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2

from npos.errors import NposError, ParameterError
from npos.log import open_clip_logs

TINY_MODEL = "npos-tiny"
MODEL_CONFIG_DIR = Path(__file__).with_name("model_configs")
DEFAULT_SEED = 0
HF_HUB_PREFIX = "hf-hub:"


class WeightsUnavailableError(NposError):
    """Pretrained weights could not be downloaded or loaded."""


def register_model_configs() -> None:
    """Register npos's model configs (``npos-tiny``) with open_clip. Idempotent."""
    if TINY_MODEL not in open_clip.list_models():
        open_clip.add_model_config(MODEL_CONFIG_DIR)


register_model_configs()


# ---------------------------------------------------------------------------- weights
@dataclass(frozen=True)
class Weights:
    """Where an encoder's weights come from, resolved and validated.

    Attributes
    ----------
    model : str
        open_clip model name (or ``hf-hub:org/repo``).
    checkpoint : str or None
        What open_clip's ``create_model`` gets as ``pretrained``: a tag, an absolute file
        path, or None (random init, or weights named by an ``hf-hub:`` model).
    identity : str
        What the store records as ``pretrained``: the tag, the ``hf-hub:`` id,
        ``sha256:<hex>`` of a checkpoint file, or ``"none"`` for random init.
    quick_gelu : bool
        The tag's weights were trained with QuickGELU but the model config does not use it
        (e.g. ``ViT-B-16`` + ``openai``); the model is built with QuickGELU so the weights
        compute what they were trained to compute.
    """

    model: str
    checkpoint: str | None
    identity: str
    quick_gelu: bool = False

    @property
    def random_init(self) -> bool:
        return self.identity == "none"


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    # Keyed by size and mtime so a replaced file is hashed again; hashing a 600 MB checkpoint
    # takes about a second and happens once per process.
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 23), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """``sha256:<hex>`` of a file's bytes."""
    path = os.path.abspath(path)
    info = os.stat(path)
    return "sha256:" + _file_sha256(path, info.st_size, info.st_mtime_ns)


def _clean_tag(tag: str) -> str:
    return tag.lower().replace("-", "_")  # as open_clip.pretrained._clean_tag


def resolve_weights(model: str, pretrained: str | None = None) -> Weights:
    """Validate a model name and a ``pretrained`` value; say where the weights come from.

    Parameters
    ----------
    model : str
        An open_clip model name (``open_clip.list_models()``, incl. ``npos-tiny``) or
        ``hf-hub:org/repo`` (architecture and weights from the Hugging Face hub).
    pretrained : str or None
        A pretrained tag of the model (``openai``, ``laion2b_s34b_b88k``, ...), a local
        checkpoint file, or ``"none"`` for seeded random init. ``None`` is allowed only where
        it is unambiguous: ``npos-tiny`` (random init) and ``hf-hub:`` models (hub weights);
        other models must say which weights they want, so a forgotten option never yields a
        silently random encoder.
    """
    register_model_configs()
    if not isinstance(model, str) or not model:
        raise ParameterError(f"model must be a non-empty string; got {model!r}")
    if isinstance(pretrained, str) and pretrained.startswith(HF_HUB_PREFIX):
        raise ParameterError(
            f"hub ids name architecture and weights together: pass --model {pretrained} "
            "(and no --pretrained)")
    if model.startswith(HF_HUB_PREFIX):
        if pretrained is not None:
            raise ParameterError(f"--pretrained is not used with {model!r}: the hub repository "
                                 "provides the weights")
        return Weights(model, None, model)

    known = open_clip.list_models()
    if model not in known:
        close = difflib.get_close_matches(model, known, n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ParameterError(f"unknown open_clip model {model!r}{hint} "
                             "(open_clip.list_models() lists them all)")
    tags = open_clip.list_pretrained_tags_by_model(model)
    if pretrained is None:
        if model == TINY_MODEL:
            return Weights(model, None, "none")
        raise ParameterError(
            f"say which weights {model!r} should use: --pretrained TAG "
            f"({', '.join(tags) if tags else 'it has no tags'}), a checkpoint file, or "
            "'none' for random init")
    if pretrained.lower() == "none":
        return Weights(model, None, "none")
    if os.path.isfile(pretrained):
        path = os.path.abspath(pretrained)
        return Weights(model, path, file_sha256(path))
    if _clean_tag(pretrained) in tags:
        tag = _clean_tag(pretrained)
        tag_cfg = open_clip.get_pretrained_cfg(model, tag)
        model_cfg = open_clip.get_model_config(model) or {}
        quick_gelu = bool(tag_cfg.get("quick_gelu")) and not model_cfg.get("quick_gelu", False)
        return Weights(model, tag, tag, quick_gelu)
    if os.sep in pretrained or Path(pretrained).suffix:
        raise ParameterError(f"checkpoint file {pretrained!r} does not exist")
    raise ParameterError(
        f"{pretrained!r} is neither a pretrained tag of {model!r} "
        f"({', '.join(tags) if tags else 'it has none'}) nor an existing checkpoint file")


def create_encoder(model: str | Weights, pretrained: str | None = None, *,
                   seed: int = DEFAULT_SEED) -> torch.nn.Module:
    """Build a frozen open_clip model on the CPU in float32 (eval mode, no gradients).

    Random init is seeded (see the module docstring); loaded weights do not depend on
    ``seed``. This is the one place npos creates encoders: the extraction, every torchrun rank
    and the fine-tuning tail all call it, so the same ``(model, pretrained, seed)`` always
    means the same weights.

    Parameters
    ----------
    model, pretrained
        See :func:`resolve_weights`; ``model`` may also be an already resolved
        :class:`Weights` (then ``pretrained`` is not used).
    seed : int
        Seed of the random initialization.

    Raises
    ------
    WeightsUnavailableError
        Remote weights could not be downloaded, or a checkpoint file does not fit the model.
    """
    weights = model if isinstance(model, Weights) else resolve_weights(model, pretrained)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ParameterError(f"seed must be an int >= 0; got {seed!r}")
    with torch.random.fork_rng(devices=[]), open_clip_logs(random_init=weights.random_init):
        torch.manual_seed(seed)
        try:
            clip = open_clip.create_model(
                weights.model, pretrained=weights.checkpoint, device="cpu", precision="fp32",
                force_quick_gelu=weights.quick_gelu, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - downloads and unpickling raise many types;
            # the cause stays chained for `npos --debug`.
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if weights.checkpoint is not None and os.path.isfile(weights.checkpoint):
                raise WeightsUnavailableError(
                    f"cannot load checkpoint {weights.checkpoint!r} into {weights.model!r}: "
                    f"{reason}") from exc
            raise WeightsUnavailableError(
                f"weights for {weights.model!r} ({weights.identity}) could not be downloaded "
                f"({reason}); offline, pass a local checkpoint file (--pretrained PATH) or "
                "--pretrained none for random init") from exc
    clip.eval()
    clip.requires_grad_(False)
    return clip


def image_preprocess_config(clip: Any) -> dict[str, Any]:
    """open_clip's inference preprocessing of ``clip`` as a plain dict (the store's
    ``preprocess`` attribute): size, mode, mean, std, interpolation, resize_mode, fill_color.

    ``open_clip.transform.PreprocessCfg(**cfg)`` rebuilds it.
    """
    cfg = asdict(PreprocessCfg(**clip.visual.preprocess_cfg))
    for key in ("mean", "std"):
        cfg[key] = [float(v) for v in cfg[key]]
    if isinstance(cfg["size"], (tuple, list)):
        cfg["size"] = [int(v) for v in cfg["size"]]
    return cfg


def image_transform(preprocess: dict[str, Any]) -> Callable:
    """The inference transform (PIL image -> float tensor (3, H, W)) of a preprocess dict."""
    return image_transform_v2(PreprocessCfg(**preprocess), is_train=False)


def load_encoder(model: str | Weights, pretrained: str | None = None, *,
                 device: str | torch.device = "cpu", seed: int = DEFAULT_SEED):
    """Frozen encoder on ``device`` plus its preprocessing and tokenizer.

    Returns
    -------
    clip : torch.nn.Module
        The open_clip model (eval mode, no gradients).
    preprocess : callable
        open_clip's inference transform for the model: PIL image -> tensor (3, H, W).
    tokenizer : callable
        open_clip's tokenizer for the model: list of str -> LongTensor (n, context_length).
    """
    clip = create_encoder(model, pretrained, seed=seed).to(device)
    preprocess = image_transform(image_preprocess_config(clip))
    tokenizer = open_clip.get_tokenizer(model.model if isinstance(model, Weights) else model)
    return clip, preprocess, tokenizer
