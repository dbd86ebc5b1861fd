"""Evaluation reports: ``metrics.json``, ``report.md`` and PNG plots, written atomically.

Layout of ``REPORT_DIR``::

    metrics.json        {"id_accuracy": f|null, "scores": {SCORE: {OOD: {fpr95, auroc,
                         aupr_in, aupr_out}, ..., "average": {...}}},   (fractions)
                         "settings": {...}}   (EvaluationResult.settings: npos version,
                         resolved ScoringConfig, input store URLs, ...)
    report.md           settings, the main table, one table per score (percent, 2 decimals)
    plots/hist_SCORE.png  score histograms, ID against each OOD set
    plots/roc_SCORE.png   ROC curves of every OOD set

The folder is built in a temporary sibling and moved into place, so a failed run leaves
nothing half-written and an existing report is only replaced with ``overwrite``. One writer
at a time: the folder's :class:`~npos.store.lock.WriterLock` is taken by
:func:`check_report_dir` (before any work) and held until :func:`write_report` ends.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from npos.atomic import atomic_path, check_output
from npos.evaluate.evaluation import AVERAGE, EvaluationResult
from npos.evaluate.metrics import HIGHER_IS_BETTER, METRIC_KEYS, roc_curve
from npos.store.lock import WriterLock

METRIC_LABELS = {"fpr95": "FPR95", "auroc": "AUROC", "aupr_in": "AUPR-In",
                 "aupr_out": "AUPR-Out"}


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def _arrow(key: str) -> str:
    return "↑" if HIGHER_IS_BETTER[key] else "↓"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    """A pipe table with padded columns (reads well in a terminal too)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":"
                         for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def score_table(metrics: dict[str, dict[str, float]]) -> str:
    """One score's table: OOD sets as rows (average last), the four metrics in percent."""
    header = ["OOD set", *(f"{METRIC_LABELS[k]} {_arrow(k)}" for k in METRIC_KEYS)]
    names = [n for n in metrics if n != AVERAGE] + [AVERAGE]
    rows = [[f"**{n}**" if n == AVERAGE else n, *(_pct(metrics[n][k]) for k in METRIC_KEYS)]
            for n in names]
    return _markdown(header, rows)


def main_table(result: EvaluationResult) -> str:
    """Scores as rows; FPR95 and AUROC of every OOD set and their average (as the papers)."""
    first = next(iter(result.metrics.values()))
    sets = [n for n in first if n != AVERAGE] + [AVERAGE]
    header = ["score"]
    for n in sets:
        header += [f"{n} FPR95 ↓", f"{n} AUROC ↑"]
    rows = [[score, *(v for n in sets for v in (_pct(per[n]["fpr95"]), _pct(per[n]["auroc"])))]
            for score, per in result.metrics.items()]
    return _markdown(header, rows)


def render_markdown(result: EvaluationResult) -> str:
    """The text of ``report.md``."""
    s = result.settings
    lines = ["# OOD evaluation", ""]
    lines += [f"- ID store: `{s.get('id')}` ({s.get('rows', {}).get('id')} rows)"]
    for name, url in (s.get("ood") or {}).items():
        lines.append(f"- OOD `{name}`: `{url}` ({s.get('rows', {}).get(name)} rows)")
    skipped = s.get("skipped_invalid") or {}
    if any(skipped.values()):
        lines.append("- skipped (inputs that failed to load): " + ", ".join(
            f"{n} {'ID' if name == 'id' else repr(name)} rows"
            for name, n in skipped.items() if n))
    lines += [f"- encoder: `{s.get('model')}`, dim {s.get('dim')}",
              f"- space: {s.get('space')}" + (f" (head `{s['head']}`)" if s.get("head") else
                                              " (zero-shot: class text embeddings)"),
              f"- train store: `{s['train']}`" if s.get("train") else "- train store: none",
              f"- scores: {', '.join(result.metrics)} (higher = more in-distribution)"]
    scoring = s.get("config") or {}
    if s.get("npos_version"):
        lines.append(f"- npos {s['npos_version']}, device {scoring.get('device')}")
    if "mcm" in result.metrics:
        lines.append(f"- MCM temperature: {scoring.get('mcm_temperature')}")
    if "knn" in result.metrics:
        facts = (s.get("detectors") or {}).get("knn", {})
        backend, used = scoring.get("knn_backend"), facts.get("backend_used")
        line = f"- kNN: K = {scoring.get('knn_k')}, backend {backend}" + \
            (f" ({used})" if used and used != backend else "")
        if facts.get("recall") is not None:
            line += f", nprobe {facts['nprobe']}, measured recall@K {facts['recall']:.3f}"
        lines.append(line)
    acc = result.id_accuracy
    lines += ["", "ID accuracy: " + (f"{_pct(acc)} %" if acc is not None else
                                     "n/a (no labels, or no classifier over the ID classes)"),
              "", "All numbers are percentages. FPR95: false-positive rate on OOD at 95 % "
              "true-positive rate on ID (lower is better); AUROC, AUPR-In (ID positive), "
              "AUPR-Out (OOD positive): higher is better.", "", "## Summary", "",
              main_table(result), ""]
    for score, per in result.metrics.items():
        lines += [f"## {score}", "", score_table(per), "",
                  f"![{score} histograms](plots/hist_{score}.png)",
                  f"![{score} ROC](plots/roc_{score}.png)", ""]
    return "\n".join(lines)


