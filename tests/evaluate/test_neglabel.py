"""neglabel / csp: formulas against a plain numpy reference, a generated semantic world,
text-bank wiring (encoder refusal), fusion and calibrated thresholds."""

from __future__ import annotations

import json

import numpy as np
import pytest

from npos.errors import IncompatibleStoreError, ParameterError
from npos.evaluate import ScoringConfig, evaluate, score_store
from npos.evaluate.calibration import is_ood, threshold_at_tpr
from npos.evaluate.detectors.neglabel import grouped_id_mass, mine_negatives, \
    negative_groups, word_quantiles
from npos.evaluate.fusion import rank_normalize
from npos.textbank import import_text_bank


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference_selection(class_text, words, pos, quantile, fraction, count):
    q = [np.quantile([float(w @ c) for c in class_text], quantile) for w in words]
    chosen = []
    for tag in sorted(set(pos)):
        members = sorted((q[i], i) for i in range(len(words)) if pos[i] == tag)
        chosen += members[:int(np.floor(fraction * len(members)))]
    return [i for _, i in sorted(chosen)[:count]]


def reference_score(z, class_text, negatives, groups, temperature):
    out = []
    for row in unit(z):
        ids = sum(np.exp(row @ c / temperature) for c in class_text)
        out.append(np.mean([ids / (ids + sum(np.exp(row @ negatives[j] / temperature)
                                              for j in g)) for g in groups]))
    return np.array(out)


def test_selection_grouping_and_score_equal_numpy_reference():
    rng = np.random.default_rng(0)
    class_text, words = unit(rng.normal(size=(7, 12))), unit(rng.normal(size=(90, 12)))
    words[10] = words[11] = words[3]  # ties: broken by row order
    pos = rng.integers(0, 2, 90)
    q = word_quantiles(class_text, words, 0.95)
    chosen = mine_negatives(q, pos, fraction=0.3, count=20)
    assert chosen.tolist() == reference_selection(class_text, words, pos, 0.95, 0.3, 20)
    groups = negative_groups(len(chosen), 6, seed=3)
    assert sorted(np.concatenate(groups).tolist()) == list(range(20))
    assert [len(g) for g in groups] == [4, 4, 3, 3, 3, 3]
    assert all((a == b).all() for a, b in zip(groups, negative_groups(20, 6, seed=3)))
    assert any((a != b).any() for a, b in zip(groups, negative_groups(20, 6, seed=4)))
    z = rng.normal(size=(15, 12))
    for t in (0.01, 0.5):
        got = grouped_id_mass(z, class_text, words[chosen], groups, temperature=t)
        np.testing.assert_allclose(got, reference_score(z, class_text, words[chosen], groups, t),
                                   rtol=1e-5)
    with pytest.raises(ParameterError, match="--neg-groups 30 is more than the 20"):
        negative_groups(20, 30, seed=0)


def semantic_world(tmp_path, make_store, *, ood_near_id: bool):
    """ID images near ID class words, OOD images near other corpus words (or near ID words)."""
    rng = np.random.default_rng(5)
    dim, n_classes = 64, 10
    vocab = unit(rng.normal(size=(400, dim)))
    class_text, corpus = vocab[:n_classes], vocab[n_classes:]

    def near(dirs, n, noise):
        rows = dirs[rng.integers(0, len(dirs), n)]
        return unit(rows + noise * rng.normal(size=(n, dim)) / np.sqrt(dim))

    # Each image mixes a concept with a random ID class, so the ID cosines alone are noisy.
    id_z = unit(near(class_text, 300, 2.0) + 0.6 * near(class_text, 300, 0.0))
    ood_dirs = class_text if ood_near_id else corpus
    ood_z = unit(near(ood_dirs, 300, 2.0) + 0.6 * near(class_text, 300, 0.0))
    labels = rng.integers(0, n_classes, 300)
    make_store(tmp_path / "id.zarr", id_z, labels, text_embeddings=class_text, chunk_rows=100)
    make_store(tmp_path / "ood.zarr", ood_z, chunk_rows=100)
    words = tmp_path / "words.txt"
    words.write_text("".join(f"w{i}\t{'n' if i % 3 else 'a'}\n" for i in range(len(corpus))))
    np.save(tmp_path / "bank.npy", corpus)
    import_text_bank(tmp_path / "bank.npy", words, str(tmp_path / "bank.zarr"),
                     model="test-model").close()
    return str(tmp_path / "id.zarr"), str(tmp_path / "ood.zarr"), str(tmp_path / "bank.zarr")


@pytest.mark.parametrize("ood_near_id", [False, True])
def test_semantic_world_neglabel_vs_mcm(tmp_path, make_store, ood_near_id):
    id_url, ood_url, bank = semantic_world(tmp_path, make_store, ood_near_id=ood_near_id)
    config = ScoringConfig(scores="mcm,neglabel,csp", text_bank=bank, neg_count=200,
                           neg_groups=10, device="cpu")
    result = evaluate(id_url, {"ood": ood_url}, config)
    mcm, neg = result.metrics["mcm"]["ood"], result.metrics["neglabel"]["ood"]
    if ood_near_id:
        assert neg["auroc"] < 0.65 and neg["auroc"] <= mcm["auroc"] + 0.05
    else:
        assert neg["auroc"] > mcm["auroc"] + 0.05 and neg["fpr95"] < mcm["fpr95"]
        facts = result.settings["detectors"]["neglabel"]
        assert facts["negatives"] == len(facts["negative_ids"]) == 58  # floor(.15 n) per pos
        assert result.metrics["csp"]["ood"]["auroc"] > 0.5


