"""Zarr feature stores: schema, create/open/append, resume, verify, import."""

from npos.store.feature_store import (DEFAULT_CHUNK_ROWS, IDENTITY_KEYS, SCHEMA, FeatureStore,
                                      store_exists)
from npos.store.importing import import_embeddings, load_embedding_source

__all__ = ["DEFAULT_CHUNK_ROWS", "IDENTITY_KEYS", "SCHEMA", "FeatureStore", "store_exists",
           "import_embeddings", "load_embedding_source"]
