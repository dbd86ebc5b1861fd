"""Does outlier synthesis help? Head/MCM/KNN OOD scores of trained heads vs. baselines.

Two feature benchmarks, both as plain feature stores (nothing here is CLIP):

* ``world`` — :func:`benchmarks.feature_world.make_feature_world` at D=512: curved,
  multi-modal classes crowded into a 16-dim subspace, CLIP-like raw norms and text
  embeddings; OOD = held-out classes of the same family and ID points pushed off their arc.
* ``digits`` — scikit-learn's 8x8 digits as raw 64-dim pixel vectors: digits 0-5 are ID
  (2/3 train, 1/3 test), digits 6-9 are OOD; no text embeddings (learned prototypes).

Variants (every one trained with the same seeds, epochs and synthesis sizes):

* ``knn-frozen`` — no training: K-th-NN distance on the frozen embeddings (and the
  untrained classifier's MCM);
* ``ablation`` — ``--ood-weight 0``: the projection/classifier only (no synthesis); its
  "head" column is the RBF head as initialized (centres at class samples), never trained;
* ``npos-mlp``/``npos-rbf`` — NPOS synthesis with either head;
* ``gaussian``/``vos`` — the controls of the synthesis engine (rbf head);
* ``no-detach`` — the head's gradient flows into the projection;
* ``raw-noise`` — noise on raw embeddings (``--noise-space raw``, the paper's sigma 0.1);
* ``head-only`` — ``--id-loss none``: projection kept at identity, only the head trains;
* ``pick-1`` — 2 outliers per class and step instead of 6 (``--pick 1``);
* ``sigma-0.1`` — ``sphere`` noise with sigma 0.1 instead of the default 0.01.

Scores (higher = more ID): ``head`` (the OOD head's logit), ``mcm`` (max softmax of the
cosine logits at T=1, as in MCM), ``knn`` (minus the distance to the K-th nearest
normalized projected training embedding, K=10). Metrics: AUROC and FPR at 95% TPR per OOD
set, averaged over seeds (mean ± std).

Usage::

    python -m benchmarks.head_study                       # everything, 3 seeds
    python -m benchmarks.head_study --datasets digits --variants ablation npos-rbf \
        --set epochs=20 --set synthesis.sigma=0.05 --seeds 0

``--set`` overrides a :class:`~npos.train_head.HeadConfig` field (``synthesis.x`` for the
engine's) in every trained variant; ``--markdown FILE`` writes the tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from benchmarks.feature_world import FeatureWorld, make_feature_world, write_world
from npos.synthesize import SynthesisConfig
from npos.train_head import HeadConfig, HeadModel, load_head, train_head

KNN_K = 10

# Per dataset: the world of a benchmark and the base config its variants start from. The
# synthesis sizes follow the paper's ratios to the queue (K = 0.4 Q, select = 0.3 Q).
BASE = {
    "world": HeadConfig(epochs=20, batch_size=256, queue=300,
                        synthesis=SynthesisConfig(k=120, select=90, pick=3, candidates=200,
                                                  keep=2)),
    "digits": HeadConfig(epochs=40, batch_size=128, queue=100,
                         synthesis=SynthesisConfig(k=40, select=30, pick=3, candidates=200,
                                                   keep=2)),
}

VARIANTS: dict[str, dict | None] = {
    "knn-frozen": None,
    "ablation": {"ood_weight": 0.0},
    "npos-mlp": {"head": "mlp"},
    "npos-rbf": {"head": "rbf"},
    "gaussian": {"head": "rbf", "synthesis.method": "gaussian"},
    "vos": {"head": "rbf", "synthesis.method": "vos"},
    "no-detach": {"head": "rbf", "detach_head": False},
    "raw-noise": {"head": "rbf", "synthesis.noise_space": "raw"},
    "head-only": {"head": "rbf", "id_loss": "none"},
    "pick-1": {"head": "rbf", "synthesis.pick": 1},
    "sigma-0.1": {"head": "rbf", "synthesis.sigma": 0.1},
}


def digits_world(seed: int = 0) -> FeatureWorld:
    """scikit-learn digits as raw pixel "embeddings": 0-5 ID, 6-9 OOD."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    id_rows = y < 6
    x_tr, x_te, y_tr, y_te = train_test_split(x[id_rows], y[id_rows], test_size=1 / 3,
                                              stratify=y[id_rows], random_state=seed)
    return FeatureWorld(train=x_tr, train_labels=y_tr.astype(np.int32), test=x_te,
                        test_labels=y_te.astype(np.int32), ood={"digits 6-9": x[~id_rows]},
                        text_embeddings=np.zeros((6, 64), np.float32),
                        class_names=[str(d) for d in range(6)])