def test_text_bank_from_another_encoder_is_refused(tmp_path, make_store):
    id_url, ood_url, _ = semantic_world(tmp_path, make_store, ood_near_id=False)
    np.save(tmp_path / "e.npy", unit(np.ones((3, 64))))
    (tmp_path / "w.txt").write_text("a\nb\nc\n")
    other = str(tmp_path / "other.zarr")
    import_text_bank(tmp_path / "e.npy", tmp_path / "w.txt", other, model="other").close()
    with pytest.raises(IncompatibleStoreError, match="text bank .* does not match ID store"):
        evaluate(id_url, {"ood": ood_url}, ScoringConfig(scores="neglabel", text_bank=other,
                                                         neg_groups=1, device="cpu"))
    with pytest.raises(ParameterError, match="need a text bank: pass --text-bank"):
        evaluate(id_url, {"ood": ood_url}, ScoringConfig(scores="neglabel", device="cpu"))


def test_fusion_is_the_mean_of_rank_normalized_components(tmp_path, make_store):
    id_url, ood_url, bank = semantic_world(tmp_path, make_store, ood_near_id=False)
    config = ScoringConfig(scores="mcm,neglabel,mcm+neglabel", text_bank=bank, neg_count=200,
                           neg_groups=10, device="cpu")
    result = evaluate(id_url, {"ood": ood_url}, config)
    ref = {k: np.sort(result.id_scores[k]) for k in ("mcm", "neglabel")}
    ood = result.ood_scores
    want = (rank_normalize(ood["mcm"]["ood"], ref["mcm"])
            + rank_normalize(ood["neglabel"]["ood"], ref["neglabel"])) / 2
    np.testing.assert_allclose(ood["mcm+neglabel"]["ood"], want)
    assert rank_normalize(np.array([1.0, 2.0, 5.0]), np.array([1.0, 2.0, 3.0, 4.0])).tolist() \
        == [0.125, 0.375, 1.0]
    with pytest.raises(ParameterError, match="needs two or more different scores"):
        ScoringConfig(scores="mcm+mcm")
    with pytest.raises(ParameterError, match="unknown score"):
        ScoringConfig(scores="mcm+nope")


def test_threshold_keeps_requested_tpr_and_is_ood_agrees(tmp_path, make_store):
    rng = np.random.default_rng(2)
    for n in (1, 7, 100, 1001):
        s = np.round(rng.normal(size=n), 1)  # many ties
        for tpr in (0.5, 0.9, 0.95, 1.0):
            t = threshold_at_tpr(s, tpr)
            assert np.mean(s >= t) >= tpr and (s > t).mean() < tpr or (s >= t).all()
    id_url, ood_url, bank = semantic_world(tmp_path, make_store, ood_near_id=False)
    from npos.evaluate.calibration import calibrate, write_thresholds

    config = ScoringConfig(scores="neglabel,mcm", text_bank=bank, neg_count=200,
                           neg_groups=10, device="cpu")
    record = calibrate(id_url, config, tpr=0.9)
    assert record["id_tpr"]["neglabel"] >= 0.9 and record["id_tpr"]["mcm"] >= 0.9
    write_thresholds(record, tmp_path / "t.json")
    out = tmp_path / "s.csv"
    score_store(id_url, out, config, threshold=str(tmp_path / "t.json"))
    import csv

    rows = list(csv.DictReader(open(out)))
    t = record["thresholds"]["neglabel"]
    assert all(float(r["is_ood"]) == float(float(r["neglabel"]) < t) for r in rows)
    assert np.mean([float(r["is_ood"]) == 0 for r in rows]) >= 0.9
    settings = json.loads((tmp_path / "s.csv.json").read_text())
    assert settings["threshold"] == {"score": "neglabel", "value": t}
    np.testing.assert_array_equal(is_ood(np.array([0.0, 1.0, np.nan]), 0.5), [1.0, 0.0, np.nan])
    result = evaluate(id_url, {"ood": ood_url}, config, threshold=str(tmp_path / "t.json"))
    assert result.settings["threshold"]["id_tpr"] >= 0.9


def test_csp_pool_takes_conjugated_rows_and_excludes_id_synonyms():
    from types import SimpleNamespace

    from npos.evaluate.detectors import CSPScore, NegLabelScore

    rng = np.random.default_rng(4)
    class_text = unit(rng.normal(size=(4, 8)))
    words = unit(rng.normal(size=(30, 8)))
    words[0] = class_text[2]  # a synonym of an ID class (cosine 1)
    bank = SimpleNamespace(embeddings=words, pos=np.repeat([0, 1, 2], 10),
                           ids=[f"w{i}" for i in range(30)], url="mem")
    config = ScoringConfig(neg_count=100, neg_groups=2, neg_fraction=1.0, csp_threshold=0.9)
    neg = NegLabelScore.from_config(config, device="cpu")
    csp = CSPScore.from_config(config, device="cpu")
    assert neg.exclude_above is None and csp.exclude_above == 0.9
    neg.attach(class_text=class_text, bank=bank)
    csp.attach(class_text=class_text, bank=bank)
    assert sorted(neg.negative_ids_) == sorted(f"w{i}" for i in range(20))
    assert sorted(csp.negative_ids_) == sorted(f"w{i}" for i in range(1, 30))
    z = rng.normal(size=(5, 8))
    chosen = [int(i[1:]) for i in csp.negative_ids_]
    np.testing.assert_allclose(csp.score(z), reference_score(z, class_text, words[chosen],
                                                            csp.groups_, 0.01), rtol=1e-5)
