import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from npos.cli import cli
from npos.errors import IncompatibleStoreError, ParameterError, StoreExistsError
from npos.extract import (DataError, FeatureExtractor, ImageDecodeError, decode_image,
                          encode_tokens_tail, extract_features, load_encoder, text_embeddings)
from npos.extract.text import DEFAULT_TEMPLATES
from npos.store import FeatureStore


def _reference_embeddings(root, ids):
    """encode_image of the open_clip preprocessing of each image, one at a time."""
    model, preprocess, _ = load_encoder("npos-tiny")
    images = torch.stack([preprocess(decode_image(str(root / i))) for i in ids])
    with torch.no_grad():
        return model.encode_image(images).numpy()


def test_store_matches_encode_image_and_records_bad_files(messy_folder, tmp_path, tiny):
    root, odd, bad = messy_folder
    extractor = FeatureExtractor(chunk_rows=8, batch_size=3, **tiny).run(root, tmp_path / "s")
    store = extractor.store_
    ids = store.array("ids")[:].tolist()
    assert ids == sorted(ids) and len(ids) == 12 + len(odd) + len(bad)
    assert store.is_complete and store.class_names == ["cat", "dog", "fox"]
    labels = store.array("labels")[:]
    assert [store.class_names[label] for label in labels] == [i.split("/")[0] for i in ids]

    valid = store.array("valid")[:]
    assert sorted(np.array(ids)[~valid].tolist()) == sorted(bad)
    failed = {f["id"]: f["reason"] for f in store.attrs["failed"]}
    assert failed.keys() == bad.keys()
    assert all(failed[k].startswith(v) for k, v in bad.items())
    emb = store.array("embeddings")[:]
    assert np.isnan(emb[~valid]).all()

    good = [i for i, v in zip(ids, valid) if v]
    np.testing.assert_allclose(emb[valid], _reference_embeddings(root, good), atol=1e-5,
                               rtol=1e-5)
    assert extractor.stats_.rows == len(ids) and extractor.stats_.failed == len(bad)
    assert extractor.stats_.store_failed == len(bad)
    assert store.read("embeddings").shape == (len(good), 32)  # readers skip invalid rows


def test_text_embeddings_and_attributes(base_store):
    root, url = base_store
    store = FeatureStore.open(url)
    text = store.read_extra("text_embeddings")
    assert text.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, atol=1e-6)
    model, _, tokenizer = load_encoder("npos-tiny")
    np.testing.assert_allclose(text, text_embeddings(model, tokenizer, ["cat", "dog", "fox"]),
                               atol=1e-6)
    attrs = store.attrs
    assert attrs["model"] == "npos-tiny" and attrs["pretrained"] == "none"
    assert attrs["seed"] == 0 and attrs["token_layer"] is None
    assert attrs["templates"] == list(DEFAULT_TEMPLATES)
    assert attrs["preprocess"]["size"] == [32, 32]
    assert attrs["preprocess"]["interpolation"] == "bicubic"
    assert len(attrs["preprocess"]["mean"]) == 3 and len(attrs["preprocess"]["std"]) == 3
    assert attrs["source"]["root"] == str(root) and attrs["source"]["files"] == 18
    assert attrs["source"]["fingerprint"].startswith("sha256:")
    assert attrs["failed"] == []
    assert store.verify() == []


def test_float16_storage(base_store, tmp_path, tiny):
    root, url = base_store
    s16 = extract_features(root, str(tmp_path / "b"), chunk_rows=8,
                           **{**tiny, "dtype": "float16"})
    assert s16.array("embeddings").dtype == np.float16
    np.testing.assert_allclose(s16.read("embeddings", dtype="float32"),
                               FeatureStore.open(url).read("embeddings"), rtol=2e-3, atol=2e-3)


def test_tokens_layer_reproduces_embeddings(image_folder, tmp_path, tiny):
    store = extract_features(image_folder, str(tmp_path / "s"), tokens_layer=2, chunk_rows=8,
                             batch_size=4, **tiny)
    tokens = store.array("tokens")
    assert tokens.shape == (18, 17, 64) and tokens.dtype == np.float16
    assert 8 % tokens.chunks[0] == 0
    assert store.attrs["token_layer"] == 2
    model, _, _ = load_encoder("npos-tiny")
    with torch.no_grad():
        tail = encode_tokens_tail(model.visual, torch.from_numpy(tokens[:]), 2).numpy()
    np.testing.assert_allclose(tail, store.array("embeddings")[:], atol=2e-2, rtol=2e-2)
    # The embeddings themselves are the full-precision forward pass, not the tail of fp16.
    np.testing.assert_allclose(store.array("embeddings")[:],
                               _reference_embeddings(image_folder, store.array("ids")[:]),
                               atol=1e-5, rtol=1e-5)


def test_resume_fills_only_missing_chunks(base_store, tmp_path, tiny, same_store):
    root, url = base_store
    shutil.copytree(url, tmp_path / "part")
    part = FeatureStore.open(str(tmp_path / "part"), mode="r+")
    part.array("done")[1] = False
    part.array("embeddings")[8:16] = np.nan  # an interrupted write
    extractor = FeatureExtractor(chunk_rows=8, **tiny).run(root, str(tmp_path / "part"))
    assert extractor.stats_.rows == 8 and extractor.stats_.chunks == 1
    same_store(extractor.store_, FeatureStore.open(url))
    again = FeatureExtractor(chunk_rows=8, **tiny).run(root, str(tmp_path / "part"))
    assert again.stats_.rows == 0


