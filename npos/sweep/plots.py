"""A sweep's pictures (matplotlib, Agg): a metric against each swept parameter, and
``boundary.png`` — what synthesis does to one class in a 2-D PCA view.

Both drawing functions return the data they plot, so tests check the picture's content.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from npos.sweep.grid import option_key
from npos.sweep.report import sort_value

#: The paper's ImageNet-100 synthesis setting (sphere noise 0.01 ~ the paper's raw 0.1).
PAPER = {"method": "npos", "k": 400, "select": 300, "pick": 3, "candidates": 1500,
         "keep": 2, "sigma": 0.01, "noise_space": "sphere", "queue": 1000}
KINDS = ("id", "boundary", "rejected", "kept")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metric(rows: Sequence[Mapping[str, Any]], swept: Sequence[str], metric: str,
                out_dir: str | Path) -> dict[str, dict[str, list[tuple[Any, float]]]]:
    """``plots/<param>.png`` per swept parameter: ``metric`` (mean over the other
    parameters) against its values, one line per value of the next swept parameter.

    Returns ``{param: {line label: [(x, y), ...]}}``.
    """
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    points = [r for r in rows if r["kind"] != "baseline"]
    keys = [option_key(k) for k in swept]
    data: dict[str, dict[str, list[tuple[Any, float]]]] = {}
    for i, param in enumerate(keys):
        other = next((k for k in keys[i + 1:] + keys[:i] if k != param), None)
        lines: dict[str, list[tuple[Any, float]]] = {}
        for line in sorted({r.get(other) for r in points} if other else {None}, key=str):
            label = f"{other}={line}" if other else metric
            xs = sorted({r[param] for r in points}, key=_order)
            series = []
            for x in xs:
                ys = [sort_value(r, metric) for r in points
                      if r[param] == x and (other is None or r.get(other) == line)]
                ys = [y for y in ys if not math.isnan(y)]
                if ys:
                    series.append((x, float(np.mean(ys))))
            if series:
                lines[label] = series
        data[param] = lines
        fig, ax = plt.subplots(figsize=(5, 3.5))
        categories = sorted({x for s in lines.values() for x, _ in s}, key=_order)
        for label, series in lines.items():
            ax.plot([categories.index(x) for x, _ in series], [y for _, y in series],
                    marker="o", label=label)
        ax.set_xticks(range(len(categories)), [str(c) for c in categories])
        ax.set_xlabel(param)
        ax.set_ylabel(metric)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / f"{param}.png", dpi=100)
        plt.close(fig)
    return data


def _order(value: Any) -> tuple:
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))


def clip_setting(setting: Mapping[str, Any], rows_per_class: int) -> dict[str, Any]:
    """A synthesis setting made valid for classes of ``rows_per_class`` rows (queue, then k
    below it, select within it, keep within candidates)."""
    s = dict(setting)
    s["queue"] = max(2, min(int(s["queue"]), rows_per_class))
    s["k"] = min(int(s["k"]), s["queue"] - 1)
    s["select"] = min(int(s["select"]), s["queue"])
    s["pick"] = min(int(s["pick"]), s["select"])
    s["keep"] = min(int(s["keep"]), int(s["candidates"]))
    return s


def boundary_data(train: str, setting: Mapping[str, Any], *, classes: Sequence[int] = (0,),
                  seed: int = 0) -> dict[str, np.ndarray]:
    """2-D PCA coordinates, per kind (:data:`KINDS`), of one synthesis call on ``classes``.

    The bank is ``queue`` seeded rows per class (as offline synthesis draws it); the PCA is
    fitted on the unit vectors of those ID rows (kNN distances live on the sphere) and every
    kind is projected as a unit vector. ``boundary``/``rejected`` are empty for methods
    without them (``gaussian`` keeps all draws; ``vos`` has no boundary).
    """
    import torch

    from npos.store import FeatureStore
    from npos.synthesize import SynthesisConfig, synthesize
    from npos.synthesize.offline import class_banks

    store = FeatureStore.open(train)
    labels = torch.from_numpy(store.read("labels").astype(np.int64))
    keep_rows = torch.isin(labels, torch.tensor(list(classes)))
    x = store.read("embeddings", dtype="float32", as_torch=True)[keep_rows]
    y = labels[keep_rows]
    smallest = int(torch.bincount(y)[list(classes)].min())
    s = clip_setting(setting, smallest)
    config = SynthesisConfig(**{k: s[k] for k in ("method", "k", "select", "pick",
                                                  "candidates", "sigma", "noise_space",
                                                  "keep")})
    generator = torch.Generator().manual_seed(seed)
    banks = class_banks(x, y, s["queue"], generator=generator).banks
    result = synthesize(banks, config, generator=generator, return_stats=True,
                        return_candidates=config.method == "npos")
    st = result.stats
    dim = banks.shape[-1]
    parts = {"id": banks.reshape(-1, dim), "kept": result.outliers,
             "boundary": torch.empty(0, dim), "rejected": torch.empty(0, dim)}
    if st.boundary is not None:
        parts["boundary"] = torch.cat([banks[r, st.boundary[r]] for r in range(len(banks))])
    if st.candidates is not None:  # npos: candidates not among the kept ones
        kept = st.candidate_distance.topk(config.keep, dim=-1).indices
        mask = torch.ones(st.candidate_distance.shape, dtype=torch.bool)
        mask.scatter_(-1, kept, False)
        parts["rejected"] = st.candidates[mask]
    unit = {k: torch.nn.functional.normalize(v.float(), dim=-1).numpy() for k, v in parts.items()}
    mean = unit["id"].mean(axis=0)
    _, _, vt = np.linalg.svd(unit["id"] - mean, full_matrices=False)
    return {k: (v - mean) @ vt[:2].T for k, v in unit.items()} | {"setting": s}


def draw_boundary(panels: Mapping[str, Mapping[str, Any]], path: str | Path,
                  *, max_rejected: int = 3000) -> dict[str, dict[str, int]]:
    """``boundary.png``: one panel per setting (title -> :func:`boundary_data` output).

    Rejected candidates beyond ``max_rejected`` are thinned (evenly) to keep the file light.
    Returns ``{title: {kind: number of points drawn}}``.
    """
    plt = _pyplot()
    style = {"id": ("ID rows", "#9aa", 6), "rejected": ("rejected candidates", "#f4b183", 4),
             "boundary": ("boundary points", "#1f4e79", 14), "kept": ("kept outliers",
                                                                      "#c00000", 18)}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 5), squeeze=False)
    counts: dict[str, dict[str, int]] = {}
    for ax, (title, data) in zip(axes[0], panels.items(), strict=True):
        counts[title] = {}
        for kind in KINDS:
            xy = data[kind]
            if kind == "rejected" and len(xy) > max_rejected:
                xy = xy[np.linspace(0, len(xy) - 1, max_rejected).astype(int)]
            counts[title][kind] = len(xy)
            name, colour, size = style[kind]
            ax.scatter(xy[:, 0], xy[:, 1], s=size, c=colour, label=f"{name} ({len(xy)})",
                       alpha=0.8, linewidths=0)
        s = data["setting"]
        ax.set_title(f"{title}\n{s['method']} k={s['k']} select={s['select']} "
                     f"sigma={s['sigma']} keep={s['keep']}/{s['candidates']}", fontsize=9)
        ax.set_xlabel("PC 1 (fitted on the ID rows)")
        ax.set_ylabel("PC 2")
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return counts


def best_setting(point: Mapping[str, Any]) -> dict[str, Any]:
    """The synthesis setting of a point (sigma resolved), for :func:`boundary_data`."""
    from npos.commands._synthesis_options import synthesis_config_from_options

    config = synthesis_config_from_options(point)
    config = replace(config, sigma=config.resolved_sigma)
    return {**{k: getattr(config, k) for k in PAPER if k != "queue"}, "queue": point["queue"]}
