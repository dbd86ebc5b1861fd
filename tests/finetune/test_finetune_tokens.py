"""Streaming tokens out of a store: coverage, shuffling, bounded reads, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from npos.errors import IncompatibleStoreError, ParameterError, StoreError
from npos.finetune import TokenStream, check_same_tokens, iter_token_blocks, token_spec
from npos.store import FeatureStore


def _rows_of(stream_batches, store):
    """Map streamed token rows back to store rows (tokens are unique per image)."""
    tokens = np.asarray(store.array("tokens")[:])
    flat = {tokens[i].tobytes(): i for i in range(tokens.shape[0])}
    rows, labels = [], []
    for t, y in stream_batches:
        rows.extend(flat[row.numpy().tobytes()] for row in t)
        labels.extend(y.tolist())
    return np.array(rows), np.array(labels)


def test_stream_visits_every_labeled_row_once_in_a_seeded_shuffled_order(token_stores):
    store = FeatureStore.open(token_stores["train"])
    stream = TokenStream(store, batch_size=10, window_rows=20)
    assert stream.n_rows == 72 and stream.steps_per_epoch == 8
    assert stream.block_rows == 16 and stream.blocks_per_window == 2

    batches = list(stream.epoch(torch.Generator().manual_seed(0)))
    assert [b[0].shape[0] for b in batches] == [10] * 7 + [2]
    assert all(t.dtype == torch.float16 and t.shape[1:] == (17, 64) for t, _ in batches)
    rows, labels = _rows_of(batches, store)
    assert sorted(rows) == list(range(72))
    np.testing.assert_array_equal(labels, store.array("labels")[:][rows])
    assert not np.array_equal(rows, np.arange(72))

    again = _rows_of(stream.epoch(torch.Generator().manual_seed(0)), store)[0]
    other = _rows_of(stream.epoch(torch.Generator().manual_seed(1)), store)[0]
    np.testing.assert_array_equal(rows, again)
    assert not np.array_equal(rows, other)


def test_stream_skips_unreadable_and_unlabeled_rows(token_stores):
    store = FeatureStore.open(token_stores["test"])       # one unreadable file
    valid = np.asarray(store.array("valid")[:])
    assert (~valid).sum() == 1
    stream = TokenStream(store, batch_size=7)
    rows, _ = _rows_of(stream.epoch(torch.Generator().manual_seed(0)), store)
    assert sorted(rows) == list(np.flatnonzero(valid))
    unlabeled = FeatureStore.open(token_stores["ood"])
    assert TokenStream(unlabeled, batch_size=4).n_rows == 0


def test_stream_reads_tokens_block_by_block(token_stores, monkeypatch):
    store = FeatureStore.open(token_stores["train"])
    real = store.array("tokens")
    sizes = []

    class Recording:
        chunks = real.chunks
        shape = real.shape

        def __getitem__(self, key):
            out = real[key]
            sizes.append(out.shape[0])
            return out

    original = store.array
    monkeypatch.setattr(store, "array",
                        lambda name: Recording() if name == "tokens" else original(name))
    stream = TokenStream(store, batch_size=8, window_rows=16)
    list(stream.epoch(torch.Generator().manual_seed(0)))
    assert sizes and max(sizes) <= stream.block_rows
    assert sum(sizes) == 72
    list(iter_token_blocks(store, range(store.n_chunks)))
    assert max(sizes) <= stream.block_rows


def test_iter_token_blocks_covers_the_chunks_in_order(token_stores):
    store = FeatureStore.open(token_stores["test"])
    tokens = store.array("tokens")[:]
    seen = list(iter_token_blocks(store, [1, 0]))
    assert [(i, r.start, r.stop) for i, r, _ in seen] == [(1, 16, 25), (0, 0, 16)]
    for _, rows, block in seen:
        np.testing.assert_array_equal(block, tokens[rows])


def test_stream_errors_propagate_from_the_reader_thread(token_stores, monkeypatch):
    store = FeatureStore.open(token_stores["train"])
    stream = TokenStream(store, batch_size=8)

    class Broken:
        def __getitem__(self, key):
            raise OSError("disk gone")

    stream._tokens = Broken()
    with pytest.raises(OSError, match="disk gone"):
        list(stream.epoch(torch.Generator().manual_seed(0)))


def test_store_without_tokens_is_a_clear_error(tmp_path, make_store, rng):
    plain = make_store(tmp_path / "plain.zarr", rng.normal(size=(10, 4)), np.arange(10) % 2)
    with pytest.raises(StoreError, match=r"has no tokens; extract it with --tokens-layer L"):
        token_spec(plain, what="training store")
    with pytest.raises(StoreError, match="has no tokens"):
        TokenStream(plain, batch_size=4)


def test_tokens_of_another_layer_are_refused(token_stores):
    spec = token_spec(FeatureStore.open(token_stores["ood"]))
    other = token_spec(FeatureStore.open(token_stores["ood_layer2"]))
    assert (spec.layer, other.layer) == (1, 2)
    with pytest.raises(IncompatibleStoreError,
                       match=r"another encoder or layer than the reference: its token_layer is 2 "
                             r"there but 1"):
        check_same_tokens(spec, other, what="x", reference="the reference")
    check_same_tokens(spec, token_spec(FeatureStore.open(token_stores["train"])), what="x",
                      reference="y")


def test_stream_parameters_are_validated(token_stores):
    store = FeatureStore.open(token_stores["train"])
    with pytest.raises(ParameterError, match="batch_size must be an int >= 1; got 0"):
        TokenStream(store, batch_size=0)
    with pytest.raises(ParameterError, match="window_rows must be an int >= 1"):
        TokenStream(store, batch_size=4, window_rows=0)