def _plot_histograms(result: EvaluationResult, score: str, path: Path) -> None:
    from matplotlib.figure import Figure

    ood = result.ood_scores[score]
    ncols = min(3, len(ood))
    nrows = math.ceil(len(ood) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    id_scores = result.id_scores[score]
    for ax, (name, values) in zip(axes, ood.items()):
        both = np.concatenate([id_scores, values])
        lo, hi = float(both.min()), float(both.max())
        bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 51)
        # stepfilled: one patch per histogram instead of one per bar (several times faster)
        for values_, label in ((id_scores, "ID"), (values, name)):
            ax.hist(values_, bins=bins, density=True, alpha=0.55, label=label,
                    histtype="stepfilled")
        m = result.metrics[score][name]
        ax.set_title(f"{name}: FPR95 {_pct(m['fpr95'])}, AUROC {_pct(m['auroc'])}",
                     fontsize=9)
        ax.set_xlabel(f"{score} score (higher = more ID)")
        ax.legend(fontsize=8)
    for ax in axes[len(ood):]:
        ax.set_visible(False)
    fig.savefig(path, dpi=100)


def _plot_roc(result: EvaluationResult, score: str, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.8, 4.4), layout="constrained")
    ax = fig.subplots()
    for name, values in result.ood_scores[score].items():
        fpr, tpr = roc_curve(result.id_scores[score], values)
        ax.plot(fpr, tpr, label=f"{name} (AUROC {_pct(result.metrics[score][name]['auroc'])})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.axhline(0.95, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("false-positive rate (OOD accepted)")
    ax.set_ylabel("true-positive rate (ID accepted)")
    ax.set_title(f"ROC — {score}")
    ax.legend(fontsize=8, loc="lower right")
    fig.savefig(path, dpi=100)


#: Report folders whose lock :func:`check_report_dir` took, until :func:`write_report` ends.
_CLAIMED: dict[str, WriterLock] = {}


def check_report_dir(out_dir: str | os.PathLike, *, overwrite: bool) -> Path:
    """Refuse an existing report folder without ``overwrite`` (call before any work), and
    claim it: its writer lock (``.NAME.lock`` beside it) is held from now until
    :func:`write_report` into it ends (or the process exits), so a second ``evaluate`` into
    the same folder is refused at its start, naming this one."""
    key = os.path.abspath(os.fspath(out_dir))
    lock = _CLAIMED.get(key) or WriterLock(out_dir, what="report folder").acquire()
    try:
        path = check_output(out_dir, overwrite=overwrite, what="report folder")
    except BaseException:
        _CLAIMED.pop(key, None)
        lock.release()
        raise
    _CLAIMED[key] = lock
    return path


def write_report(result: EvaluationResult, out_dir: str | os.PathLike, *,
                 overwrite: bool = False) -> Path:
    """Write ``metrics.json``, ``report.md`` and the plots into ``out_dir`` atomically,
    holding the folder's writer lock (a second writer is refused, naming the holder)."""
    claimed = _CLAIMED.pop(os.path.abspath(os.fspath(out_dir)), None)
    try:
        with WriterLock(out_dir, what="report folder"), \
                atomic_path(out_dir, overwrite=overwrite, directory=True,
                            what="report folder") as tmp:
            (tmp / "metrics.json").write_text(json.dumps(result.to_json(), indent=2) + "\n",
                                              encoding="utf-8")
            (tmp / "report.md").write_text(render_markdown(result), encoding="utf-8")
            plots = tmp / "plots"
            plots.mkdir()
            for score in result.metrics:
                _plot_histograms(result, score, plots / f"hist_{score}.png")
                _plot_roc(result, score, plots / f"roc_{score}.png")
    finally:
        if claimed is not None:
            claimed.release()
    return Path(out_dir)
