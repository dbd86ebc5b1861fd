"""The encoder: open_clip loading (weights identity, seeded creation, preprocessing), npos's
model-config registry (``npos-tiny``), the autocast policy of encoder inference, and the split
of a ViT at block L (cached tokens and the tail that finishes them).

Used by extraction (:mod:`npos.extract`) and fine-tuning (:mod:`npos.finetune`), which do not
import each other. Importing this package registers npos's model configs with open_clip.

Modules: :mod:`~npos.encoder.loading`, :mod:`~npos.encoder.precision`,
:mod:`~npos.encoder.vit`.
"""

from npos.encoder.loading import (DEFAULT_SEED, HF_HUB_PREFIX, MODEL_CONFIG_DIR, TINY_MODEL,
                                  Weights, WeightsUnavailableError, create_encoder, file_sha256,
                                  image_preprocess_config, image_transform, load_encoder,
                                  register_model_configs, resolve_weights)
from npos.encoder.precision import autocast, autocast_dtype
from npos.encoder.vit import (check_tokens_layer, encode_image_tokens, encode_tokens_tail,
                              num_blocks)

__all__ = [
    "DEFAULT_SEED", "HF_HUB_PREFIX", "MODEL_CONFIG_DIR", "TINY_MODEL", "Weights",
    "WeightsUnavailableError", "autocast", "autocast_dtype", "check_tokens_layer",
    "create_encoder", "encode_image_tokens", "encode_tokens_tail", "file_sha256",
    "image_preprocess_config", "image_transform", "load_encoder", "num_blocks",
    "register_model_configs", "resolve_weights",
]
