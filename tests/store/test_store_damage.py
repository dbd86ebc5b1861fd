"""Store-level checks: an outliers store's lost chunks, every verify check, store kinds, and
dimension names readable by xarray."""

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from npos.cli import cli
from npos.errors import StoreError
from npos.store import FeatureStore
from npos.synthesize import SynthesisConfig
from npos.synthesize.offline import synthesize_store, write_outliers

CONFIG = {"k": 3, "select": 4, "pick": 2, "candidates": 6, "keep": 2, "sigma": 0.05}


@pytest.fixture
def features(tmp_path, rng, make_store):
    emb = rng.normal(size=(60, 8)).astype(np.float32)
    labels = np.repeat(np.arange(3), 20)
    return make_store(tmp_path / "f.zarr", emb, labels, chunk_rows=16,
                      text_embeddings=rng.normal(size=(3, 8)))


@pytest.fixture
def outliers(tmp_path, features):
    offline = synthesize_store(features, SynthesisConfig(**CONFIG), queue=10, seed=0)
    return write_outliers(offline, str(tmp_path / "o.zarr"), source=features, chunk_rows=4)


def _unlink_chunk(url: str, name: str, chunk: int) -> None:
    top = Path(url) / name / "c" / str(chunk)
    files = [top] if top.is_file() else [p for p in top.glob("**/*") if p.is_file()]
    assert files
    files[0].unlink()


@pytest.mark.parametrize("name", ["embeddings", "labels", "ids", "knn_distance"])
def test_outliers_store_lost_chunk_named_and_refused(outliers, name):
    assert outliers.verify() == [] and outliers.n_chunks == 3
    _unlink_chunk(outliers.url, name, 1)
    result = CliRunner().invoke(cli, ["store", "verify", outliers.url])
    assert result.exit_code == 1
    assert (f"problem: array {name!r} lost the files of 1 done chunk(s): chunk 1 (rows 4..7)"
            in result.output)
    assert "npos synthesize ... --overwrite" in result.output
    store = FeatureStore.open(outliers.url)
    for read in (lambda: store.read(name), lambda: store.array(name),
                 lambda: list(store.iter_batches(3, names=(name,)))):
        with pytest.raises(StoreError, match=rf"array {name!r} lost the file of chunk 1 "
                                             r"\(rows 4\.\.7\); re-create it"):
            read()


def test_verify_checks_values_of_every_array(features):
    url = features.url
    with FeatureStore.open(url, mode="r+") as store:
        store.array("labels")[3] = 7            # chunk 0: outside the 3 classes
        store.array("ids")[20] = ""             # chunk 1: empty
        store.array("ids")[40] = "row41"        # chunk 2: a duplicate of row 41
        store.array("embeddings")[50] = np.inf  # chunk 3
        store.add_array("valid", (), "bool", fill_value=True)
        store.add_array("error", (), np.dtypes.StringDType())
        store.array("valid")[5] = False         # failed, but no reason given
        text = store.read_extra("text_embeddings")
        text[1, 2] = np.nan
        store.set_array("text_embeddings", text)
    problems = FeatureStore.open(url).verify()
    assert problems == [
        "1 rows with NaN/Inf embeddings in rows 0..59 (first row 50, chunks 3)",
        "1 labels outside [-1, 3) (first row 3, chunks 0)",
        "1 empty ids (first row 20, chunks 1)",
        "1 duplicate ids (e.g. 'row41' in rows 40 and 41; chunks 2)",
        ("1 rows where 'valid' and 'error' disagree (error must be set exactly on failed "
         "rows) (first row 5, chunks 0)"),
        "text_embeddings has 1 NaN/Inf values",
    ]
    store = FeatureStore.open(url)
    assert store.damaged_chunks() == [0, 1, 2, 3]


def test_lost_text_embeddings_and_row_count_mismatch(features):
    _unlink_chunk(features.url, "text_embeddings", 0)
    assert FeatureStore.open(features.url).verify() == [
        "array 'text_embeddings' lost its chunk file"]
    with pytest.raises(StoreError, match="array 'text_embeddings' lost the file of chunk 0; "
                                         "re-create it"):
        FeatureStore.open(features.url).read_extra("text_embeddings")


def test_arrays_added_later_get_files_for_done_chunks(features):
    with FeatureStore.open(features.url, mode="r+") as store:
        store.add_array("score", (2,), "float32")
    store = FeatureStore.open(features.url)
    assert store.verify() == []
    assert np.isnan(store.read("score")).all() and store.read("score").shape == (60, 2)


