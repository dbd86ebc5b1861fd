"""The one trainer (npos.train_head.trainer): an interrupted run resumes to the uninterrupted
result after every epoch, with an extra trained module (as finetune's tail); the epoch log
line; resume refuses other settings and names them; the partial state's lifecycle."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

from npos.synthesize import SynthesisConfig
from npos.train_head.checkpoint import CheckpointError
from npos.train_head.config import HeadConfig
from npos.train_head.data import FeatureBatches, LabeledFeatures, build_head
from npos.train_head.objective import HeadObjective
from npos.train_head.trainer import Trainer, check_same_settings, format_epoch, run_epoch

#: Synthesis from epoch 1 on queues of 8 (20 rows per class), SGD with momentum: every kind of
#: state the trainer must carry across an interruption (weights, optimizer moments, queues,
#: the synthesis and shuffling generators) changes every epoch.
CONFIG = HeadConfig(epochs=4, batch_size=16, lr=0.05, optimizer="sgd", queue=8, start_epoch=1,
                    head="mlp", amp=False,
                    synthesis=SynthesisConfig(k=2, select=4, pick=2, candidates=8, keep=1))


def _data() -> LabeledFeatures:
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=gen) * 3
    y = torch.arange(60) % 3
    z = centres[y] + torch.randn(60, 8, generator=gen)
    return LabeledFeatures(z, y, ["a", "b", "c"], None)


class _Producer(torch.nn.Module):
    """A trainable map in front of the head, standing in for finetune's encoder tail."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(8))
            self.linear.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class _ProducedBatches:
    """A batch source whose ``z`` carries a graph into the producer."""

    def __init__(self, features: FeatureBatches, producer: _Producer) -> None:
        self.features, self.producer = features, producer
        self.steps_per_epoch, self.n_rows = features.steps_per_epoch, features.n_rows

    def epoch(self, generator):
        for x, y in self.features.epoch(generator):
            yield self.producer(x), y


def _run(partial, config=CONFIG, *, record=None, resume=False, log=None, per_sample=False,
         progress=False, epoch_fn=run_epoch):
    """One (possibly resumed) run; returns (trainer, saved outputs)."""
    data = _data()
    model, means = build_head(data, config)
    producer = _Producer()
    objective = HeadObjective(model, config, cider_prototypes=means)
    trainer = Trainer(objective, partial=partial, record=record or config.to_dict(),
                      extra={"producer": (producer, 0.5)}, name="run", per_sample=per_sample,
                      progress=progress, log=log, epoch_fn=epoch_fn)
    if resume:
        trainer.resume()
    source = _ProducedBatches(FeatureBatches(data.z, data.y, config.batch_size,
                                             torch.device("cpu")), producer)

    def save(history):
        return {"model": {k: v.clone() for k, v in model.state_dict().items()},
                "producer": {k: v.clone() for k, v in producer.state_dict().items()},
                "history": [dict(e) for e in history]}

    return trainer, trainer.fit(source, save=save)


def _without_seconds(history):
    return [{k: v for k, v in e.items() if k not in ("seconds", "samples_per_s")}
            for e in history]


def _assert_same_weights(a, b):
    for part in ("model", "producer"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)


class Interrupt(Exception):
    pass


def _stop_at(line_start):
    def log(line):
        if line.startswith(line_start):
            raise Interrupt
    return log


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("whole") / "p")[1]


@pytest.mark.parametrize("done", [1, 2, 3])
def test_an_interruption_after_any_epoch_resumes_to_the_uninterrupted_result(whole, tmp_path,
                                                                           done):
    partial = tmp_path / "p"
    # The log line of epoch done+1 comes before its state is saved: the run dies with
    # `done` epochs in the partial state.
    with pytest.raises(Interrupt):
        _run(partial, log=_stop_at(f"epoch {done + 1}/"))
    assert json.loads((partial / "config.json").read_text())["epochs_done"] == done
    lines = []
    trainer, out = _run(partial, resume=True, log=lines.append)
    assert trainer.first_epoch == done
    assert lines[0] == f"resuming 'run' after epoch {done}/4"
    assert len(lines) == 1 + 4 - done
    _assert_same_weights(out, whole)
    assert _without_seconds(out["history"]) == _without_seconds(whole["history"])
    assert not partial.exists()


def test_the_run_trains_the_extra_module_and_synthesizes(whole):
    assert not torch.equal(whole["producer"]["linear.weight"], torch.eye(8))
    history = whole["history"]
    assert [e["epoch"] for e in history] == [1, 2, 3, 4]
    assert history[0]["outlier_loss"] is None and history[0]["synth_steps"] == 0
    assert all(e["synth_steps"] > 0 and e["outlier_loss"] is not None for e in history[1:])


