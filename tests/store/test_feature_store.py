import uuid

import numpy as np
import pytest
import torch

from npos.errors import (IncompatibleStoreError, ParameterError, StoreError, StoreExistsError,
                         StoreNotFoundError)
from npos.store import FeatureStore, import_embeddings


def _create(url, n=200, d=8, **kw):
    kw.setdefault("attrs", {"model": "m", "pretrained": None, "preprocess": {"size": 32}})
    return FeatureStore.create(str(url), n_rows=n, dim=d, chunk_rows=kw.pop("chunk_rows", 64),
                               **kw)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_both_dtypes(tmp_path, rng, make_store, dtype):
    emb = rng.normal(size=(150, 8)).astype(np.float32)
    labels = rng.integers(0, 3, 150)
    make_store(tmp_path / "s.zarr", emb, labels, dtype=dtype, chunk_rows=64)
    store = FeatureStore.open(str(tmp_path / "s.zarr"))
    assert store.dtype == dtype and store.n_chunks == 3 and store.is_complete
    got = store.read("embeddings")
    assert got.dtype == np.dtype(dtype)
    tol = 1e-3 if dtype == "float16" else 0
    np.testing.assert_allclose(got.astype(np.float32), emb, rtol=tol, atol=tol)
    np.testing.assert_array_equal(store.read("labels"), labels)
    assert list(store.read("ids")[:3]) == ["row0", "row1", "row2"]
    t = store.read("embeddings", as_torch=True, dtype="float32")
    assert isinstance(t, torch.Tensor) and t.shape == (150, 8) and t.dtype == torch.float32
    assert store.class_names == ["class0", "class1", "class2"]


def test_batches_cover_every_row_once(tmp_path, rng, make_store):
    emb = rng.normal(size=(301, 4)).astype(np.float32)
    make_store(tmp_path / "s.zarr", emb, chunk_rows=50)
    store = FeatureStore.open(str(tmp_path / "s.zarr"))
    rows, parts = [], []
    for batch in store.iter_batches(37, names=("embeddings", "ids")):
        assert len(batch["ids"]) == len(batch["embeddings"]) == len(batch["row"])
        rows.append(batch["row"])
        parts.append(batch["embeddings"])
    np.testing.assert_array_equal(np.concatenate(rows), np.arange(301))
    np.testing.assert_array_equal(np.concatenate(parts), emb)
    batches = list(store.iter_batches(100, as_torch=True))
    assert isinstance(batches[0]["embeddings"], torch.Tensor)
    assert sum(len(b["row"]) for b in batches) == 301


def test_chunk_written_but_not_done_is_missing(tmp_path, rng):
    store = _create(tmp_path / "s.zarr")
    emb = rng.normal(size=(200, 8)).astype(np.float32)
    for i in (0, 1, 3):
        store.write_chunk(i, embeddings=emb[store.chunk_slice(i)])
    # chunk 2's rows are written directly, without the done flag: a killed writer
    store.array("embeddings")[store.chunk_slice(2)] = emb[store.chunk_slice(2)]
    assert store.missing_chunks() == [2]
    problems = store.verify()
    assert len(problems) == 1 and "1/4 chunks not done: 2" in problems[0]
    with pytest.raises(StoreError, match="incomplete: 3/4 chunks done"):
        store.read()
    partial = store.read(complete=False)
    assert partial.shape == (200 - 64, 8)


def test_nan_rows_and_deleted_chunk_file_detected(tmp_path, rng, make_store):
    emb = rng.normal(size=(128, 4)).astype(np.float32)
    emb[70, 2] = np.nan
    emb[71, 0] = np.inf
    make_store(tmp_path / "s.zarr", emb, chunk_rows=32)
    store = FeatureStore.open(str(tmp_path / "s.zarr"))
    problems = store.verify()
    assert len(problems) == 1 and "2 rows with NaN/Inf" in problems[0]
    assert "first row 70" in problems[0]
    # A deleted chunk file is found by listing the store (and reads back as NaN).
    (tmp_path / "s.zarr" / "embeddings" / "c" / "0" / "0").unlink()
    problems = FeatureStore.open(str(tmp_path / "s.zarr")).verify()
    assert len(problems) == 2
    assert problems[0] == ("array 'embeddings' lost the files of 1 done chunk(s): chunk 0 "
                           "(rows 0..31)")
    assert "34 rows with NaN/Inf" in problems[1] and "first row 0, chunks 0, 2" in problems[1]


def test_invalid_rows_are_skipped_by_readers_and_verify(tmp_path, rng):
    store = _create(tmp_path / "s.zarr", n=64, chunk_rows=64)
    store.add_array("valid", (), "bool", fill_value=True)
    emb = rng.normal(size=(64, 8)).astype(np.float32)
    emb[5] = np.nan
    valid = np.ones(64, bool)
    valid[5] = False
    store.write_chunk(0, embeddings=emb, valid=valid)
    assert store.verify() == []
    assert store.read().shape == (63, 8)


def test_existing_store_refused_then_overwritten(tmp_path):
    _create(tmp_path / "s.zarr")
    with pytest.raises(StoreExistsError, match="already exists; pass --overwrite"):
        _create(tmp_path / "s.zarr")
    store = _create(tmp_path / "s.zarr", d=4, overwrite=True)
    assert store.dim == 4 and store.missing_chunks() == [0, 1, 2, 3]


@pytest.mark.parametrize("change,key", [
    ({"attrs": {"model": "other", "pretrained": None, "preprocess": {"size": 32}}}, "model"),
    ({"attrs": {"model": "m", "pretrained": None, "preprocess": {"size": 64}}}, "preprocess"),
    ({"d": 16}, "dim"),
    ({"dtype": "float32"}, "dtype"),
])
def test_resume_refuses_mismatched_attributes(tmp_path, change, key):
    _create(tmp_path / "s.zarr")
    with pytest.raises(IncompatibleStoreError, match=f"cannot resume.*{key}="):
        _create(tmp_path / "s.zarr", resume=True, **change)


