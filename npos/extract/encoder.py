"""Old import path of the encoder code, kept so existing code keeps working.

The encoder lives in :mod:`npos.encoder` (loading, autocast policy, ViT split); new code
imports it from there. ``open_clip`` and ``resolve_device`` stay reachable here as before.
"""

import open_clip  # noqa: F401 - tests patch ``enc.open_clip.create_model`` through this path

from npos.device import resolve_device  # noqa: F401
from npos.encoder.loading import (DEFAULT_SEED, HF_HUB_PREFIX, MODEL_CONFIG_DIR,  # noqa: F401
                                  TINY_MODEL, Weights, WeightsUnavailableError, create_encoder,
                                  file_sha256, image_preprocess_config, image_transform,
                                  load_encoder, register_model_configs, resolve_weights)
from npos.encoder.precision import autocast, autocast_dtype  # noqa: F401
from npos.encoder.vit import (check_tokens_layer, encode_image_tokens,  # noqa: F401
                              encode_tokens_tail, num_blocks)
