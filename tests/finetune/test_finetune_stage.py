"""The fine-tuning stage: training lowers the loss, outputs load, re-embedded stores are
normal stores of a new encoder identity, inputs are checked before anything is written."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from npos.errors import IncompatibleStoreError, NposError, ParameterError, StoreError
from npos.extract import create_encoder
from npos.finetune import (FinetuneConfig, VisionTail, finetune, load_tail, parse_embed_specs,
                           read_tail_config)
from npos.store import FeatureStore
from npos.train_head import load_head


@pytest.fixture(scope="module")
def run(token_stores, tmp_path_factory):
    """One fine-tuning run (3 epochs) with the three stores re-embedded."""
    from npos.synthesize import SynthesisConfig
    from npos.train_head import HeadConfig

    out = tmp_path_factory.mktemp("ft") / "out"
    config = HeadConfig(epochs=3, batch_size=16, lr=1e-3, queue=16, head="mlp", seed=0,
                        synthesis=SynthesisConfig(k=4, select=8, pick=2, candidates=16, keep=2))
    result = finetune(token_stores["train"], str(out), model="npos-tiny", head_config=config,
                      config=FinetuneConfig(window_rows=32),
                      embed={"train": token_stores["train"], "test": token_stores["test"],
                             "ood": token_stores["ood"]}, device="cpu")
    return result, config


def test_short_run_lowers_the_training_loss(run):
    result, config = run
    history = result.history
    assert [h["epoch"] for h in history] == [1, 2, 3]
    total = [h["id_loss"] + config.ood_weight * (h["outlier_loss"] or 0.0) for h in history]
    assert total[-1] < total[0]
    assert history[-1]["id_loss"] < history[0]["id_loss"]
    assert any(h["synth_steps"] > 0 for h in history)        # online synthesis ran
    assert all(h["samples_per_s"] > 0 for h in history)


def test_outputs_are_loadable_and_the_tail_was_tuned(run, token_stores):
    from safetensors.torch import load_file

    result, _ = run
    out = result.out_dir
    tuned = load_file(f"{out}/tail.safetensors")
    original = VisionTail(create_encoder("npos-tiny").visual, 1).state_dict()
    assert set(tuned) == set(original)
    assert not any(k.startswith("visual.transformer.resblocks.0.") for k in tuned)
    assert all(t.dtype == torch.float32 for t in tuned.values())
    assert any(not torch.equal(tuned[k], original[k]) for k in tuned)   # it trained

    tail, desc = load_tail(out)
    assert desc == read_tail_config(out) == result.tail
    assert desc["token_layer"] == 1 and desc["model"] == "npos-tiny"
    assert desc["pretrained"] == "none"
    assert desc["fingerprint"]["pretrained"] == f"none+finetune:{desc['sha256']}"

    head = load_head(result.head_dir)
    assert head.config["fingerprint"] == desc["fingerprint"]
    assert head.config["finetune"]["sha256"] == desc["sha256"]
    assert head.class_names == ["blue", "green", "red"]        # folder order
    assert not Path(out, "train.partial").exists()


def test_reembedded_stores_are_normal_stores_of_the_tuned_encoder(run, token_stores):
    from click.testing import CliRunner

    from npos.cli import cli

    result, _ = run
    tail, desc = load_tail(result.out_dir)
    for name in ("train", "test", "ood"):
        source = FeatureStore.open(token_stores[name])
        store = FeatureStore.open(result.stores[name])
        assert result.stores[name].endswith(f"{name}.zarr")
        assert (store.n_rows, store.dim, store.dtype) == (source.n_rows, 32, source.dtype)
        assert store.verify() == []
        assert CliRunner().invoke(cli, ["store", "verify", store.url]).exit_code == 0
        assert store.fingerprint() == desc["fingerprint"]
        assert store.attrs["token_layer"] is None and not store.has("tokens")
        assert store.attrs["source"] == source.attrs["source"]
        assert store.class_names == source.class_names
        for array in ("labels", "ids", "valid"):
            np.testing.assert_array_equal(store.array(array)[:], source.array(array)[:])
        valid = np.asarray(source.array("valid")[:])
        emb = np.asarray(store.array("embeddings")[:])
        assert np.isnan(emb[~valid]).all() and np.isfinite(emb[valid]).all()
        with torch.no_grad():
            expected = tail(torch.from_numpy(np.asarray(source.array("tokens")[:])[valid]))
        np.testing.assert_allclose(emb[valid], expected.numpy(), rtol=1e-5, atol=1e-5)
        # The tuned encoder is another encoder: its embeddings moved.
        assert not np.allclose(emb[valid], source.read("embeddings"), atol=1e-3)
    test = FeatureStore.open(result.stores["test"])
    np.testing.assert_array_equal(test.read_extra("text_embeddings"),
                                  FeatureStore.open(token_stores["test"]).read_extra(
                                      "text_embeddings"))


def test_the_head_accepts_reembedded_stores_and_refuses_the_originals(run, token_stores):
    result, _ = run
    head = load_head(result.head_dir)
    for name in ("test", "ood"):
        head.check_store(FeatureStore.open(result.stores[name]))
        with pytest.raises(IncompatibleStoreError, match="pretrained is 'none\\+finetune:sha256"):
            head.check_store(FeatureStore.open(token_stores[name]))
    # Scoring the re-embedded ID test set with the head and its classifier works and the
    # tuned classifier fits the (training-like) ID test images.
    test = FeatureStore.open(result.stores["test"])
    out = head.score(test.read("embeddings", as_torch=True))
    assert out["logits"].shape == (24, 3) and out["ood_logit"].shape == (24,)
    accuracy = (out["logits"].argmax(1).numpy() == test.read("labels")).mean()
    assert accuracy > 0.6


def test_evaluate_runs_on_the_reembedded_stores(run, token_stores):
    evaluation = pytest.importorskip("npos.evaluate")
    if not hasattr(evaluation, "evaluate"):
        pytest.skip("the evaluate stage is not in this checkout")
    result, _ = run
    report = evaluation.evaluate(result.stores["test"], {"grey": result.stores["ood"]},
                                 head=result.head_dir, scores="mcm,head", device="cpu")
    for score in ("mcm", "head"):
        assert 0.0 <= report.metrics[score]["grey"]["auroc"] <= 1.0
    assert report.id_accuracy is not None and report.id_accuracy > 0.6
    with pytest.raises(IncompatibleStoreError, match="pretrained"):
        evaluation.evaluate(token_stores["test"], {"grey": token_stores["ood"]},
                            head=result.head_dir, device="cpu")


def test_resume_fills_missing_chunks_without_training_again(run, token_stores, tmp_path):
    result, config = run
    out = tmp_path / "copy"
    shutil.copytree(result.out_dir, out)
    store = FeatureStore.open(str(out / "test.zarr"), mode="r+")
    before = np.asarray(store.array("embeddings")[:])
    store._group["done"][1] = False                          # as if killed while writing
    store.array("embeddings")[16:] = np.nan
    sha = read_tail_config(out)["sha256"]
    again = finetune(token_stores["train"], str(out), model="npos-tiny", head_config=config,
                     config=FinetuneConfig(window_rows=32),
                     embed={"test": token_stores["test"]}, device="cpu", resume=True)
    assert again.resumed_from == config.epochs and again.history == result.history
    assert read_tail_config(out)["sha256"] == sha
    np.testing.assert_array_equal(np.asarray(FeatureStore.open(again.stores["test"])
                                             .array("embeddings")[:]), before)


@pytest.mark.slow
def test_an_interrupted_run_resumes_to_the_same_result(token_stores, head_config, tmp_path,
                                                       monkeypatch):
    import npos.finetune.training as training

    config = head_config(epochs=2)
    kwargs = dict(model="npos-tiny", head_config=config, device="cpu")
    whole = finetune(token_stores["train"], str(tmp_path / "whole"), **kwargs)

    real = training.run_epoch
    calls = []

    def dies_in_epoch_two(*args, **kw):
        calls.append(kw["epoch"])
        if kw["epoch"] == 1:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(training, "run_epoch", dies_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        finetune(token_stores["train"], str(tmp_path / "cut"), **kwargs)
    assert (tmp_path / "cut" / "train.partial").is_dir()
    assert not (tmp_path / "cut" / "tail.safetensors").exists()
    with pytest.raises(FileExistsError, match="pass --overwrite to replace, or --resume"):
        finetune(token_stores["train"], str(tmp_path / "cut"), **kwargs)
    monkeypatch.setattr(training, "run_epoch", real)
    resumed = finetune(token_stores["train"], str(tmp_path / "cut"), resume=True, **kwargs)
    assert resumed.resumed_from == 1
    assert resumed.tail["sha256"] == whole.tail["sha256"]
    assert [h["id_loss"] for h in resumed.history] == [h["id_loss"] for h in whole.history]
    assert not (tmp_path / "cut" / "train.partial").exists()
    shutil.rmtree(tmp_path / "cut" / "head")
    with pytest.raises(NposError, match=r"other settings \(head_config differ\)"):
        finetune(token_stores["train"], str(tmp_path / "cut"), resume=True,
                 **{**kwargs, "head_config": head_config(epochs=2, lr=5e-4)})


def test_existing_outputs_need_overwrite(run, token_stores, head_config, tmp_path):
    out = tmp_path / "out"
    (out / "test.zarr").mkdir(parents=True)
    kwargs = dict(model="npos-tiny", head_config=head_config(epochs=1), device="cpu",
                  embed={"test": token_stores["test"]})
    with pytest.raises(FileExistsError, match=r"test.zarr' already exist"):
        finetune(token_stores["train"], str(out), **kwargs)
    done = finetune(token_stores["train"], str(out), overwrite=True, **kwargs)
    assert FeatureStore.open(done.stores["test"]).verify() == []


def test_inputs_are_checked_before_anything_is_written(token_stores, head_config, tmp_path,
                                                       make_store, rng):
    out = tmp_path / "never"
    ok = dict(model="npos-tiny", head_config=head_config(), device="cpu")
    with pytest.raises(IncompatibleStoreError, match=r"--embed store 'sun'.*token_layer is 2"):
        finetune(token_stores["train"], str(out), embed={"sun": token_stores["ood_layer2"]}, **ok)
    plain = make_store(tmp_path / "plain.zarr", rng.normal(size=(8, 32)), np.arange(8) % 2)
    with pytest.raises(StoreError, match="has no tokens; extract it with --tokens-layer"):
        finetune(plain.url, str(out), **ok)
    with pytest.raises(StoreError, match="has no tokens"):
        finetune(token_stores["train"], str(out), embed={"x": plain.url}, **ok)
    ckpt = tmp_path / "tiny.pt"
    torch.save(create_encoder("npos-tiny").state_dict(), ckpt)
    with pytest.raises(IncompatibleStoreError,
                       match=r"holds tokens of model 'npos-tiny' with weights 'none', not of "
                             r"'npos-tiny' with weights 'sha256:"):
        finetune(token_stores["train"], str(out), **{**ok, "pretrained": str(ckpt)})
    with pytest.raises(ParameterError, match="no loss reaches the tail"):
        finetune(token_stores["train"], str(out),
                 **{**ok, "head_config": head_config(id_loss="none")})
    with pytest.raises(ParameterError, match="fewer than queue=100"):
        finetune(token_stores["train"], str(out), **{**ok, "head_config": head_config(queue=100)})
    with pytest.raises(StoreError, match="no labeled rows"):
        finetune(token_stores["ood"], str(out), **ok)
    assert not out.exists()


def test_embed_specs_are_parsed_and_checked():
    assert parse_embed_specs(["a=x.zarr", "b.1=s3://b/y"]) == {"a": "x.zarr", "b.1": "s3://b/y"}
    with pytest.raises(ParameterError, match="NAME=STORE"):
        parse_embed_specs(["x.zarr"])
    with pytest.raises(ParameterError, match="given twice"):
        parse_embed_specs(["a=x", "a=y"])
    for bad in ("head=x", "../a=x", "a/b=x"):
        with pytest.raises(ParameterError, match="must be letters"):
            parse_embed_specs([bad])
