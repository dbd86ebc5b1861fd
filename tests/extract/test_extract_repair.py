"""The chunk-deletion matrix of a features store: for every array, one lost chunk file is
named by verify (exit 1), refused by every reader, and repaired by re-running extract."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from npos.cli import cli
from npos.errors import StoreError
from npos.extract import FeatureExtractor, TooManyFailedError, extract_features
from npos.store import FeatureStore

#: chunk_rows 8, tokens after block 1: a store with every array an extraction writes.
PARAMS = {"chunk_rows": 8, "batch_size": 4, "tokens_layer": 1}
ROW_ARRAYS = ("embeddings", "labels", "ids", "valid", "error", "tokens")


def _chunk_files(url: str, name: str, chunk: int) -> list[Path]:
    top = Path(url) / name / "c" / str(chunk)  # a file for 1-d arrays, else a folder
    return [top] if top.is_file() else sorted(p for p in top.glob("**/*") if p.is_file())


@pytest.fixture(scope="module")
def clean_store(tmp_path_factory):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "extract_conftest", Path(__file__).with_name("conftest.py"))
    conf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conf)
    base = tmp_path_factory.mktemp("repair")
    root = conf.make_folder(base / "data")
    (root / "dog" / "broken.jpg").write_text("not an image")
    url = str(base / "clean.zarr")
    extract_features(root, url, **PARAMS, **conf.TINY)
    return root, url, conf.TINY


def _damaged_copy(clean_store, tmp_path, name: str) -> str:
    _, url, _ = clean_store
    copy = str(tmp_path / "damaged.zarr")
    shutil.copytree(url, copy)
    chunk = 0 if name == "text_embeddings" else 1
    files = _chunk_files(copy, name, chunk)
    assert files, f"{name} has no chunk file for chunk {chunk}"
    files[0].unlink()
    return copy


def _readers(store: FeatureStore, name: str):
    """Every way a stage reads ``name``."""
    if name == "text_embeddings":
        yield lambda: store.read_extra(name)
        return
    yield lambda: store.array(name)
    yield lambda: store.read(name)
    yield lambda: list(store.iter_batches(5, names=(name,)))
    if name == "valid":
        yield store.readable_rows
        yield lambda: store.read("embeddings")


@pytest.mark.parametrize("name", [*ROW_ARRAYS, "text_embeddings"])
def test_lost_chunk_named_refused_and_repaired(clean_store, tmp_path, name, same_store):
    root, url, tiny = clean_store
    damaged = _damaged_copy(clean_store, tmp_path, name)

    result = CliRunner().invoke(cli, ["store", "verify", damaged])
    assert result.exit_code == 1
    chunk = "its chunk file" if name == "text_embeddings" else "chunk 1 (rows 8..15)"
    assert f"problem: array {name!r} lost " in result.output and chunk in result.output

    store = FeatureStore.open(damaged)
    for read in _readers(store, name):
        with pytest.raises(StoreError, match=rf"{damaged!r} is damaged: array {name!r} lost "
                                             r".*re-run 'npos extract \.\.\. --out .*\(re-run "
                                             r"to repair\)"):
            read()

    rerun = FeatureExtractor(**PARAMS, **tiny).run(root, damaged)
    assert rerun.stats_.repaired == ([] if name == "text_embeddings" else [1])
    assert rerun.stats_.rows == (0 if name == "text_embeddings" else 8)
    same_store(FeatureStore.open(damaged), FeatureStore.open(url))
    assert FeatureStore.open(damaged).verify() == []


def test_lost_done_flag_is_encoded_again(clean_store, tmp_path, same_store):
    root, url, tiny = clean_store
    damaged = _damaged_copy(clean_store, tmp_path, "done")
    result = CliRunner().invoke(cli, ["store", "verify", damaged])
    assert result.exit_code == 1 and "1/3 chunks not done: 1" in result.output
    with pytest.raises(StoreError, match="incomplete: 2/3 chunks done"):
        FeatureStore.open(damaged).read()
    rerun = FeatureExtractor(**PARAMS, **tiny).run(root, damaged)
    assert rerun.stats_.rows == 8
    same_store(FeatureStore.open(damaged), FeatureStore.open(url))


def test_non_finite_values_are_repaired(clean_store, tmp_path, same_store):
    root, url, tiny = clean_store
    copy = str(tmp_path / "nan.zarr")
    shutil.copytree(url, copy)
    with FeatureStore.open(copy, mode="r+") as store:
        store.array("tokens")[17, 0, 0] = np.nan  # a valid row of chunk 2
    problems = FeatureStore.open(copy).verify()
    assert problems == ["1 rows with NaN/Inf tokens in rows 0..18 (first row 17, chunks 2)"]
    rerun = FeatureExtractor(**PARAMS, **tiny).run(root, copy)
    assert rerun.stats_.repaired == [2]
    same_store(FeatureStore.open(copy), FeatureStore.open(url))


def test_cli_rerun_repairs_and_readers_refuse_in_one_line(clean_store, tmp_path):
    root = clean_store[0]
    damaged = _damaged_copy(clean_store, tmp_path, "labels")
    runner = CliRunner()
    result = runner.invoke(cli, ["synthesize", damaged, "--stats-only", "--queue", "4",
                                 "--k", "2", "--select", "2", "--pick", "1",
                                 "--candidates", "4", "--keep", "1"])
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and "lost the file of chunk 1 (rows 8..15)" in \
        result.output
    args = ["extract", str(root), "--out", damaged, "--model", "npos-tiny", "--dtype",
            "float32", "--workers", "0", "--chunk-rows", "8", "--batch-size", "4",
            "--tokens-layer", "1", "--max-failed", "0.1"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "8 rows encoded" in result.output and "repaired 1 damaged chunk(s): 1" in \
        result.output
    result = runner.invoke(cli, args)
    assert result.exit_code == 0 and "nothing left to encode" in result.output


# ---------------------------------------------------------------------------- failed inputs
def test_all_failed_exits_2_with_reasons_tallied(tmp_path):
    data = tmp_path / "junk"
    data.mkdir()
    for i in range(3):
        (data / f"note{i}.jpg").write_text("text, not a picture")
    for i in range(2):
        (data / f"empty{i}.png").write_bytes(b"")
    out = tmp_path / "s.zarr"
    result = CliRunner().invoke(cli, ["extract", str(data), "--out", str(out), "--model",
                                      "npos-tiny", "--workers", "0", "--max-failed", "1"])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "Traceback" not in result.output
    assert "all 5 images failed: 3 not an image, 2 empty file; the store" in result.output
    assert FeatureStore.open(str(out)).is_complete  # kept


def test_max_failed(tmp_path, folder_factory, tiny):
    root = folder_factory(tmp_path / "data", per_class=4)  # 12 good images
    (root / "cat" / "bad.jpg").write_text("not an image")
    (root / "dog" / "empty.jpg").write_bytes(b"")  # 2 of 14 fail: 14.3 %
    out = str(tmp_path / "s.zarr")
    runner = CliRunner()
    args = ["extract", str(root), "--out", out, "--model", "npos-tiny", "--workers", "0",
            "--chunk-rows", "4"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 2
    assert ("2 of 14 images failed (14.3%, more than --max-failed 0.05): 1 not an image, "
            "1 empty file; the store") in result.output
    assert "is kept" in result.output and FeatureStore.open(out).is_complete
    result = runner.invoke(cli, [*args, "--max-failed", "0.2"])
    assert result.exit_code == 0 and "nothing left to encode" in result.output
    with pytest.raises(TooManyFailedError, match="more than --max-failed 0.1"):
        extract_features(root, out, max_failed=0.1, chunk_rows=4, **{**tiny, "dtype": "float16"})

    result = runner.invoke(cli, ["store", "info", out, "--failed"])
    assert result.exit_code == 0
    lines = sorted(line for line in result.output.splitlines() if "\t" in line)
    assert lines == ["cat/bad.jpg\tnot an image (unknown format)", "dog/empty.jpg\tempty file"]
    assert "2 of 14 rows failed" in result.output
    result = runner.invoke(cli, ["store", "info", out, "--failed", "--json"])
    listed = json.loads(result.stdout)
    assert sorted(row["id"] for row in listed) == ["cat/bad.jpg", "dog/empty.jpg"]


def test_undecodable_chunk_reported_and_repaired(clean_store, tmp_path, same_store):
    root, url, tiny = clean_store
    copy = str(tmp_path / "garbage.zarr")
    shutil.copytree(url, copy)
    _chunk_files(copy, "embeddings", 1)[0].write_bytes(b"\x00garbage" * 7)
    problems = FeatureStore.open(copy).verify()
    assert len(problems) == 1
    assert problems[0].startswith("array 'embeddings' chunk 1 (rows 8..15) cannot be read: ")
    store = FeatureStore.open(copy)
    for read in (store.read, lambda: list(store.iter_batches(3))):
        with pytest.raises(StoreError, match=r"is damaged: array 'embeddings' chunk 1 \(rows "
                                             r"8\.\.15\) cannot be read \(.*\); re-run 'npos "
                                             r"extract") as err:
            read()
        assert "\n" not in str(err.value)
    rerun = FeatureExtractor(**PARAMS, **tiny).run(root, copy)
    assert rerun.stats_.repaired == [1]
    same_store(FeatureStore.open(copy), FeatureStore.open(url))
