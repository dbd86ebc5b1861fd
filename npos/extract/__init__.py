"""Stage one: a frozen open_clip image encoder writes embeddings (and optionally tokens and
zero-shot text embeddings) of an image folder or file list to a Zarr feature store.

The encoder itself (loading, autocast policy, ViT split) lives in :mod:`npos.encoder`; its
names are re-exported here. Importing this package registers npos's model configs
(``npos-tiny``) with open_clip.
"""

from npos.device import resolve_device
from npos.encoder import (DEFAULT_SEED, TINY_MODEL, Weights, WeightsUnavailableError,
                          create_encoder, encode_image_tokens, encode_tokens_tail, file_sha256,
                          image_preprocess_config, image_transform, load_encoder,
                          register_model_configs, resolve_weights)
from npos.extract.datasets import (IMAGE_EXTENSIONS, DataError, ImageDataset, ImageDecodeError,
                                   ImageSource, decode_image, load_image_source,
                                   read_class_names, read_classes_file, readable_class_names)
from npos.extract.extraction import (ExtractionStats, FeatureExtractor, TooManyFailedError,
                                     extract_features)
from npos.extract.text import DEFAULT_TEMPLATES, load_templates, text_embeddings

__all__ = [
    "DEFAULT_SEED", "DEFAULT_TEMPLATES", "IMAGE_EXTENSIONS", "TINY_MODEL", "DataError",
    "ExtractionStats", "FeatureExtractor", "ImageDataset", "ImageDecodeError", "ImageSource",
    "Weights", "WeightsUnavailableError", "create_encoder", "decode_image", "file_sha256",
    "encode_image_tokens", "encode_tokens_tail", "extract_features", "image_preprocess_config",
    "image_transform", "load_encoder", "load_image_source", "load_templates",
    "read_class_names", "read_classes_file", "readable_class_names", "register_model_configs",
    "resolve_device", "resolve_weights", "text_embeddings", "TooManyFailedError",
]
