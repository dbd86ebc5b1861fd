"""Online synthesis with an approximate backend trains and tunes IVF once per class per epoch,
not once per step (the objective owns a KnnCache and clears it when the epoch changes)."""

from __future__ import annotations

import pytest
import torch

from npos.synthesize import SynthesisConfig
from npos.train_head import HeadConfig, HeadObjective
from npos.train_head.data import LabeledFeatures, build_head


def test_ivf_state_is_reused_within_an_epoch_and_dropped_after(monkeypatch):
    pytest.importorskip("faiss")
    from npos.knn.ivf import FaissIvfBackend

    trained = []
    train = FaissIvfBackend._train
    monkeypatch.setattr(FaissIvfBackend, "_train",
                        lambda self, data: (trained.append(1), train(self, data))[1])
    g = torch.Generator().manual_seed(0)
    classes, dim, per_class = 3, 16, 60
    y = torch.arange(classes).repeat_interleave(per_class)
    z = torch.randn(len(y), dim, generator=g) + 3 * torch.eye(classes, dim)[y]
    data = LabeledFeatures(z=z, y=y, class_names=[f"c{i}" for i in range(classes)], text=None)
    synthesis = SynthesisConfig(k=5, select=10, pick=1, candidates=20, keep=1,
                                backend="faiss-ivf")
    config = HeadConfig(queue=50, ood_weight=0.1, start_epoch=0, synthesis=synthesis,
                        id_loss="none")
    model, means = build_head(data, config)
    objective = HeadObjective(model, config, cider_prototypes=means)
    objective.queues.push(z, y)  # full queues: every step synthesizes
    for epoch, steps in ((0, 3), (1, 2)):
        for _ in range(steps):
            objective(z[:30], y[:30], epoch=epoch)
        assert objective.outliers is not None and len(objective.outliers) == classes
        # one training per class in each epoch, however many steps it took
        assert len(trained) == classes * (epoch + 1)
