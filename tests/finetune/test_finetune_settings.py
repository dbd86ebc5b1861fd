"""The head written by finetune records the call's full resolved settings and the npos
version, next to the keys it always had."""

from __future__ import annotations

import dataclasses
import json

import npos
from npos.finetune import FinetuneConfig, finetune


def test_the_head_records_settings_and_version(token_stores, head_config, tmp_path):
    config, ft = head_config(epochs=1), FinetuneConfig(window_rows=32)
    out = tmp_path / "ft"
    result = finetune(token_stores["train"], str(out), model="npos-tiny", head_config=config,
                      config=ft, embed={"test": token_stores["test"]}, device="cpu")
    head = json.loads((out / "head" / "config.json").read_text())
    assert head["npos_version"] == npos.__version__
    assert head["settings"] == {"npos_version": npos.__version__,
        "train_store": head["train_store"], "out_dir": str(out), "model": "npos-tiny",
        "pretrained": None, "embed": {"test": token_stores["test"]}, "device": "cpu",
        "head_config": json.loads(json.dumps(config.to_dict())),
        "finetune": json.loads(json.dumps(dataclasses.asdict(ft)))}
    assert head["fingerprint"] == result.tail["fingerprint"]
    for key in ("format", "dim", "num_classes", "class_names", "classifier", "train_rows",
                "val_store", "history", "finetune", "created", "epochs", "synthesis"):
        assert key in head, key
