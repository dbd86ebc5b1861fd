"""ScoringConfig (round trip, validation, the former keyword arguments) and the settings
record in metrics.json and in every score file format."""

import csv
import json

import numpy as np
import pytest

import npos
from npos.errors import OutputExistsError, ParameterError
from npos.evaluate import ScoringConfig, evaluate, read_score_settings, score_store, \
    write_report
from npos.evaluate.config import scoring_config
from npos.evaluate.inputs import build_scorer
from npos.store import FeatureStore


def test_round_trip_and_normalized_scores():
    config = ScoringConfig(scores="mcm, knn,mcm", knn_k=7, knn_backend="faiss-flat",
                           mcm_temperature=0.5, device="cpu", batch_size=128)
    assert config.scores == ("mcm", "knn")
    doc = config.to_dict()
    assert doc == {"scores": ["mcm", "knn"], "knn_k": 7, "knn_backend": "faiss-flat",
                   "mcm_temperature": 0.5, "device": "cpu", "batch_size": 128}
    assert ScoringConfig.from_dict(json.loads(json.dumps(doc))) == config
    assert ScoringConfig.from_dict({**doc, "npos_version": "x"}) == config  # extra keys
    assert ScoringConfig.from_dict(ScoringConfig().to_dict()) == ScoringConfig()
    assert ScoringConfig(device=None).device == "auto"


@pytest.mark.parametrize("changes, message", [
    (dict(knn_k=0), r"The 'knn_k' parameter must be an int in the range \[1, inf\). Got 0 "
                    r"instead\."),
    (dict(knn_k=2.5), r"The 'knn_k' parameter must be an int .* Got 2.5 instead\."),
    (dict(knn_backend="annoy"), r"The 'knn_backend' parameter must be one of 'auto', "
                                r"'torch', 'faiss-flat', 'faiss-ivf'\. Got 'annoy' instead\."),
    (dict(mcm_temperature=0), r"The 'mcm_temperature' parameter must be a float in the range "
                              r"\(0, inf\)\. Got 0 instead\."),
    (dict(batch_size=0), r"The 'batch_size' parameter must be an int in the range \[1, inf\)"),
    (dict(scores="mcm,odin"), r"unknown score\(s\) 'odin'; choose from mcm, msp"),
    (dict(scores=""), r"no score named; choose from mcm"),
    (dict(scores=5), r"The 'scores' parameter must be a comma-separated string or a list"),
    (dict(scores=["mcm", 3]), r"score names must be strings"),
])
def test_validation_messages(changes, message):
    with pytest.raises(ParameterError, match=message):
        ScoringConfig(**changes)


def test_scoring_config_merges_options():
    base = ScoringConfig(knn_k=9, device="cpu")
    assert scoring_config(base, knn_k=3, scores=None) == ScoringConfig(knn_k=3, device="cpu")
    assert scoring_config(None) == ScoringConfig()
    with pytest.raises(ParameterError, match=r"unknown scoring option\(s\) 'knn'; choose from "
                                             r"scores, knn_k"):
        scoring_config(base, knn=3)
    with pytest.raises(ParameterError, match="The 'config' parameter must be a ScoringConfig"):
        scoring_config({"knn_k": 3})


def test_config_and_former_keywords_give_the_same_result(world):
    config = ScoringConfig(scores="mcm,knn", knn_k=5, knn_backend="torch", device="cpu",
                           batch_size=64)
    a = evaluate(world["test"], {"far": world["far"]}, config, train=world["train"])
    b = evaluate(world["test"], {"far": world["far"]}, scores="mcm,knn", knn_k=5,
                 knn_backend="torch", device="cpu", batch_size=64, train=world["train"])
    assert a.metrics == b.metrics and a.settings == b.settings
    c = evaluate(world["test"], {"far": world["far"]}, config, knn_k=3, train=world["train"])
    assert c.settings["config"]["knn_k"] == 3