# ---------------------------------------------------------------------------- kinds
def test_kinds_are_checked(features, outliers, tmp_path):
    with pytest.raises(StoreError, match=r"'.*o\.zarr' is an outliers store; synthesize "
                                         r"takes a features store$"):
        synthesize_store(outliers.url, SynthesisConfig(**CONFIG), queue=10)
    with pytest.raises(StoreError, match="is an outliers store; expected a features store or "
                                         "a scores store"):
        FeatureStore.open(outliers.url, kinds=("features", "scores"))
    assert FeatureStore.open(features.url, kinds=("features",)).kind == "features"
    result = CliRunner().invoke(cli, ["synthesize", outliers.url, "--stats-only"])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "is an outliers store; synthesize takes a features store" in result.output
    np.save(tmp_path / "e.npy", np.zeros((12, 8), np.float32))
    result = CliRunner().invoke(cli, ["store", "import", "--embeddings",
                                      str(tmp_path / "e.npy"), "--out", outliers.url])
    assert result.exit_code == 2
    assert "is an outliers store; store import takes a features store" in result.output


def test_extract_refuses_to_resume_into_another_kind(outliers, tmp_path):
    from PIL import Image

    from npos.extract import extract_features

    data = tmp_path / "img"
    data.mkdir()
    Image.new("RGB", (20, 20)).save(data / "a.png")
    with pytest.raises(StoreError, match="is an outliers store; extract \\(resuming\\) takes "
                                         "a features store"):
        extract_features(data, outliers.url, model="npos-tiny", workers=0)


# ---------------------------------------------------------------------------- xarray
def test_every_store_opens_with_xarray(features, outliers):
    xr = pytest.importorskip("xarray")
    pytest.importorskip("dask")
    ds = xr.open_zarr(features.url, consolidated=False)
    assert ds["embeddings"].dims == ("row", "dim") and ds["done"].dims == ("chunk",)
    assert ds["text_embeddings"].dims == ("class", "dim")
    np.testing.assert_array_equal(ds["embeddings"].values, features.read())
    assert list(ds["ids"].values[:2]) == ["row0", "row1"]
    ds = xr.open_zarr(outliers.url, consolidated=False)
    assert ds["knn_distance"].dims == ("row",)
    np.testing.assert_array_equal(ds["knn_distance"].values, outliers.read("knn_distance"))
    assert float(ds["embeddings"].sum().compute()) == pytest.approx(
        float(torch.from_numpy(outliers.read()).double().sum()), rel=1e-5)


def test_store_import_rerun_repairs(tmp_path, rng):
    np.save(tmp_path / "e.npy", rng.normal(size=(50, 4)).astype(np.float32))
    np.save(tmp_path / "y.npy", rng.integers(0, 3, 50))
    runner = CliRunner()

    def run(out, *extra):
        return runner.invoke(cli, ["store", "import", "--embeddings", str(tmp_path / "e.npy"),
                                   "--labels", str(tmp_path / "y.npy"), "--out", str(out),
                                   "--chunk-rows", "16", *extra])

    assert run(tmp_path / "clean.zarr").exit_code == 0
    assert run(tmp_path / "s.zarr").exit_code == 0
    _unlink_chunk(str(tmp_path / "s.zarr"), "labels", 2)
    with pytest.raises(StoreError, match=r"lost the file of chunk 2 \(rows 32\.\.47\); re-run "
                                         r"'npos store import \.\.\. --out"):
        FeatureStore.open(str(tmp_path / "s.zarr")).read("labels")
    assert run(tmp_path / "s.zarr").exit_code == 0
    repaired, clean = (FeatureStore.open(str(tmp_path / n)) for n in ("s.zarr", "clean.zarr"))
    assert repaired.verify() == []
    for name in ("embeddings", "labels", "ids"):
        np.testing.assert_array_equal(repaired.read(name), clean.read(name))
    result = run(tmp_path / "s.zarr")
    assert result.exit_code == 2 and "already exists" in result.output  # healthy: refused


def test_every_stage_refuses_an_outliers_store_as_features(outliers, tmp_path):
    """train-head, finetune, evaluate and score state the kinds they take, in one line."""
    o = outliers.url
    cases = {
        "train-head": ["train-head", o, "--out", str(tmp_path / "h")],
        "finetune": ["finetune", o, "--model", "npos-tiny", "--out", str(tmp_path / "f")],
        "evaluate": ["evaluate", "--id", o, "--ood", f"x={o}", "--out", str(tmp_path / "r")],
    }
    for what, args in cases.items():
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2, (what, result.output)
        assert result.output.strip().splitlines()[-1].endswith(
            f"is an outliers store; {what} takes a features store"), (what, result.output)
        assert not (tmp_path / "h").exists() and not (tmp_path / "r").exists()