def test_resume_refuses_a_different_run(base_store, tmp_path, tiny):
    root, url = base_store
    shutil.copytree(url, tmp_path / "s")
    out = str(tmp_path / "s")
    for change, key in [({"seed": 1}, "seed"), ({"dtype": "float16"}, "dtype"),
                        ({"tokens_layer": 1}, "token_layer")]:
        with pytest.raises(IncompatibleStoreError, match=f"cannot resume into .*{key}"):
            extract_features(root, out, **{**tiny, "chunk_rows": 8, **change})
    # The same files in another place, and then one file renamed: another source.
    shutil.copytree(root, tmp_path / "data")
    with pytest.raises(IncompatibleStoreError, match="cannot resume into .*source"):
        extract_features(tmp_path / "data", out, chunk_rows=8, **tiny)
    (tmp_path / "data/cat/img000.jpg").rename(tmp_path / "data/cat/renamed.jpg")
    store = extract_features(tmp_path / "data", out, chunk_rows=8, overwrite=True, **tiny)
    assert "cat/renamed.jpg" in store.array("ids")[:].tolist() and store.is_complete


def test_refuses_to_replace_a_folder_that_is_not_a_store(image_folder, tmp_path, tiny):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    for overwrite in (False, True):
        with pytest.raises(StoreExistsError, match="is not a feature store"):
            extract_features(image_folder, str(precious), overwrite=overwrite, **tiny)
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_on_error_fail_stops_at_the_first_bad_file(messy_folder, tmp_path, tiny):
    root, _, _ = messy_folder
    with pytest.raises(ImageDecodeError, match=r"cannot read image '.*fox/bomb.png'"):
        extract_features(root, str(tmp_path / "s"), on_error="fail", **tiny)


def test_unlabeled_input_and_file_lists(image_folder, tmp_path, tiny):
    store = extract_features(image_folder, str(tmp_path / "u"), unlabeled=True, **tiny)
    assert (store.array("labels")[:] == -1).all() and store.class_names is None
    assert not store.has("text_embeddings")
    with pytest.raises(ParameterError, match="input is unlabeled"):
        extract_features(image_folder, str(tmp_path / "v"), unlabeled=True,
                         class_names="imagenet", **tiny)

    lines = ["fox/img001.png\tfox", "cat/img000.jpg\tcat", "missing.jpg\tcat"]
    (image_folder / "list.txt").write_text("\n".join(lines) + "\n")
    store = extract_features(image_folder / "list.txt", str(tmp_path / "l"), **tiny)
    assert store.array("ids")[:].tolist() == ["fox/img001.png", "cat/img000.jpg", "missing.jpg"]
    assert store.class_names == ["cat", "fox"]
    assert store.array("labels")[:].tolist() == [1, 0, 0]
    assert store.attrs["failed"] == [{"id": "missing.jpg", "reason": "file not found"}]
    np.testing.assert_allclose(
        store.array("embeddings")[:2],
        _reference_embeddings(image_folder, ["fox/img001.png", "cat/img000.jpg"]), atol=1e-5)


def test_class_names_maps_folders_to_prompt_names(tmp_path, folder_factory, tiny):
    root = folder_factory(tmp_path / "wnid", per_class=2, classes=("n01443537", "n01440764"))
    store = extract_features(root, str(tmp_path / "s"), class_names="imagenet", **tiny)
    assert store.class_names == ["tench", "goldfish"]  # sorted wnids: n01440764 first
    model, _, tokenizer = load_encoder("npos-tiny")
    np.testing.assert_allclose(store.read_extra("text_embeddings"),
                               text_embeddings(model, tokenizer, ["tench", "goldfish"]),
                               atol=1e-6)
    (tmp_path / "names.txt").write_text("n01440764\ta tench fish\n")
    with pytest.raises(DataError, match="no name for class 'n01443537'"):
        extract_features(root, str(tmp_path / "t"), class_names=tmp_path / "names.txt", **tiny)


def test_parameters_validated_before_any_work(image_folder, tmp_path, tiny):
    out = tmp_path / "never"
    for bad, match in [({"batch_size": 0}, "'batch_size' parameter of extract must be an int"),
                       ({"dtype": "int8"}, "'dtype' parameter"),
                       ({"on_error": "ignore"}, "'on_error' parameter"),
                       ({"tokens_layer": 7}, r"tokens_layer must be an int in \[0, 3\]")]:
        with pytest.raises(ParameterError, match=match):
            extract_features(image_folder, str(out), **{**tiny, **bad})
    assert not out.exists()
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="no images"):
        extract_features(tmp_path / "nothing", str(out), **tiny)
    assert not out.exists()


def test_cli_extract(messy_folder, tmp_path):
    root, _, bad = messy_folder
    runner = CliRunner()
    args = ["extract", str(root), "--out", str(tmp_path / "s"), "--model", "npos-tiny",
            "--workers", "1", "--batch-size", "4", "--chunk-rows", "8", "--max-failed", "0.3"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    line = result.output.strip().splitlines()[-1]
    assert f"24 rows x 32 (float16), {len(bad)} failed" in line
    assert "rows encoded" in line and "images/s" in line
    result = runner.invoke(cli, args)
    assert result.exit_code == 0 and "nothing left to encode" in result.output
    result = runner.invoke(cli, [*args, "--seed", "2"])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "seed=0" in result.output
    result = runner.invoke(cli, [*args[:4], "--model", "ViT-B-32", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "say which weights" in result.output
    result = runner.invoke(cli, [*args, "--on-error", "fail", "--overwrite"])
    assert result.exit_code == 2 and "cannot read image" in result.output


def test_token_chunks_divide_store_chunks():
    from npos.extract.extraction import _token_chunk_rows

    assert _token_chunk_rows(4096, 197 * 768 * 2) == 128  # ViT-B/16: 39 MB per token chunk
    assert _token_chunk_rows(1000, 8) == 1000
    assert _token_chunk_rows(7, 10**9) == 1
