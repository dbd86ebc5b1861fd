"""Calibrated decisions: per-score thresholds at a chosen ID true-positive rate.

Convention (as every score): higher = more in-distribution, ID is the positive class. For a
score with ID calibration scores ``s_1..s_n`` (finite ones) and a target TPR ``r``, the
threshold is ``t = s_(k)``, the k-th largest with ``k = ceil(r * n)``: the largest value that
keeps at least ``r`` of the ID rows at or above it. The decision is ``is_ood = score < t``
(so the calibration rows themselves are accepted at a rate >= r; ties can only raise it).

A thresholds file (JSON, written atomically) holds ``{"tpr", "thresholds": {score: t},
"id_tpr": {score: achieved TPR}, "id_store", "fingerprint", "rows", "settings"}``.
``npos train-head --val VAL_STORE`` stores one as ``HEAD_DIR/thresholds.json``;
``npos score --threshold auto`` reads it from ``--head``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from npos.atomic import atomic_path
from npos.errors import ParameterError
from npos.validation import check_float

#: The thresholds file stored with a head.
HEAD_THRESHOLDS = "thresholds.json"


def threshold_at_tpr(id_scores: np.ndarray, tpr: float) -> float:
    """The largest threshold keeping at least ``tpr`` of the finite ``id_scores`` at or
    above it."""
    check_float("tpr", tpr, 0.0, 1.0, low_open=True)
    values = np.sort(np.asarray(id_scores, np.float64)[np.isfinite(id_scores)])[::-1]
    if not len(values):
        raise ParameterError("calibration needs at least one finite ID score")
    return float(values[max(1, math.ceil(tpr * len(values))) - 1])


def calibrate(id_store: Any, config: Any = None, *, tpr: float = 0.95, head: Any = None,
              train: Any = None, progress: bool = False) -> dict[str, Any]:
    """Thresholds of every score of ``config`` on the ID store ``id_store`` at ``tpr``.

    Fusions are rank-normalized against ``train`` (as in ``npos score``).
    """
    from npos.evaluate.batch import _fusion_reference
    from npos.evaluate.config import scoring_config
    from npos.evaluate.evaluation import score_rows
    from npos.evaluate.inputs import build_scorer, open_store

    check_float("tpr", tpr, 0.0, 1.0, low_open=True)
    fs = open_store(id_store, what="calibrate")
    setup = build_scorer({"ID store": fs}, scoring_config(config), head=head, train=train)
    _fusion_reference(setup, train)
    scores, _, _ = score_rows(setup, fs, batch_size=setup.config.batch_size,
                              progress=progress, desc="calibration")
    thresholds = {name: threshold_at_tpr(v, tpr) for name, v in scores.items()}
    achieved = {name: float(np.mean(scores[name][np.isfinite(scores[name])] >= t))
                for name, t in thresholds.items()}
    return {"tpr": float(tpr), "thresholds": thresholds, "id_tpr": achieved,
            "id_store": fs.url, "fingerprint": fs.fingerprint(), "rows": int(len(scores[
                next(iter(scores))])), "settings": setup.record(id=fs.url)}


#: The scores ``train-head --val`` calibrates (every head-space score that needs no train).
HEAD_SCORES = ("mcm", "msp", "maxlogit", "energy", "head")


def calibrate_head(head_dir: str | os.PathLike, val: str, *, tpr: float = 0.95,
                   device: str = "auto") -> dict[str, Any]:
    """Thresholds of the head-space scores on the validation store, written to
    ``head_dir/thresholds.json`` (what ``--threshold auto`` reads)."""
    from npos.evaluate.config import ScoringConfig

    record = calibrate(val, ScoringConfig(scores=HEAD_SCORES, device=device), tpr=tpr,
                       head=str(head_dir))
    write_thresholds(record, Path(head_dir) / HEAD_THRESHOLDS, overwrite=True)
    return record


def write_thresholds(record: dict[str, Any], out: str | os.PathLike, *,
                     overwrite: bool = False) -> None:
    """Write a thresholds record as JSON, atomically."""
    with atomic_path(str(out), overwrite=overwrite, directory=False,
                     what="thresholds file") as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def resolve_threshold(spec: str | float, score: str, *, head: Any = None) -> float:
    """The threshold of ``score`` from ``--threshold``: ``auto`` (the head's stored
    thresholds), a number, or a thresholds file."""
    if isinstance(spec, (int, float)):
        return float(spec)
    text = str(spec)
    try:
        return float(text)
    except ValueError:
        pass
    if text == "auto":
        if head is None or not isinstance(head, (str, os.PathLike)):
            raise ParameterError("--threshold auto reads the thresholds stored with --head "
                                 "HEAD_DIR; give --head or a thresholds file")
        path = Path(head) / HEAD_THRESHOLDS
        if not path.is_file():
            raise ParameterError(f"--threshold auto: head {str(head)!r} has no {HEAD_THRESHOLDS}"
                                 " (train it with --val, or run 'npos calibrate')")
    else:
        path = Path(text)
        if not path.is_file():
            raise ParameterError(f"--threshold {text!r} is neither auto, a number nor a file")
    thresholds = json.loads(path.read_text(encoding="utf-8")).get("thresholds", {})
    if score not in thresholds:
        raise ParameterError(f"--threshold {text!r} has no threshold for score {score!r} "
                             f"(it has {', '.join(thresholds) or 'none'})")
    return float(thresholds[score])


def is_ood(scores: np.ndarray, threshold: float) -> np.ndarray:
    """1.0 where ``score < threshold`` (OOD), 0.0 where not, NaN where the score is NaN."""
    out = (np.asarray(scores) < threshold).astype(np.float64)
    out[~np.isfinite(scores)] = np.nan
    return out
