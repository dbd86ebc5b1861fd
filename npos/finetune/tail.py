"""`VisionTail`: the trainable end of an open_clip vision transformer, run on cached tokens.

A store extracted with ``--tokens-layer L`` holds the residual stream after the first ``L``
blocks of ``visual.transformer.resblocks``. Everything after that point — blocks ``L..n-1``
(the paper's "last blocks"), the pooling, ``ln_post`` and the projection ``proj`` — is the
*tail*. Fine-tuning trains only the tail, so the frozen front (patch embedding, positional
embedding, ``ln_pre``, blocks ``0..L-1``) is never run again and is not part of the tail's
state.

The forward pass is :func:`npos.encoder.encode_tokens_tail`, the very function the
extraction uses, so a tail with the original weights reproduces the stored embeddings up to
the float16 rounding of the cached tokens.

State-dict keys keep open_clip's names (``visual.transformer.resblocks.10.attn.in_proj_weight``,
``visual.ln_post.weight``, ``visual.proj``), so a tuned tail drops into a full CLIP model with
``clip.load_state_dict(load_file("tail.safetensors"), strict=False)``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from npos.atomic import atomic_path
from npos.encoder import Weights, check_tokens_layer, create_encoder, encode_tokens_tail, num_blocks
from npos.errors import NposError

TAIL_FORMAT = "npos.tail/1"
TAIL_FILE = "tail.safetensors"
TAIL_CONFIG = "tail.json"


class TailError(NposError):
    """A tuned tail is missing, torn, or does not fit its description."""


class _DtypeProbe(nn.Module):
    """Stands in for the dropped patch embedding ``conv1``.

    ``encode_tokens_tail`` reads ``visual.conv1.weight.dtype`` to decide which dtype the
    cached tokens are cast to. This probe offers a ``weight`` with no elements that follows
    ``.to()`` / ``.half()`` like a real parameter but is neither a parameter nor saved
    (a non-persistent buffer).
    """

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("weight", torch.empty(0, dtype=dtype), persistent=False)


class VisionTail(nn.Module):
    """Blocks ``L..n-1``, pooling, ``ln_post`` and projection of an open_clip ViT.

    Parameters
    ----------
    visual : open_clip ``VisionTransformer``
        ``clip.visual`` of the encoder that produced the tokens. It is not modified: the tail
        holds a copy of its trainable end only.
    layer : int
        The store's ``token_layer``: tokens are the residual stream after ``layer`` blocks,
        ``0 <= layer <= n_blocks``.

    Attributes
    ----------
    layer : int
    n_blocks : int
        Blocks of the whole tower; the tail runs ``n_blocks - layer`` of them.
    visual : nn.Module
        The copy the forward pass runs. Blocks before ``layer`` are parameter-free
        placeholders (``nn.Identity``) that keep open_clip's block indices; the patch
        embedding, class/positional embeddings and ``ln_pre`` are dropped.

    Examples
    --------
    >>> clip = create_encoder("npos-tiny")                        # doctest: +SKIP
    >>> tail = VisionTail(clip.visual, layer=2)                   # doctest: +SKIP
    >>> z = tail(tokens)            # (N, T, W) -> (N, D)         # doctest: +SKIP
    """

    def __init__(self, visual: nn.Module, layer: int) -> None:
        super().__init__()
        tower: Any = visual  # open_clip's sub-modules are untyped attributes (see encoder.vit)
        self.layer = check_tokens_layer(visual, layer)
        self.n_blocks = num_blocks(visual)
        # Copy only what the tail needs: deepcopy's memo maps every frozen part to its
        # replacement, so those weights are never duplicated (ViT-B/16's front is 85% of
        # the tower).
        memo: dict[int, object] = {
            id(tower.conv1): _DtypeProbe(tower.conv1.weight.dtype),
            id(tower.ln_pre): nn.Identity(),
            id(tower.class_embedding): None,
            id(tower.positional_embedding): None,
        }
        for block in tower.transformer.resblocks[:layer]:
            memo[id(block)] = nn.Identity()
        self.visual: Any = copy.deepcopy(tower, memo)
        self.visual.requires_grad_(True)

    @property
    def width(self) -> int:
        """Token width W (the residual stream's channels)."""
        return int(self.visual.transformer.width)

    @property
    def output_dim(self) -> int:
        """Embedding dimension D."""
        return int(self.visual.output_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embeddings of cached tokens.

        Parameters
        ----------
        tokens : Tensor of shape (N, T, W)
            Residual stream after ``layer`` blocks (any float dtype; cast to the tail's
            weight dtype outside autocast).

        Returns
        -------
        Tensor of shape (N, D)
            Un-normalized image embeddings, as ``clip.encode_image`` gives them.
        """
        return encode_tokens_tail(self.visual, tokens, self.layer)


# ---------------------------------------------------------------------------- identity
def tuned_pretrained(base: str, tail_sha256: str) -> str:
    """The ``pretrained`` identity of an encoder whose tail was replaced by a tuned one.

    ``base`` is the original identity (``openai``, ``none``, ``sha256:...``); the result,
    e.g. ``openai+finetune:sha256:3f2a...``, names the exact tuned weights, so stores
    re-embedded with one tail compare equal to each other and to the head trained with it,
    and different from the original stores and from any other tail.
    """
    return f"{base}+finetune:{tail_sha256}"


# ---------------------------------------------------------------------------- files
def _sha256(data: bytes) -> str:
    # Not npos.encoder.file_sha256: it caches by (path, size, mtime), and a tail rewritten in
    # place (resume, overwrite) has the same size and possibly the same mtime.
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    with atomic_path(path, overwrite=True, directory=False, what="file") as tmp:
        tmp.write_bytes(data)


def save_tail(tail: VisionTail, out_dir: str | os.PathLike,
              record: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``tail.safetensors`` and ``tail.json`` into ``out_dir``, each atomically.

    The weights go first; ``tail.json`` records their sha256, so a reader can tell a
    complete pair from a weights file whose description was never written or belongs to
    another run. The hash also names the tuned encoder: ``fingerprint`` is
    ``base_fingerprint`` with ``pretrained`` replaced by :func:`tuned_pretrained`.

    Parameters
    ----------
    tail : VisionTail
    out_dir : path
    record : mapping
        The rest of the description; needs ``pretrained`` (the original weights' identity)
        and ``base_fingerprint`` (the token store's fingerprint), and usually holds the
        model, the training configuration and the history.

    Returns
    -------
    dict
        The description as written.
    """
    from safetensors.torch import save

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = save({k: v.detach().to("cpu", torch.float32).contiguous()
                 for k, v in tail.state_dict().items()})
    _atomic_write(out / TAIL_FILE, data)
    sha256 = _sha256(data)
    fingerprint = {**record["base_fingerprint"],
                   "pretrained": tuned_pretrained(record["pretrained"], sha256)}
    config = {"format": TAIL_FORMAT, **record, "token_layer": tail.layer,
              "n_blocks": tail.n_blocks, "sha256": sha256, "fingerprint": fingerprint}
    _atomic_write(out / TAIL_CONFIG, (json.dumps(config, indent=2) + "\n").encode("utf-8"))
    return config


def read_tail_config(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``tail.json`` of a fine-tuning output directory, checked against its weights."""
    out = Path(out_dir)
    weights, desc = out / TAIL_FILE, out / TAIL_CONFIG
    for f in (weights, desc):
        if not f.is_file():
            raise TailError(f"no tuned tail in {str(out)!r}: {f.name} is missing")
    try:
        config = json.loads(desc.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TailError(f"{str(desc)!r} is not valid JSON: {exc}") from None
    if config.get("format") != TAIL_FORMAT:
        raise TailError(f"{str(desc)!r} is not an npos tail description (format="
                        f"{config.get('format')!r}, expected {TAIL_FORMAT!r})")
    if config.get("sha256") != _sha256(weights.read_bytes()):
        raise TailError(f"{str(weights)!r} does not match {str(desc)!r} (sha256 differs): "
                        "the directory holds parts of different runs")
    return config


def load_tail(out_dir: str | os.PathLike, *,
              device: str | torch.device = "cpu") -> tuple[VisionTail, dict[str, Any]]:
    """Load a tuned tail written by :func:`npos.finetune.finetune`.

    The architecture is rebuilt from the model name (random init: every weight the tail
    uses comes from ``tail.safetensors``, and the frozen front is not part of it), then the
    tuned weights are loaded strictly.

    Returns
    -------
    tail : VisionTail
        In eval mode, on ``device``.
    config : dict
        The contents of ``tail.json``.
    """
    config = read_tail_config(out_dir)
    # quick_gelu is a property of the weights' training, not a tensor: rebuild with it.
    weights = Weights(config["model"], None, "none", bool(config.get("quick_gelu", False)))
    clip: Any = create_encoder(weights)
    tail = VisionTail(clip.visual, int(config["token_layer"]))
    load_tail_weights(tail, out_dir)
    return tail.to(device).eval(), config


def load_tail_weights(tail: VisionTail, out_dir: str | os.PathLike) -> None:
    """Load ``OUT/tail.safetensors`` into ``tail`` (strictly: same model and layer)."""
    from safetensors.torch import load_file

    path = Path(out_dir) / TAIL_FILE
    try:
        tail.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        raise TailError(f"{str(path)!r} does not fit this model cut at layer {tail.layer}: "
                        f"{lines[-1]}") from None
