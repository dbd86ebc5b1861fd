"""Extraction asks the autocast policy with the store's dtype (see npos.encoder.precision)."""

import contextlib

import pytest

import npos.extract.extraction as extraction
from npos.extract import extract_features


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_extraction_autocasts_for_the_store_dtype(monkeypatch, image_folder, tmp_path, tiny,
                                                  dtype):
    asked = []

    def recording_autocast(device, store_dtype=None):
        asked.append((device.type, str(store_dtype)))
        return contextlib.nullcontext()

    monkeypatch.setattr(extraction, "autocast", recording_autocast)
    store = extract_features(image_folder, str(tmp_path / "s"), chunk_rows=8,
                             **{**tiny, "dtype": dtype})
    assert str(store.array("embeddings").dtype) == dtype
    assert asked and set(asked) == {("cpu", dtype)}
