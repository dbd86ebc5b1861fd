"""A sweep's table: one row per point (mean ± std over seeds) plus the frozen baselines, as
``results.csv``, ``results.json`` and ``report.md``.

Columns: ``id_accuracy`` and, for every score, OOD set and ``average``, ``fpr95`` and
``auroc`` — each as ``<name>_mean`` and ``<name>_std`` (population std over seeds, 0 for
one seed). Metric names read ``<score>/<set>/<metric>``, e.g. ``head/average/auroc``.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from npos.sweep.grid import option_key

METRICS = ("fpr95", "auroc")
DEFAULT_SORT = "head/average/auroc"


def _metric_values(record: Mapping[str, Any]) -> dict[str, float]:
    """``{"id_accuracy": ..., "head/average/auroc": ..., ...}`` of one task or baseline."""
    out: dict[str, float] = {}
    if record.get("id_accuracy") is not None:
        out["id_accuracy"] = float(record["id_accuracy"])
    for score, per_set in record["metrics"].items():
        for name, values in per_set.items():
            for metric in METRICS:
                out[f"{score}/{name}/{metric}"] = float(values[metric])
    return out


def aggregate(records: Sequence[Mapping[str, Any]], swept: Sequence[str]) -> list[dict]:
    """One row per point (in first-seen order): its settings and mean/std per metric."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        groups.setdefault(record["point_id"], []).append(record)
    rows = []
    for pid, group in groups.items():
        point = group[0]["point"]
        values = [_metric_values(r) for r in group]
        row: dict[str, Any] = {"kind": _kind(point), "point_id": pid,
                               **{option_key(k): point[k.replace("-", "_")] for k in swept},
                               "method": point["method"] if point["ood_weight"] > 0 else "none",
                               "ood-weight": point["ood_weight"], "seeds": len(group),
                               "seconds": float(np.mean([sum(r["seconds"].values())
                                                         for r in group]))}
        for name in values[0]:
            column = np.array([v[name] for v in values], dtype=np.float64)
            row[f"{name}_mean"] = float(column.mean())
            row[f"{name}_std"] = float(column.std())
        rows.append(row)
    return rows


def _kind(point: Mapping[str, Any]) -> str:
    return "ablation" if point["ood_weight"] == 0 else "point"


def baseline_rows(baselines: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per frozen-embedding detector, its metrics renamed ``head/...`` -> so the
    sort column compares them with the heads (``score`` says which detector it is)."""
    rows = []
    for score, per_set in baselines["metrics"].items():
        row: dict[str, Any] = {"kind": "baseline", "point_id": f"frozen-{score}",
                               "method": f"frozen {score}", "seeds": 1}
        for name, values in per_set.items():
            for metric in METRICS:
                row[f"{score}/{name}/{metric}_mean"] = float(values[metric])
                row[f"{score}/{name}/{metric}_std"] = 0.0
        rows.append(row)
    return rows


def sort_value(row: Mapping[str, Any], metric: str) -> float:
    """A row's value of ``metric`` (``head/...``: a baseline row uses its own score)."""
    key = f"{metric}_mean"
    if key not in row and row.get("kind") == "baseline" and metric.startswith("head/"):
        key = f"{row['point_id'].removeprefix('frozen-')}/{metric[5:]}_mean"
    value = row.get(key)
    return float("nan") if value is None else float(value)


def sort_rows(rows: Sequence[Mapping[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Best first: larger is better, except FPR (smaller); rows without the metric last."""
    sign = 1.0 if metric.endswith("fpr95") else -1.0

    def key(row):
        v = sort_value(row, metric)
        return (math.isnan(v), sign * v if not math.isnan(v) else 0.0)

    return sorted((dict(r) for r in rows), key=key)


def to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """All rows as CSV (the union of columns, first-seen order; missing cells empty)."""
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def verdict(rows: Sequence[Mapping[str, Any]], metric: str) -> str:
    """One sentence from the numbers: does synthesis beat the ablation and the baselines?"""
    values = {r["point_id"]: sort_value(r, metric) for r in rows}
    points = [r for r in rows if r["kind"] == "point" and not math.isnan(values[r["point_id"]])]
    ablation = [values[r["point_id"]] for r in rows if r["kind"] == "ablation"]
    base = [(values[r["point_id"]], r["method"]) for r in rows if r["kind"] == "baseline"
            and not math.isnan(values[r["point_id"]])]
    if not points:
        return f"No synthesis point has {metric}."
    better = max if not metric.endswith("fpr95") else min
    best = better(points, key=lambda r: values[r["point_id"]])
    b = values[best["point_id"]]
    parts = [f"ablation (no synthesis) {ablation[0]:.4f}"] if ablation else []
    top_base = better(base) if base else None
    if top_base:
        parts.append(f"best frozen baseline ({top_base[1]}) {top_base[0]:.4f}")
    beats = [(b > v if better is max else b < v) for v in
             ([ablation[0]] if ablation else []) + ([top_base[0]] if top_base else [])]
    answer = ("Synthesis helps here" if all(beats) else
              "Synthesis beats the ablation but not the frozen baseline here"
              if ablation and beats[0] else "Synthesis does not help here")
    return (f"{answer}: the best point ({best['label']}) has {metric} {b:.4f} vs "
            + ", ".join(parts) + ".")


def markdown(rows: Sequence[Mapping[str, Any]], metric: str, ood_names: Sequence[str],
             scores: Sequence[str]) -> str:
    """``report.md``: the verdict, then the table sorted by ``metric``, the best row of each
    method in bold."""
    rows = sort_rows(rows, metric)
    best: dict[str, str] = {}
    for row in rows:  # sorted: the first row of a method is its best
        if row["kind"] == "point" and not math.isnan(sort_value(row, metric)):
            best.setdefault(row["method"], row["point_id"])
    sets = [*ood_names, "average"]
    head = ["point", "kind", "ID acc"] + [f"{s} {n} {m}" for s in scores for n in sets
                                          for m in ("AUROC", "FPR95")]
    lines = [f"# Sweep report (sorted by {metric})", "", verdict(rows, metric), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["label"], row["kind"], _cell(row, "id_accuracy")]
        for s in scores:
            src = row["point_id"].removeprefix("frozen-") if row["kind"] == "baseline" and \
                s == "head" else s
            cells += [_cell(row, f"{src}/{n}/{m}") for n in sets for m in METRICS[::-1]]
        if best.get(row["method"]) == row["point_id"]:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Cells are mean ± std over seeds. Baseline rows (`frozen knn`, `frozen mcm`) "
              "score the frozen training embeddings once, shown in the head columns; bold: "
              "the best point of each method."]
    return "\n".join(lines) + "\n"


def _cell(row: Mapping[str, Any], name: str) -> str:
    mean = row.get(f"{name}_mean")
    if mean is None:
        return "–"
    std = row.get(f"{name}_std", 0.0)
    return f"{mean:.4f}" if not std else f"{mean:.4f} ± {std:.4f}"


def label_rows(rows: list[dict[str, Any]], swept: Sequence[str]) -> list[dict[str, Any]]:
    """Add ``label``: the swept values (``ablation`` for the no-synthesis row)."""
    for row in rows:
        if row["kind"] == "baseline":
            row["label"] = row["method"]
        elif row["kind"] == "ablation":
            row["label"] = "ablation (ood-weight 0)"
        else:
            row["label"] = " ".join(f"{option_key(k)}={row[option_key(k)]}"
                                    for k in swept) or "fixed settings"
    return rows
