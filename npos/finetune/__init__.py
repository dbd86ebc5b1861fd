"""Fine-tuning of the encoder's last blocks from cached tokens (``npos finetune``).

Modules: :mod:`~npos.finetune.tail` (:class:`VisionTail`, tail files),
:mod:`~npos.finetune.tokens` (streaming tokens out of a store),
:mod:`~npos.finetune.config` (:class:`FinetuneConfig`, output names),
:mod:`~npos.finetune.training` (:func:`finetune`, the stage: the tail and its batch source
handed to :class:`npos.train_head.trainer.Trainer`),
:mod:`~npos.finetune.embedding` (re-embedding token stores with a tuned tail).

>>> from npos.finetune import finetune, load_tail          # doctest: +SKIP
>>> result = finetune("train.zarr", "runs/ft", model="ViT-B-16", pretrained="openai",
...                   embed={"test": "test.zarr", "sun": "sun.zarr"})
>>> tail, description = load_tail("runs/ft")               # (N, T, W) tokens -> (N, D)
"""

from npos.finetune.config import FinetuneConfig, FinetuneResult, parse_embed_specs
from npos.finetune.embedding import embed_store, embedded_attrs
from npos.finetune.tail import (TailError, VisionTail, load_tail, load_tail_weights,
                                read_tail_config, save_tail, tuned_pretrained)
from npos.finetune.tokens import (TokenSpec, TokenStream, check_same_tokens, iter_token_blocks,
                                  token_spec)
from npos.finetune.training import finetune
from npos.train_head.data import build_head

__all__ = [
    "FinetuneConfig", "FinetuneResult", "TailError", "TokenSpec", "TokenStream", "VisionTail",
    "build_head", "check_same_tokens", "embed_store", "embedded_attrs", "finetune",
    "iter_token_blocks", "load_tail", "load_tail_weights", "parse_embed_specs",
    "read_tail_config", "save_tail", "token_spec", "tuned_pretrained",
]
