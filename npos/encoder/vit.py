"""The split of an open_clip vision transformer at block L, used for cached tokens.

**Token layer.** ``tokens_layer=L`` means the residual stream after ``L`` blocks of
``visual.transformer.resblocks`` have been applied (``L=0``: the input of the first block, after
``ln_pre``; ``L=n_blocks``: the output of the last block, before ``ln_post``). The paper caches
after block 10 of ViT-B/16's 12 (``L=10``) and tunes the last two.
:func:`encode_tokens_tail` runs the remaining blocks, the pooling, ``ln_post`` and the
projection exactly as ``VisionTransformer.forward`` does. Extraction
(:func:`encode_image_tokens`) and fine-tuning (the tuned tail) both run through it.
"""

from __future__ import annotations

from typing import Any

import torch
from open_clip.transformer import VisionTransformer

from npos.errors import ParameterError


def _vision_transformer(visual: torch.nn.Module) -> Any:
    # Any, not VisionTransformer: open_clip's sub-modules are attributes set in __init__, which
    # type checkers only see through Module.__getattr__ (Tensor | Module).
    if not isinstance(visual, VisionTransformer):
        raise ParameterError(
            "cached tokens need an open_clip VisionTransformer image tower; this model's is "
            f"{type(visual).__name__}")
    return visual


def num_blocks(visual: torch.nn.Module) -> int:
    """Number of transformer blocks of a ViT image tower."""
    return len(_vision_transformer(visual).transformer.resblocks)


def check_tokens_layer(visual: torch.nn.Module, layer: int) -> int:
    """Validate ``layer`` (0 <= L <= number of blocks) for this image tower."""
    n = num_blocks(visual)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= n:
        raise ParameterError(f"tokens_layer must be an int in [0, {n}] for this model "
                             f"({n} blocks); got {layer!r}")
    return layer


def _run_blocks(visual: VisionTransformer, x: torch.Tensor, start: int,
                stop: int | None) -> torch.Tensor:
    transformer = visual.transformer
    # open_clip blocks may run sequence-first; tokens are always stored batch-first (N, T, W).
    if not transformer.batch_first:
        x = x.transpose(0, 1)
    for block in transformer.resblocks[start:stop]:
        x = block(x)
    if not transformer.batch_first:
        x = x.transpose(0, 1)
    return x


def encode_tokens_tail(visual: torch.nn.Module, tokens: torch.Tensor,
                       start_block: int) -> torch.Tensor:
    """Finish the image tower from cached tokens.

    Runs blocks ``start_block..n-1``, then pooling + ``ln_post`` (in the order the model's own
    ``_pool`` uses) and the projection, exactly as ``VisionTransformer.forward`` does.

    Parameters
    ----------
    visual : open_clip VisionTransformer
        ``clip.visual``; its tail may be trainable (fine-tuning).
    tokens : Tensor of shape (N, T, W)
        Residual stream after ``start_block`` blocks (e.g. the store's ``tokens``).
    start_block : int
        The store's ``token_layer``.

    Returns
    -------
    Tensor of shape (N, D)
        Image embeddings, un-normalized (as ``clip.encode_image``).
    """
    tower = _vision_transformer(visual)
    check_tokens_layer(tower, start_block)
    weight_dtype = tower.conv1.weight.dtype
    if tokens.dtype != weight_dtype and not torch.is_autocast_enabled(tokens.device.type):
        tokens = tokens.to(weight_dtype)
    x = _run_blocks(tower, tokens, start_block, None)
    pooled, _ = tower._pool(x)
    if tower.proj is not None:
        pooled = pooled @ tower.proj
    return pooled


def encode_image_tokens(visual: torch.nn.Module, images: torch.Tensor,
                        layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass giving both the embeddings and the tokens after ``layer`` blocks.

    Returns
    -------
    embeddings : Tensor of shape (N, D)
        Identical to ``clip.encode_image(images)`` (same operations, same order).
    tokens : Tensor of shape (N, T, W)
    """
    tower = _vision_transformer(visual)
    check_tokens_layer(tower, layer)
    tokens = _run_blocks(tower, tower._embeds(images), 0, layer)
    return encode_tokens_tail(tower, tokens, layer), tokens
