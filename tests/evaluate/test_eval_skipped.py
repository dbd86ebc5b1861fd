"""`score` and `evaluate` say how many invalid rows (failed inputs) they skipped."""

import json

import numpy as np
from click.testing import CliRunner

from npos.cli import cli
from npos.evaluate import evaluate, read_score_settings, score_store
from npos.store import FeatureStore


def _with_invalid(make_store, path, z, invalid, **kw):
    """A store of ``z`` whose rows ``invalid`` are marked failed (valid False, error set)."""
    store = FeatureStore.open(make_store(path, z, chunk_rows=16, **kw).url, mode="r+")
    valid = np.ones(len(z), bool)
    valid[list(invalid)] = False
    store.add_array("valid", (), "bool", fill_value=True)
    store.array("valid")[:] = valid
    return str(path)


def test_score_reports_skipped_rows_on_stderr_and_in_settings(world, make_store, tmp_path):
    store = _with_invalid(make_store, tmp_path / "in.zarr", world["z_test"][:40], [3, 17, 30],
                          text_embeddings=world["text"])
    out = tmp_path / "s.csv"
    result = CliRunner().invoke(cli, ["score", store, "--scores", "mcm", "--device", "cpu",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.stderr.splitlines() if "skipped" in ln]
    assert len(lines) == 1 and "skipped 3 invalid rows" in lines[0] and "in.zarr" in lines[0]
    assert read_score_settings(out)["skipped_invalid"] == 3
    assert len(out.read_text().splitlines()) == 1 + 37
    summary = score_store(store, tmp_path / "s.zarr", scores="mcm", device="cpu")
    assert summary.skipped == 3 and summary.rows == 37
    assert read_score_settings(tmp_path / "s.zarr")["skipped_invalid"] == 3


def test_score_without_invalid_rows_says_nothing(world, tmp_path):
    result = CliRunner().invoke(cli, ["score", world["test"], "--scores", "mcm", "--device",
                                      "cpu", "--out", str(tmp_path / "s.csv")])
    assert result.exit_code == 0, result.output
    assert "skipped" not in result.stderr
    assert read_score_settings(tmp_path / "s.csv")["skipped_invalid"] == 0


def test_evaluate_reports_skipped_rows_per_store(world, make_store, tmp_path):
    names = [f"c{i}" for i in range(len(world["text"]))]
    test = _with_invalid(make_store, tmp_path / "t.zarr", world["z_test"], [0, 5],
                         labels=world["y_test"], class_names=names,
                         text_embeddings=world["text"])
    far = _with_invalid(make_store, tmp_path / "f.zarr", world["z_far"], [7])
    out = tmp_path / "report"
    result = CliRunner().invoke(cli, ["evaluate", "--id", test, "--ood", f"far={far}",
                                      "--ood", f"near={world['near']}", "--scores", "mcm",
                                      "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.stderr.splitlines() if "skipped" in ln]
    assert len(lines) == 1, result.stderr
    assert "skipped 3 invalid rows" in lines[0]
    assert "2 in ID store" in lines[0] and "1 in OOD store 'far'" in lines[0]
    assert "near" not in lines[0]
    settings = json.loads((out / "metrics.json").read_text())["settings"]
    assert settings["skipped_invalid"] == {"id": 2, "far": 1, "near": 0}
    assert settings["rows"] == {"id": len(world["z_test"]) - 2, "far": len(world["z_far"]) - 1,
                                "near": len(world["z_near"])}
    report = (out / "report.md").read_text()
    assert "- skipped (inputs that failed to load): 2 ID rows, 1 'far' rows" in report
    clean = evaluate(world["test"], {"far": world["far"]}, scores="mcm", device="cpu")
    assert clean.settings["skipped_invalid"] == {"id": 0, "far": 0}
