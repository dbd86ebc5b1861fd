"""``--amp`` on the CPU: bfloat16 product inputs with float32 output for the training step,
never for synthesis, and the previous setting restored."""

from __future__ import annotations

import pytest
import torch

from npos.device import cpu_matmul_precision
from npos.synthesize import SynthesisConfig
from npos.train_head import HeadConfig, HeadObjective
from npos.train_head.data import LabeledFeatures, build_head
from npos.train_head.trainer import run_epoch

matmul = torch.backends.mkldnn.matmul
needs_setting = pytest.mark.skipif(not hasattr(matmul, "fp32_precision"),
                                   reason="this torch has no oneDNN matmul precision setting")


@needs_setting
def test_context_sets_and_restores_the_setting_and_products_stay_close():
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(300, 512, generator=g), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(200, 512, generator=g), dim=-1)
    exact = a.double() @ b.double().T
    before = matmul.fp32_precision
    with cpu_matmul_precision(bf16=True):
        assert matmul.fp32_precision == "bf16"
        fast = a @ b.T
        with cpu_matmul_precision(bf16=False):
            assert matmul.fp32_precision == "ieee"
            full = a @ b.T
        assert matmul.fp32_precision == "bf16"
    assert matmul.fp32_precision == before
    assert fast.dtype == torch.float32
    # bfloat16 inputs, float32 accumulation: cosine errors of ~1e-4, not bfloat16 outputs' 4e-3
    assert (fast.double() - exact).abs().max() < 2e-3
    assert (full.double() - exact).abs().max() < 1e-5


@needs_setting
@pytest.mark.parametrize("amp", [True, False])
def test_training_step_uses_it_with_amp_and_synthesis_never(amp, monkeypatch):
    import npos.train_head.objective as objective_module

    seen = {"step": set(), "synthesis": set()}
    synthesize = objective_module.synthesize

    def spy(*args, **kwargs):
        seen["synthesis"].add(matmul.fp32_precision)
        return synthesize(*args, **kwargs)

    monkeypatch.setattr(objective_module, "synthesize", spy)
    g = torch.Generator().manual_seed(0)
    classes, dim, per_class = 3, 16, 40
    y = torch.arange(classes).repeat_interleave(per_class)
    z = torch.randn(len(y), dim, generator=g) + 3 * torch.eye(classes, dim)[y]
    data = LabeledFeatures(z=z, y=y, class_names=[f"c{i}" for i in range(classes)], text=None)
    config = HeadConfig(queue=30, ood_weight=0.1, amp=amp, id_loss="none",
                        synthesis=SynthesisConfig(k=3, select=5, pick=1, candidates=10, keep=1))
    model, means = build_head(data, config)
    objective = HeadObjective(model, config, cider_prototypes=means)
    objective.queues.push(z, y)
    model.classifier.register_forward_pre_hook(
        lambda module, args: seen["step"].add(matmul.fp32_precision))
    optimizer = torch.optim.AdamW(objective.parameter_groups(1e-3))
    before = matmul.fp32_precision
    batches = [(z[i:i + 20], y[i:i + 20]) for i in range(0, len(y), 20)]
    run_epoch(objective, batches, optimizer, epoch=0, lr_at=lambda s: 1.0, first_step=0,
              amp=amp)
    assert seen["step"] == {"bf16" if amp else "ieee"}
    assert seen["synthesis"] == {"ieee"}
    assert matmul.fp32_precision == before
