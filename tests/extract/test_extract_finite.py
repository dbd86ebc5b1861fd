"""Extraction refuses to write non-finite values: embeddings, tokens and text embeddings."""

from __future__ import annotations

import numpy as np
import pytest

from npos.errors import StoreError
from npos.extract import extract_features, extraction


def _chunk(n=4, tokens=True):
    arrays = {"embeddings": np.ones((n, 8), np.float32), "valid": np.ones(n, bool)}
    if tokens:
        arrays["tokens"] = np.ones((n, 5, 6), np.float16)
    return arrays


def test_chunk_check_refuses_non_finite_tokens_of_valid_rows():
    arrays = _chunk()
    arrays["tokens"][2, 3, 1] = np.inf
    with pytest.raises(StoreError, match=r"1 non-finite token rows in chunk 7"):
        extraction._check_finite(7, arrays)
    arrays["valid"][2] = False  # a failed image's row is NaN by design: not an error
    extraction._check_finite(7, arrays)


def test_chunk_check_still_refuses_non_finite_embeddings():
    arrays = _chunk(tokens=False)
    arrays["embeddings"] = arrays["embeddings"].astype(np.float16)
    arrays["embeddings"][[0, 3], 0] = np.nan
    with pytest.raises(StoreError, match=r"2 non-finite embeddings in chunk 0 \(float16"):
        extraction._check_finite(0, arrays)


def test_text_embedding_check():
    text = np.eye(3, 4, dtype=np.float32)
    assert extraction._checked_text_embeddings(text) is text
    text[1, 2] = np.nan
    with pytest.raises(StoreError, match="non-finite embeddings for 1 of 3 classes"):
        extraction._checked_text_embeddings(text)


def test_extract_refuses_overflowing_tokens(image_folder, tmp_path, tiny):
    real = extraction.encode_image_tokens

    def overflowing(visual, images, layer):
        emb, tok = real(visual, images, layer)
        return emb, tok * 1e6  # beyond float16's 65504: inf once stored as float16

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(extraction, "encode_image_tokens", overflowing)
        with pytest.raises(StoreError, match="non-finite token rows"):
            extract_features(image_folder, str(tmp_path / "s"), tokens_layer=2, chunk_rows=8,
                             **tiny)


def test_extract_refuses_non_finite_text_embeddings(image_folder, tmp_path, tiny, monkeypatch):
    def broken(*args, **kwargs):
        text = np.ones((3, 32), np.float32)
        text[0, 0] = np.nan
        return text

    monkeypatch.setattr(extraction, "text_embeddings", broken)
    with pytest.raises(StoreError, match="text encoder produced non-finite"):
        extract_features(image_folder, str(tmp_path / "s"), chunk_rows=8, **tiny)
