"""Head training and fine-tuning steps on CUDA under AMP, and their pinned-memory paths."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from npos.finetune import FinetuneConfig, TokenStream, finetune
from npos.store import FeatureStore
from npos.synthesize import SynthesisConfig
from npos.train_head import HeadConfig, load_head, train_head

pytestmark = pytest.mark.cuda

SYNTH = SynthesisConfig(k=8, select=20, pick=2, candidates=32, keep=2)


def _config(**overrides) -> HeadConfig:
    params = {"epochs": 2, "batch_size": 128, "queue": 64, "synthesis": SYNTH, "seed": 0,
              "amp": True, **overrides}
    return HeadConfig(**params)


def _finite_history(history):
    return all(math.isfinite(h["id_loss"]) and math.isfinite(h["outlier_loss"])
               for h in history)


@pytest.mark.parametrize("head", ["mlp", "rbf"])
def test_train_head_on_cuda_under_amp(feature_world, tmp_path, head):
    result = train_head(feature_world["train"], str(tmp_path / "head"), _config(head=head),
                        device="cuda")
    assert len(result.history) == 2 and _finite_history(result.history)
    assert sum(h["synth_steps"] for h in result.history) > 0  # synthesis ran on the GPU
    assert result.history[-1]["accuracy"] > 0.9
    trained = load_head(str(tmp_path / "head"), device="cuda")
    z = torch.from_numpy(FeatureStore.open(feature_world["test"]).read("embeddings")).cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        logits = trained.logits(z)
    assert logits.dtype == torch.float32  # the classifier stays float32 under autocast


def test_train_head_pinned_host_path_matches_device_path(feature_world, tmp_path,
                                                         monkeypatch):
    config = _config(epochs=1)
    resident = train_head(feature_world["train"], str(tmp_path / "a"), config, device="cuda")
    total = torch.cuda.mem_get_info()[1]
    # No free memory reported: the features stay in pinned host memory, batches are copied.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a, **k: (0, total))
    pinned = train_head(feature_world["train"], str(tmp_path / "b"), config, device="cuda")
    for a, b in zip(resident.history, pinned.history):
        assert a["accuracy"] == pytest.approx(b["accuracy"], abs=0.02)
        assert a["id_loss"] == pytest.approx(b["id_loss"], rel=0.02, abs=1e-3)


def test_token_stream_pinned_batches_equal_plain(token_store):
    store = FeatureStore.open(token_store)
    plain = list(TokenStream(store, batch_size=8).epoch(torch.Generator().manual_seed(0)))
    pinned = list(TokenStream(store, batch_size=8, pin_memory=True)
                  .epoch(torch.Generator().manual_seed(0)))
    assert len(plain) == len(pinned) > 1
    for (t0, y0), (t1, y1) in zip(plain, pinned):
        assert t1.is_pinned()
        moved = t1.to("cuda", non_blocking=True)
        torch.cuda.synchronize()
        assert torch.equal(moved.cpu(), t0) and torch.equal(y1, y0)


def test_finetune_on_cuda_under_amp(token_store, tmp_path):
    config = _config(epochs=2, batch_size=16, queue=16, head="mlp",
                     synthesis=SynthesisConfig(k=4, select=8, pick=2, candidates=16, keep=2))
    result = finetune(token_store, str(tmp_path / "ft"), model="npos-tiny", head_config=config,
                      config=FinetuneConfig(window_rows=32), embed={"train": token_store},
                      device="cuda")
    assert len(result.history) == 2 and _finite_history(result.history)
    embedded = FeatureStore.open(result.stores["train"]).read("embeddings")
    assert np.isfinite(embedded).all() and embedded.shape[1] == 32