def make_dataset(name: str) -> tuple[FeatureWorld, bool]:
    """(world, has_text)."""
    if name == "world":
        return make_feature_world(n_classes=10, n_heldout=5, dim=512, subspace=16,
                                  n_train=400, n_test=200, spread=0.6, thickness=0.12,
                                  ambient_noise=0.6, seed=0), True
    return digits_world(), False


def apply_overrides(config: HeadConfig, overrides: dict) -> HeadConfig:
    top = {k: v for k, v in overrides.items() if not k.startswith("synthesis.")}
    synth = {k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith("synthesis.")}
    if synth:
        top["synthesis"] = dataclasses.replace(config.synthesis, **synth)
    return dataclasses.replace(config, **top)


def fpr_at_95_tpr(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """Fraction of OOD scored at or above the highest threshold keeping >= 95% of ID."""
    s = np.sort(id_scores)
    threshold = s[len(s) - int(np.ceil(0.95 * len(s)))]
    return float(np.mean(ood_scores >= threshold))


def auroc(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    y = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    return float(roc_auc_score(y, np.r_[id_scores, ood_scores]))


def knn_scores(queries: torch.Tensor, bank: torch.Tensor, k: int) -> np.ndarray:
    """Minus the distance to the k-th nearest normalized bank point (higher = more ID)."""
    q = torch.nn.functional.normalize(queries, dim=1)
    b = torch.nn.functional.normalize(bank, dim=1)
    out = []
    for start in range(0, q.shape[0], 4096):
        sim = q[start:start + 4096] @ b.T
        out.append(-(2 - 2 * sim.topk(k, dim=1).values[:, -1]).clamp_min(0).sqrt())
    return torch.cat(out).numpy()


@torch.no_grad()
def evaluate(head, world: FeatureWorld) -> dict:
    """Per OOD set: AUROC / FPR95 of head, mcm and knn; plus ID accuracy."""
    def outputs(x):
        z = torch.from_numpy(x)
        h = head.project(z)
        cos = head.classifier.cosines(h)
        return h, torch.softmax(cos, dim=1).max(1).values.numpy(), head.head(h).numpy(), cos

    bank = head.project(torch.from_numpy(world.train))
    h_id, mcm_id, head_id, cos_id = outputs(world.test)
    knn_id = knn_scores(h_id, bank, KNN_K)
    result = {"accuracy": float((cos_id.argmax(1).numpy() == world.test_labels).mean())}
    for name, x in world.ood.items():
        h_o, mcm_o, head_o, _ = outputs(x)
        knn_o = knn_scores(h_o, bank, KNN_K)
        for score, (a, b) in {"head": (head_id, head_o), "mcm": (mcm_id, mcm_o),
                              "knn": (knn_id, knn_o)}.items():
            result[f"{name}/{score}/auroc"] = auroc(a, b)
            result[f"{name}/{score}/fpr95"] = fpr_at_95_tpr(a, b)
    return result


def frozen_head(world: FeatureWorld, has_text: bool) -> HeadModel:
    """No training: identity projection, classifier = text embeddings or class means."""
    z = torch.nn.functional.normalize(torch.from_numpy(world.train), dim=1)
    y = torch.from_numpy(world.train_labels).long()
    weight = (torch.from_numpy(world.text_embeddings) if has_text else
              torch.stack([z[y == c].mean(0) for c in range(len(world.class_names))]))
    return HeadModel(weight).eval()


def run(datasets, variants, seeds, overrides, workdir: Path) -> dict:
    results: dict = {}
    for ds in datasets:
        world, has_text = make_dataset(ds)
        urls = write_world(world, workdir / ds, text=has_text, model=f"study-{ds}")
        base = apply_overrides(BASE[ds], overrides)
        for variant in variants:
            spec = VARIANTS[variant]
            runs = []
            for seed in seeds:
                out = workdir / f"{ds}-{variant}-{seed}"
                started = time.perf_counter()
                if spec is None:
                    head = frozen_head(world, has_text)
                else:
                    config = apply_overrides(dataclasses.replace(base, seed=seed), spec)
                    train_head(urls["train"], str(out), config)
                    head = load_head(out)
                seconds = time.perf_counter() - started
                metrics = evaluate(head, world)
                # The frozen baseline has no head. The ablation's head is reported: it is the
                # initialized, never trained RBF head (what training on outliers starts from).
                if spec is None:
                    metrics = {k: v for k, v in metrics.items() if "/head/" not in k}
                metrics["seconds"] = seconds
                runs.append(metrics)
            keys = runs[0].keys()
            results.setdefault(ds, {})[variant] = {
                k: (float(np.mean([r[k] for r in runs])), float(np.std([r[k] for r in runs])))
                for k in keys}
            print(f"{ds:7s} {variant:12s} " + summary_line(results[ds][variant]), flush=True)
        results[ds]["_config"] = dataclasses.asdict(base)
        results[ds]["_ood_sets"] = list(world.ood)
    return results


def summary_line(metrics: dict) -> str:
    parts = [f"acc {metrics['accuracy'][0]:.3f}"]
    for key, (mean, _) in metrics.items():
        if key.endswith("/auroc"):
            parts.append(f"{key.rsplit('/', 1)[0]} {mean:.3f}")
    return "  ".join(parts)


def markdown(results: dict, seeds) -> str:
    lines = []
    for ds, table in results.items():
        sets = table["_ood_sets"]
        lines.append(f"### {ds} ({len(seeds)} seed(s); AUROC ↑ / FPR95 ↓, mean over seeds)\n")
        header = "| variant | ID acc | " + " | ".join(
            f"{s} {score}" for s in sets for score in ("head", "mcm", "knn")) + " |"
        lines.append(header)
        lines.append("|" + "---|" * (2 + 3 * len(sets)))
        for variant, m in table.items():
            if variant.startswith("_"):
                continue
            cells = [variant, f"{m['accuracy'][0]:.3f}"]
            for s in sets:
                for score in ("head", "mcm", "knn"):
                    key = f"{s}/{score}"
                    if f"{key}/auroc" not in m:
                        cells.append("—")
                        continue
                    a, sd = m[f"{key}/auroc"]
                    f, _ = m[f"{key}/fpr95"]
                    cells.append(f"{a:.3f}±{sd:.3f} / {f:.2f}" if len(seeds) > 1
                                 else f"{a:.3f} / {f:.2f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["world", "digits"],
                        choices=["world", "digits"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a HeadConfig field in every trained variant")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 avoids thread oversubscription on a shared box)")
    parser.add_argument("--json", help="write the raw results here")
    parser.add_argument("--markdown", help="write the tables here")
    args = parser.parse_args(argv)
    overrides = {k: parse_value(v) for k, v in (s.split("=", 1) for s in args.set)}
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results = run(args.datasets, args.variants, args.seeds, overrides, Path(tmp))
    print(f"total {time.perf_counter() - started:.0f}s on {platform.processor() or 'cpu'}, "
          f"{args.threads} thread(s), python {sys.version.split()[0]}")
    table = markdown(results, args.seeds)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    if args.markdown:
        Path(args.markdown).write_text(table)


if __name__ == "__main__":
    main()
