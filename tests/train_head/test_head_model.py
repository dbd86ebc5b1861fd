"""The head's modules and losses, and the checkpoint round trip."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from npos.train_head.checkpoint import (CheckpointError, TrainedHead, load_head,
                                        write_checkpoint_dir)
from npos.train_head.losses import CiderLoss, logitnorm_loss, outlier_loss
from npos.train_head.model import HeadModel, Projection, RbfHead


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_projection_is_identity_at_init(kind):
    torch.manual_seed(0)
    z = torch.randn(16, 8) * 10
    assert torch.equal(Projection(8, kind)(z), z)


def test_cosine_logits_are_cosines_over_temperature():
    weight = torch.randn(3, 8)
    model = HeadModel(weight, temperature=0.5)
    z = torch.randn(5, 8) * 7
    expected = F.normalize(z, dim=1) @ F.normalize(weight, dim=1).T / 0.5
    torch.testing.assert_close(model.logits(z), expected)
    assert model.ood_logit(z).shape == (5,)
    assert "classifier.weight" in model.state_dict()  # fixed text is saved with the model


def test_classifier_trainable_flag():
    fixed, learned = HeadModel(torch.randn(3, 8)), HeadModel(torch.randn(3, 8),
                                                              train_classifier=True)
    assert "classifier.weight" not in dict(fixed.named_parameters())
    assert "classifier.weight" in dict(learned.named_parameters())


def test_rbf_head_is_highest_near_its_centres_and_scale_free():
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(200, 8, generator=gen) + 4 * torch.eye(8)[torch.arange(200) % 2]
    y = torch.arange(200) % 2
    head = RbfHead(8, 2, centres_per_class=3)
    head.init_from_data(h, y, generator=gen)
    with torch.no_grad():
        near, far = head(h), head(-h)
    assert near.mean() > far.mean() + 1
    with torch.no_grad():
        torch.testing.assert_close(head(h * 9.0), near)  # works on normalized h
    assert abs(float(near.median())) < 1.0  # initialized so a typical point sits near 0


def test_losses_are_finite_and_behave():
    torch.manual_seed(0)
    cosines = torch.rand(10, 4) * 2 - 1
    y = torch.randint(0, 4, (10,))
    assert torch.isfinite(logitnorm_loss(cosines, y, 0.1))
    good = outlier_loss(torch.full((8,), 5.0), torch.full((3,), -5.0))
    bad = outlier_loss(torch.full((8,), -5.0), torch.full((3,), 5.0))
    assert good < 0.01 and bad > 4

    h = torch.randn(32, 8, requires_grad=True)
    labels = torch.arange(32) % 4
    cider = CiderLoss(torch.randn(4, 8), temperature=0.1, momentum=0.5)
    before = cider.prototypes.clone()
    loss = cider(h, labels)
    loss.backward()
    assert torch.isfinite(loss) and h.grad is not None and h.grad.abs().sum() > 0
    assert not torch.equal(before, cider.prototypes)
    torch.testing.assert_close(cider.prototypes.norm(dim=1), torch.ones(4))
    assert not cider.prototypes.requires_grad


def _config(**kw):
    return {"format": "npos.head/1", "dim": 8, "num_classes": 3, "projection": "mlp",
            "head": "rbf", "temperature": 0.1, "classifier_trainable": True, "head_hidden": 32,
            "rbf_centres": 2, "class_names": ["a", "b", "c"],
            "fingerprint": {"model": "m", "pretrained": None, "preprocess": None, "dim": 8},
            **kw}


def test_checkpoint_round_trip_gives_identical_scores(tmp_path):
    torch.manual_seed(0)
    config = _config()
    model = TrainedHead(config)
    for p in model.parameters():
        p.data.normal_()
    write_checkpoint_dir(tmp_path / "head", model.state_dict(), config)
    loaded = load_head(tmp_path / "head")
    z = torch.randn(7, 8)
    for name in ("project", "logits", "ood_logit"):
        assert torch.equal(getattr(loaded, name)(z), getattr(model, name)(z))
    scores = loaded.score(z, batch_size=3)
    assert torch.equal(scores["ood_logit"], model.ood_logit(z))
    assert loaded.config["class_names"] == ["a", "b", "c"]
    assert not loaded.training

    # Overwriting a checkpoint directory replaces it whole, atomically.
    write_checkpoint_dir(tmp_path / "head", model.state_dict(), {**config, "note": 1})
    assert load_head(tmp_path / "head").config["note"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head"]


def test_load_head_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no head at"):
        load_head(tmp_path / "missing")
    config = _config()
    write_checkpoint_dir(tmp_path / "h", TrainedHead(config).state_dict(),
                         {**config, "num_classes": 4, "class_names": list("abcd")})
    with pytest.raises(CheckpointError, match="does not match its config.json"):
        load_head(tmp_path / "h")
    (tmp_path / "h" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        load_head(tmp_path / "h")


def test_cosine_classifier_stays_float32_under_autocast():
    # Cosines near 0.9 at temperature 0.01: bfloat16 would be off by ~0.2 of logit.
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(10, 64, generator=gen)
    z = weight[:6] + 0.4 * torch.randn(6, 64, generator=gen)
    model = HeadModel(weight, temperature=0.01, train_classifier=True)
    reference = model.logits(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model.logits(z)
        direct = model.classifier(z)
    assert logits.dtype == torch.float32 and direct.dtype == torch.float32
    torch.testing.assert_close(direct, reference, rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_projection_is_identity_at_init_and_not_after_a_change(kind):
    projection = Projection(6, kind)
    assert projection.is_identity()
    z = torch.randn(4, 6)
    assert torch.equal(projection(z), z)
    with torch.no_grad():
        (projection.linear.bias if kind == "linear" else projection.fc2.weight)[0] += 1e-6
    assert not projection.is_identity()
