"""A head's config.json records the call's full resolved settings and the npos version, next
to the keys it always had."""

from __future__ import annotations

import json

import npos
from npos.synthesize import SynthesisConfig
from npos.train_head import HeadConfig, train_head

CONFIG = HeadConfig(epochs=1, batch_size=128, queue=100,
                    synthesis=SynthesisConfig(k=20, select=30, pick=3, candidates=100, keep=2))


def test_train_head_records_settings_and_version(world_stores, tmp_path):
    out = tmp_path / "h"
    train_head(world_stores["train"], str(out), CONFIG, val=world_stores["test"], device="auto")
    config = json.loads((out / "config.json").read_text())
    assert config["npos_version"] == npos.__version__
    settings = config["settings"]
    assert settings == {"npos_version": npos.__version__,
                        "train_store": config["train_store"], "out_dir": str(out),
                        "val": world_stores["test"], "device": "cpu",
                        "config": json.loads(json.dumps(CONFIG.to_dict()))}
    assert HeadConfig.from_dict(settings["config"]) == CONFIG
    # The keys from before are all still there, with the same values.
    assert HeadConfig.from_dict(config) == CONFIG
    for key in ("format", "dim", "num_classes", "class_names", "classifier",
                "classifier_trainable", "fingerprint", "train_store", "train_rows",
                "val_store", "history", "created"):
        assert key in config, key
