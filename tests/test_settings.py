"""The settings record every output carries (npos.settings)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import npos
from npos.settings import jsonable, settings_record
from npos.synthesize import SynthesisConfig


def test_record_holds_version_config_fields_and_values_in_json_types():
    config = SynthesisConfig(k=5, select=10, pick=2, candidates=20, keep=1)
    record = settings_record(config, queue=50, seed=3, device=torch.device("cpu"),
                             features=Path("a/b.zarr"), scale=np.float32(0.5))
    assert list(record)[0] == "npos_version" and record["npos_version"] == npos.__version__
    assert {k: record[k] for k in ("k", "select", "pick", "candidates", "keep")} == \
        {"k": 5, "select": 10, "pick": 2, "candidates": 20, "keep": 1}
    assert record["resolved_sigma"] == config.resolved_sigma  # to_dict() is used
    assert record["device"] == "cpu" and record["features"] == "a/b.zarr"
    assert record["scale"] == 0.5 and type(record["scale"]) is float
    assert json.loads(json.dumps(record)) == record


def test_plain_dataclass_mapping_and_clash():
    @dataclass
    class Plain:
        a: int = 1
        names: tuple = ("x", "y")

    assert settings_record(Plain(), b=2) == {"npos_version": npos.__version__, "a": 1,
                                             "names": ["x", "y"], "b": 2}
    assert settings_record({"a": 1}) == {"npos_version": npos.__version__, "a": 1}
    with pytest.raises(TypeError, match=r"given twice.*\['a'\]"):
        settings_record({"a": 1}, a=2)
    assert jsonable({1: (np.int64(2), {"p": Path("q")})}) == {"1": [2, {"p": "q"}]}


def test_extraction_store_records_resolved_settings(tmp_path):
    from npos.extract import extract_features

    rng = np.random.default_rng(0)
    (tmp_path / "data" / "a").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
            tmp_path / "data" / "a" / f"{i}.png")
    store = extract_features(tmp_path / "data", str(tmp_path / "s.zarr"), model="npos-tiny",
                             device="auto", batch_size=2, workers=0, seed=4)
    settings = store.attrs["settings"]
    assert settings["npos_version"] == npos.__version__
    assert settings["device"] in ("cpu", "cuda")  # resolved, never "auto"
    assert (settings["model"], settings["weights"], settings["seed"]) == ("npos-tiny", "none", 4)
    assert settings["batch_size"] == 2 and settings["chunk_rows"] == store.attrs["chunk_rows"]
    assert settings["data"] == str(tmp_path / "data")