def test_resume_reopens_compatible_store(tmp_path, rng):
    store = _create(tmp_path / "s.zarr")
    store.write_chunk(0, embeddings=np.zeros((64, 8)))
    again = _create(tmp_path / "s.zarr", resume=True)
    assert again.writable and again.missing_chunks() == [1, 2, 3]


def test_memory_url_store(rng, make_store):
    url = f"memory://npos-test-{uuid.uuid4().hex}/s.zarr"
    emb = rng.normal(size=(100, 6)).astype(np.float32)
    make_store(url, emb, rng.integers(0, 2, 100), chunk_rows=40)
    store = FeatureStore.open(url)
    np.testing.assert_allclose(store.read(), emb)
    assert store.verify() == []


def test_open_errors(tmp_path):
    with pytest.raises(StoreNotFoundError, match="no feature store at"):
        FeatureStore.open(str(tmp_path / "missing.zarr"))
    import zarr

    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(StoreError, match="is not an npos store"):
        FeatureStore.open(str(tmp_path / "plain.zarr"))
    ro = _create(tmp_path / "s.zarr")
    ro = FeatureStore.open(str(tmp_path / "s.zarr"))
    with pytest.raises(StoreError, match="read-only"):
        ro.write_chunk(0, embeddings=np.zeros((64, 8)))


def test_parameter_validation(tmp_path):
    with pytest.raises(ParameterError, match="dtype must be one of"):
        _create(tmp_path / "a.zarr", dtype="int8")
    with pytest.raises(ParameterError, match="at least one row"):
        _create(tmp_path / "b.zarr", n=0)
    store = _create(tmp_path / "c.zarr")
    with pytest.raises(ParameterError, match="chunk 0 covers 64 rows"):
        store.write_chunk(0, embeddings=np.zeros((10, 8)))
    with pytest.raises(ParameterError, match="must divide"):
        store.add_array("tokens", (4, 2), "float16", chunk_rows=48)


def test_fingerprint_compatibility(tmp_path):
    store = _create(tmp_path / "s.zarr")
    store.check_compatible(store.fingerprint(), what="head")
    with pytest.raises(IncompatibleStoreError, match="head 'h' does not match.*model"):
        store.check_compatible({**store.fingerprint(), "model": "x"}, what="head 'h'")


def test_import_npy_npz_and_shards(tmp_path, rng):
    emb = rng.normal(size=(250, 5)).astype(np.float32)
    labels = rng.integers(-1, 4, 250)
    np.save(tmp_path / "e.npy", emb)
    np.save(tmp_path / "y.npy", labels)
    np.savez(tmp_path / "e.npz", embeddings=emb)
    shards = tmp_path / "img_emb"
    shards.mkdir()
    # natural order: shard 10 comes after shard 2
    for i, (a, b) in enumerate([(0, 50), (50, 100), (100, 250)]):
        np.save(shards / f"img_emb_{[0, 2, 10][i]}.npy", emb[a:b])
    (tmp_path / "ids.txt").write_text("\n".join(f"img{i}.jpg" for i in range(250)) + "\n")
    for src in ("e.npy", "e.npz", "img_emb"):
        out = str(tmp_path / f"{src}.zarr")
        store = import_embeddings(tmp_path / src, out, labels=tmp_path / "y.npy",
                                  ids=tmp_path / "ids.txt", dtype="float32", chunk_rows=64)
        np.testing.assert_array_equal(store.read(), emb)
        np.testing.assert_array_equal(store.read("labels"), labels)
        assert store.read("ids")[249] == "img249.jpg"
        assert store.class_names == ["0", "1", "2", "3"]
        assert store.verify() == []


def test_import_validation(tmp_path, rng):
    np.save(tmp_path / "e.npy", rng.normal(size=(10, 3)))
    np.save(tmp_path / "y.npy", np.arange(9))
    np.save(tmp_path / "t.npy", rng.normal(size=(2, 4)))
    with pytest.raises(ParameterError, match=r"labels must have shape \(10,\)"):
        import_embeddings(tmp_path / "e.npy", str(tmp_path / "a.zarr"), labels=tmp_path / "y.npy")
    with pytest.raises(ParameterError, match=r"text embeddings must have shape \(classes, 3\)"):
        import_embeddings(tmp_path / "e.npy", str(tmp_path / "b.zarr"),
                          text_embeddings=tmp_path / "t.npy")
    with pytest.raises(FileNotFoundError, match="embeddings file not found"):
        import_embeddings(tmp_path / "nope.npy", str(tmp_path / "c.zarr"))
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()


def test_create_never_replaces_foreign_paths(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "keep.jpg").write_bytes(b"x")
    with pytest.raises(StoreExistsError, match="exists and is not a feature store"):
        _create(folder, overwrite=True)
    assert (folder / "keep.jpg").exists()
    import zarr

    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").attrs["x"] = 1
    with pytest.raises(StoreExistsError, match="not an npos store"):
        _create(tmp_path / "other.zarr", overwrite=True)
    assert dict(zarr.open_group(str(tmp_path / "other.zarr"), mode="r").attrs) == {"x": 1}
    (tmp_path / "empty").mkdir()
    assert _create(tmp_path / "empty").n_rows == 200  # an empty folder is fine


def test_string_array_reopened(tmp_path):
    store = _create(tmp_path / "s.zarr")
    store.add_array("error", (), str)
    again = FeatureStore.open(str(tmp_path / "s.zarr"), mode="r+")
    assert again.add_array("error", (), str).shape == (200,)
