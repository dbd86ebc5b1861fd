"""Zarr feature stores: schema, create/open/append, resume, verify, locks, import."""

from npos.store.feature_store import (DEFAULT_CHUNK_ROWS, DIMENSION_NAMES, IDENTITY_KEYS, KINDS,
                                      SCHEMA, FeatureStore, store_exists)
from npos.store.identity import UNKNOWN_MODEL, check_fingerprints, is_unknown
from npos.store.importing import import_embeddings, load_embedding_source
from npos.store.lock import WriterLock, lock_path
from npos.store.verify import Problem, find_problems

__all__ = ["DEFAULT_CHUNK_ROWS", "DIMENSION_NAMES", "IDENTITY_KEYS", "KINDS", "SCHEMA",
           "UNKNOWN_MODEL", "FeatureStore", "Problem", "WriterLock", "check_fingerprints",
           "find_problems", "import_embeddings", "is_unknown", "load_embedding_source",
           "lock_path", "store_exists"]
