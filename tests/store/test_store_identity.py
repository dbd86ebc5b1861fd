"""`store import --model/--pretrained` records the encoder; stores of unknown encoder combine
only with each other (with a warning), never with a store of a known encoder."""

import warnings

import numpy as np
import pytest
from click.testing import CliRunner

from npos.cli import cli
from npos.errors import IncompatibleStoreError
from npos.evaluate import evaluate
from npos.store import FeatureStore, import_embeddings


@pytest.fixture
def arrays(tmp_path):
    """Three generated splits as .npy files: labeled train/test (3 classes), unlabeled ood."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 8)) * 3
    paths = {}
    for split, n in (("train", 60), ("test", 30), ("ood", 20)):
        y = rng.integers(0, 3, n)
        z = centers[y] + rng.normal(size=(n, 8)) if split != "ood" else rng.normal(size=(n, 8))
        np.save(tmp_path / f"{split}.npy", z.astype(np.float32))
        np.save(tmp_path / f"{split}_y.npy", y.astype(np.int64))
        paths[split] = tmp_path / f"{split}.npy"
        paths[f"{split}_y"] = tmp_path / f"{split}_y.npy"
    return paths


def _import(tmp_path, arrays, split, *extra):
    out = str(tmp_path / f"{split}-{len(extra)}.zarr")
    args = ["store", "import", "--embeddings", str(arrays[split]), "--out", out, *extra]
    if split != "ood":
        args += ["--labels", str(arrays[f"{split}_y"])]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return out


def test_import_records_the_encoder_or_unknown(tmp_path, arrays):
    unknown = FeatureStore.open(_import(tmp_path, arrays, "train"))
    assert unknown.attrs["model"] == "unknown" and unknown.attrs["pretrained"] is None
    known = FeatureStore.open(_import(tmp_path, arrays, "test", "--model", "ViT-B-16",
                                      "--pretrained", "openai"))
    assert (known.attrs["model"], known.attrs["pretrained"]) == ("ViT-B-16", "openai")


def test_pretrained_needs_model(tmp_path, arrays):
    result = CliRunner().invoke(cli, ["store", "import", "--embeddings", str(arrays["ood"]),
                                      "--pretrained", "openai", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].endswith(
        "--pretrained needs --model: name the encoder the weights belong to")
    assert not (tmp_path / "x").exists()


def test_two_unknown_stores_combine_with_one_warning_each(tmp_path, arrays):
    train = _import(tmp_path, arrays, "train")
    test = _import(tmp_path, arrays, "test")
    ood = _import(tmp_path, arrays, "ood")
    with pytest.warns(UserWarning, match="both of unknown encoder") as caught:
        result = evaluate(test, {"ood": ood}, scores="knn", train=train, device="cpu")
    assert all("\n" not in str(w.message) for w in caught)
    assert set(result.metrics) == {"knn"}
    # the same stores through the CLI: exit 0 with the warning (printed to stderr by Python)
    out = tmp_path / "report"
    with pytest.warns(UserWarning, match="both of unknown encoder"):
        cli_result = CliRunner().invoke(cli, ["evaluate", "--id", test, "--ood", f"ood={ood}",
                                              "--train", train, "--scores", "knn", "--device",
                                              "cpu", "--out", str(out)])
    assert cli_result.exit_code == 0, cli_result.output
    assert (out / "metrics.json").exists()


def test_unknown_is_never_combined_with_a_known_encoder(tmp_path, arrays):
    train = _import(tmp_path, arrays, "train")  # unknown
    test = _import(tmp_path, arrays, "test", "--model", "ViT-B-16")
    ood = _import(tmp_path, arrays, "ood")
    with pytest.raises(IncompatibleStoreError, match="encoder is unknown"):
        evaluate(test, {"ood": ood}, scores="knn", train=train, device="cpu")
    result = CliRunner().invoke(cli, ["evaluate", "--id", test, "--ood", f"ood={ood}",
                                      "--scores", "knn", "--train", train, "--device", "cpu",
                                      "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    message = result.output.strip().splitlines()
    assert len(message) == 1 and "unknown" in message[0] and "'ViT-B-16'" in message[0]
    assert not (tmp_path / "r").exists()


def test_known_encoders_must_agree_and_do_not_warn(tmp_path, arrays):
    a = FeatureStore.open(_import(tmp_path, arrays, "train", "--model", "ViT-B-16"))
    b = FeatureStore.open(_import(tmp_path, arrays, "test", "--model", "ViT-B-16"))
    c = FeatureStore.open(_import(tmp_path, arrays, "ood", "--model", "ViT-L-14"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a.check_compatible(b.fingerprint(), what="test store")
    with pytest.raises(IncompatibleStoreError, match="model is 'ViT-L-14' there but 'ViT-B-16'"):
        a.check_compatible(c.fingerprint(), what="OOD store")


def test_head_of_unknown_encoder_refuses_a_known_store(tmp_path, arrays):
    from npos.train_head import HeadConfig, train_head

    train = _import(tmp_path, arrays, "train")
    head = str(tmp_path / "head")
    train_head(train, head, HeadConfig(epochs=1, batch_size=30, ood_weight=0.0), device="cpu")
    known = import_embeddings(arrays["test"], str(tmp_path / "known.zarr"),
                              labels=arrays["test_y"], model="npos-tiny", pretrained="none")
    with pytest.raises(IncompatibleStoreError, match="encoder is unknown"):
        evaluate(known.url, {"ood": known.url}, scores="head", head=head, device="cpu")
    unknown = _import(tmp_path, arrays, "test")
    with pytest.warns(UserWarning, match="unknown encoder"):
        evaluate(unknown, {"ood": unknown}, scores="head", head=head, device="cpu")