def test_resume_without_a_partial_state_starts_from_scratch(whole, tmp_path):
    trainer, out = _run(tmp_path / "none", resume=True)
    assert trainer.first_epoch == 0
    _assert_same_weights(out, whole)


def test_an_optimizer_without_tensor_state_resumes(tmp_path):
    # SGD without momentum keeps no tensors: the partial state has no "optimizer/" keys.
    config = dataclasses.replace(CONFIG, epochs=2, momentum=0.0)
    _, whole = _run(tmp_path / "a", config)
    with pytest.raises(Interrupt):
        _run(tmp_path / "b", config, log=_stop_at("epoch 2/"))
    _, out = _run(tmp_path / "b", config, resume=True)
    _assert_same_weights(out, whole)


def test_resume_refuses_other_settings_and_names_them(tmp_path):
    partial = tmp_path / "p"
    with pytest.raises(Interrupt):
        _run(partial, log=_stop_at("epoch 2/"))
    other = {**CONFIG.to_dict(), "lr": 0.5, "seed": 3}
    with pytest.raises(CheckpointError,
                       match=r"cannot resume from '.*p': it was made with other settings "
                             r"\(lr, seed differ\); pass --overwrite to start over"):
        _run(partial, record=other, resume=True)
    # A setting the saved run did not have differs too.
    with pytest.raises(CheckpointError, match=r"\(val_store differ\)"):
        _run(partial, record={**CONFIG.to_dict(), "val_store": "v.zarr"}, resume=True)
    assert partial.is_dir()  # refusing leaves the state for a resume with the right settings


def test_settings_compare_as_stored():
    saved = json.loads(json.dumps({"shape": (3, 4), "names": ["a"], "epochs_done": 2}))
    check_same_settings(saved, {"shape": (3, 4), "names": ["a"]}, "here")
    with pytest.raises(CheckpointError, match=r"\(names, shape differ\)"):
        check_same_settings(saved, {"shape": (3, 5), "names": ["b"]}, "here")


def test_the_epoch_log_line(tmp_path):
    entry = {"epoch": 2, "id_loss": 1.23456, "outlier_loss": None, "accuracy": 0.5,
             "synth_steps": 0, "seconds": 1.26}
    assert format_epoch(entry, 5) == "epoch 2/5  id_loss 1.2346  acc 0.5000  1.3s"
    full = {**entry, "outlier_loss": 0.5, "val_accuracy": 0.75, "samples_per_s": 1234.5}
    assert format_epoch(full, 5) == ("epoch 2/5  id_loss 1.2346  outlier_loss 0.5000  "
                                     "acc 0.5000  val_acc 0.7500  1234 img/s  1.3s")
    assert format_epoch({**full, "val_accuracy": None}, 5).count("val_acc") == 0

    lines = []
    _, out = _run(tmp_path / "p", dataclasses.replace(CONFIG, epochs=2), log=lines.append,
                  per_sample=True)
    assert lines == [format_epoch(e, 2) for e in out["history"]]
    pattern = (r"epoch \d/2  id_loss \d+\.\d{4}(  outlier_loss \d+\.\d{4})?  acc \d\.\d{4}  "
               r"\d+ img/s  \d+\.\ds")
    assert all(re.fullmatch(pattern, line) for line in lines), lines
    assert all(e["samples_per_s"] > 0 for e in out["history"])


def test_run_epoch_gets_the_epoch_and_the_schedule(tmp_path):
    calls = []

    def spy(*args, **kw):
        calls.append((kw["epoch"], kw["first_step"], kw["lr_at"](0), kw["lr_at"](8)))
        return run_epoch(*args, **kw)

    _run(tmp_path / "p", dataclasses.replace(CONFIG, epochs=2), epoch_fn=spy)
    # 60 rows in batches of 16: 4 steps per epoch, 8 in all; cosine from 1 down to 0.
    assert calls == [(0, 0, 1.0, 0.0), (1, 4, 1.0, 0.0)]


@pytest.mark.parametrize("per_sample", [False, True])
def test_progress_bars_count_steps_or_samples_and_change_nothing(whole, tmp_path, monkeypatch,
                                                                 per_sample):
    import tqdm.auto

    closed = []

    class Recording(tqdm.auto.tqdm):
        def close(self):
            if not self.disable:  # close runs again on deletion, then disabled
                closed.append((self.desc, self.n, self.total, self.unit))
            super().close()

    monkeypatch.setattr(tqdm.auto, "tqdm", Recording)
    _, out = _run(tmp_path / "p", progress=True, per_sample=per_sample)
    _assert_same_weights(out, whole)
    # 60 rows in 4 steps per epoch: each bar ends full, at 60 samples or 4 steps.
    expected = (60, 60, "img") if per_sample else (4, 4, "step")
    assert closed == [(f"epoch {e}/4", *expected) for e in (1, 2, 3, 4)]