def test_build_scorer_resolves_the_config(world):
    test = FeatureStore.open(world["test"])
    setup = build_scorer({"ID store": test}, ScoringConfig(device="cpu"), train=world["train"],
                         knn_backend="torch")
    assert setup.config == ScoringConfig(scores=("mcm", "knn"), knn_backend="torch",
                                         device="cpu")
    assert setup.settings()["knn_backend_used"] == "torch"  # the zarr 'scoring' attribute


def test_metrics_json_records_the_settings(world):
    config = ScoringConfig(knn_k=5, knn_backend="torch", device="cpu")
    result = evaluate(world["test"], {"far": world["far"], "near": world["near"]}, config,
                      train=world["train"])
    write_report(result, world["tmp"] / "rep")
    doc = json.loads((world["tmp"] / "rep" / "metrics.json").read_text())
    settings = doc["settings"]
    assert settings["npos_version"] == npos.__version__
    # The full resolved config: the default scores that were computed, the concrete device.
    assert settings["config"] == {**config.to_dict(), "scores": ["mcm", "knn"]}
    assert ScoringConfig.from_dict(settings["config"]).scores == ("mcm", "knn")
    assert settings["id"] == world["test"] and settings["train"] == world["train"]
    assert settings["ood"] == {"far": world["far"], "near": world["near"]}
    assert settings["head"] is None and settings["space"] == "encoder"
    assert settings["text_embeddings_from"] == world["train"]
    assert settings["rows"] == {"id": 150, "far": 120, "near": 90}
    assert settings["detectors"] == {"knn": {"backend_used": "torch"}}
    report = (world["tmp"] / "rep" / "report.md").read_text()
    assert f"- npos {npos.__version__}, device cpu" in report
    assert "- kNN: K = 5, backend torch" in report


def test_score_files_record_the_settings(world):
    pytest.importorskip("pyarrow")
    import pandas as pd

    kw = dict(scores="mcm,knn", knn_k=3, knn_backend="torch", device="cpu", batch_size=64,
              train=world["train"])
    records = {}
    for suffix in (".csv", ".parquet", ".zarr"):
        out = world["tmp"] / f"s{suffix}"
        score_store(world["near"], out, **kw)
        records[suffix] = read_score_settings(out)
    assert records[".csv"] == records[".parquet"] == records[".zarr"]
    record = records[".csv"]
    assert record["npos_version"] == npos.__version__ and record["store"] == world["near"]
    assert record["config"] == {"scores": ["mcm", "knn"], "knn_k": 3, "knn_backend": "torch",
                                 "mcm_temperature": 1.0, "device": "cpu", "batch_size": 64}
    assert record["train"] == world["train"]
    # The csv itself stays plain: pandas and csv read it without options.
    frame = pd.read_csv(world["tmp"] / "s.csv")
    assert list(frame.columns) == ["id", "mcm", "knn"] and len(frame) == 90
    with open(world["tmp"] / "s.csv", newline="") as f:
        assert next(csv.reader(f)) == ["id", "mcm", "knn"]
    np.testing.assert_allclose(frame["knn"], pd.read_parquet(world["tmp"] / "s.parquet")["knn"])
    zs = FeatureStore.open(str(world["tmp"] / "s.zarr"))
    assert zs.attrs["scoring"]["knn_k"] == 3  # the former flat attribute stays


def test_csv_settings_sidecar_follows_overwrite(world):
    out = world["tmp"] / "s.csv"
    sidecar = world["tmp"] / "s.csv.json"
    sidecar.write_text("{}")
    with pytest.raises(OutputExistsError, match="score settings file .*s.csv.json"):
        score_store(world["test"], out, scores="mcm", device="cpu")
    assert not out.exists() and sidecar.read_text() == "{}"
    score_store(world["test"], out, scores="mcm", device="cpu", overwrite=True)
    assert json.loads(sidecar.read_text())["config"]["scores"] == ["mcm"]
    score_store(world["test"], out, scores="mcm,energy", device="cpu", overwrite=True)
    assert json.loads(sidecar.read_text())["config"]["scores"] == ["mcm", "energy"]
