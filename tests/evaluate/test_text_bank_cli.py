"""`npos text-bank` (npos-tiny, end to end), `npos text-bank import`, `npos calibrate`, and
`npos evaluate/score --text-bank`, through the command line."""

from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner

from npos.cli import cli
from npos.store import FeatureStore
from npos.textbank import TextBank, load_corpus


def test_text_bank_tiny_end_to_end(tmp_path, make_store):
    runner = CliRunner()
    (tmp_path / "words.txt").write_text("dog\tn\tnoun.animal\ncat\tn\nred\ta\nsky\tn\n"
                                        "blue\ta\n")
    (tmp_path / "t.txt").write_text("a photo of a {}.\n")
    bank = str(tmp_path / "bank.zarr")
    args = ["text-bank", "--model", "npos-tiny", "--pretrained", "none", "--corpus",
            str(tmp_path / "words.txt"), "--templates", str(tmp_path / "t.txt"), "--out", bank,
            "--device", "cpu"]
    res = runner.invoke(cli, args)
    assert res.exit_code == 0, res.output
    tb = TextBank(bank)
    # 5 words + one conjugated (CSP) row per adjective
    assert tb.ids == ["dog.n", "cat.n", "red.a", "sky.n", "blue.a", "red.c", "blue.c"]
    assert tb.pos.tolist() == [0, 0, 1, 0, 1, 2, 2] and tb.lexnames[0] == "noun.animal"
    np.testing.assert_allclose(np.linalg.norm(tb.embeddings, axis=1), 1, rtol=1e-5)
    assert tb.attrs["kind"] == "text-bank"
    assert tb.fingerprint() == {"model": "npos-tiny", "pretrained": "none", "seed": 0,
                                "dim": tb.embeddings.shape[1]}
    assert runner.invoke(cli, args).exit_code == 0  # a re-run resumes (nothing missing)
    from npos.encoder import create_encoder
    from npos.extract.text import text_embeddings
    from npos.textbank.bank import _tokenizer

    clip = create_encoder("npos-tiny", "none")
    per = text_embeddings(clip, _tokenizer("npos-tiny"),
                          [f"red {s}" for s in tb.attrs["superclasses"]], ["a photo of a {}."])
    mean = per.mean(axis=0)
    np.testing.assert_allclose(tb.embeddings[5], mean / np.linalg.norm(mean), atol=1e-5)
    np.testing.assert_allclose(tb.embeddings[0], text_embeddings(
        clip, _tokenizer("npos-tiny"), ["dog"], ["a photo of a {}."])[0], atol=1e-5)

    # Image stores of the same encoder take it; another seed is refused in one line.
    dim = tb.embeddings.shape[1]
    rng = np.random.default_rng(0)
    ident = {"pretrained": "none", "seed": 0}
    for name in ("id", "ood"):
        make_store(tmp_path / f"{name}.zarr", rng.normal(size=(40, dim)),
                   rng.integers(0, 3, 40), model="npos-tiny", attrs=ident,
                   text_embeddings=rng.normal(size=(3, dim)), chunk_rows=20).close()
    evaluate = ["evaluate", "--id", str(tmp_path / "id.zarr"), "--ood",
                f"o={tmp_path / 'ood.zarr'}", "--scores", "mcm,neglabel,mcm+neglabel",
                "--text-bank", bank, "--neg-fraction", "1", "--neg-groups", "2",
                "--device", "cpu", "--out", str(tmp_path / "report")]
    res = runner.invoke(cli, evaluate)
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert set(metrics["scores"]) == {"mcm", "neglabel", "mcm+neglabel"}
    assert metrics["settings"]["detectors"]["neglabel"]["negative_ids"]
    make_store(tmp_path / "other.zarr", rng.normal(size=(40, dim)), model="npos-tiny",
               attrs={"pretrained": "none", "seed": 1}, chunk_rows=20).close()
    res = runner.invoke(cli, [*evaluate[:4], f"o={tmp_path / 'other.zarr'}", *evaluate[5:-1],
                              str(tmp_path / "r2")])
    assert res.exit_code == 2 and "does not match store" in res.output

    # calibrate -> score --threshold FILE writes is_ood
    neg = ["--scores", "neglabel", "--text-bank", bank, "--neg-groups", "1", "--neg-fraction",
           "1", "--device", "cpu"]
    res = runner.invoke(cli, ["calibrate", "--id", str(tmp_path / "id.zarr"), *neg, "--out",
                              str(tmp_path / "t.json")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["score", str(tmp_path / "ood.zarr"), *neg, "--threshold",
                              str(tmp_path / "t.json"), "--out", str(tmp_path / "s.zarr")])
    assert res.exit_code == 0, res.output
    assert FeatureStore.open(str(tmp_path / "s.zarr")).attrs["score_names"] == \
        ["neglabel", "is_ood"]


def test_text_bank_import_and_errors(tmp_path):
    runner = CliRunner()
    np.save(tmp_path / "e.npy", np.random.default_rng(0).normal(size=(3, 8)))
    (tmp_path / "w.txt").write_text("x\tn\ny\ta\tadj.all\nz\n")
    out = str(tmp_path / "b.zarr")
    res = runner.invoke(cli, ["text-bank", "import", "--embeddings", str(tmp_path / "e.npy"),
                              "--words", str(tmp_path / "w.txt"), "--model", "m", "--out", out])
    assert res.exit_code == 0, res.output
    tb = TextBank(out)
    assert tb.ids == ["x.n", "y.a", "z"] and tb.pos.tolist() == [0, 1, -1]
    assert tb.attrs["model"] == "m" and tb.attrs["kind"] == "text-bank"
    (tmp_path / "w2.txt").write_text("x\ny\n")
    res = runner.invoke(cli, ["text-bank", "import", "--embeddings", str(tmp_path / "e.npy"),
                              "--words", str(tmp_path / "w.txt"), "--pos", "a", "--out",
                              out + "4"])
    assert res.exit_code == 0, res.output
    assert TextBank(out + "4").pos.tolist() == [0, 1, 1]  # --pos fills only the bare word
    res = runner.invoke(cli, ["text-bank", "import", "--embeddings", str(tmp_path / "e.npy"),
                              "--words", str(tmp_path / "w2.txt"), "--out", out + "2"])
    assert res.exit_code == 2 and "has 2 words but --embeddings has 3 rows" in res.output
    res = runner.invoke(cli, ["text-bank", "--model", "npos-tiny", "--out", out + "3"])
    assert res.exit_code == 2 and "needs --pretrained" in res.output


def test_shipped_wordnet_corpus():
    corpus = load_corpus("wordnet")
    assert len(corpus) == 78489 and corpus.pos.count(0) == 57506
    row = corpus.ids().index("dog.n")
    assert corpus.lexnames[row] == "noun.animal"
    assert corpus.lexnames[corpus.ids().index("red.a")].startswith("adj.")
