"""Running a sweep: every grid point x seed trained and evaluated, resumably, in parallel.

One *task* is a point and a seed: outliers (offline: :func:`~npos.synthesize.offline.
synthesize_store` with the point's synthesis settings, then ``train_head(outliers=...)``,
when the embedding space is frozen — ``id_loss "none"`` —; else online synthesis inside
:func:`~npos.train_head.train_head`), a head, and :func:`~npos.evaluate.evaluate` of the
head. Each finished task is ``DIR/points/<point id>-s<seed>.json``, written atomically, so a
re-run skips it. The frozen-embedding baselines (``knn``, ``mcm``) are evaluated once per
sweep (``DIR/baselines.json``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from npos.atomic import atomic_path
from npos.settings import jsonable
from npos.sweep.grid import offline
from npos.sweep.holdout import Split

#: Detectors that need the training store as their bank or statistics.
_NEEDS_TRAIN = ("knn", "mahalanobis")


@dataclass
class SweepPlan:
    """Everything a sweep runs: data, points (train-head keyword arguments without the
    seed), seeds, scores and where the files go."""

    split: Split
    points: list[dict[str, Any]]
    seeds: list[int]
    out_dir: Path
    scores: str = "head"
    baselines: str = "knn,mcm"
    device: str = "cpu"
    jobs: int = 1
    swept: list[str] = field(default_factory=list)

    def tasks(self) -> list[tuple[dict[str, Any], int]]:
        """Every (point, seed), point-major."""
        return [(p, s) for p in self.points for s in self.seeds]


def point_id(point: Mapping[str, Any]) -> str:
    """A short stable id of a point's settings (file names; resuming matches by settings, not
    by position, so a changed grid never reuses another point's numbers)."""
    text = json.dumps(jsonable(dict(point)), sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def task_path(out_dir: str | os.PathLike, point: Mapping[str, Any], seed: int) -> Path:
    """``DIR/points/<point id>-s<seed>.json``."""
    return Path(out_dir) / "points" / f"{point_id(point)}-s{seed}.json"


def head_config(point: Mapping[str, Any], seed: int):
    """The :class:`~npos.train_head.HeadConfig` of a point (its synthesis config nested)."""
    from npos.commands._synthesis_options import synthesis_config_from_options
    from npos.train_head import HeadConfig

    names = {f.name for f in fields(HeadConfig)} - {"synthesis", "seed"}
    return HeadConfig(**{k: v for k, v in point.items() if k in names},
                      synthesis=synthesis_config_from_options(point), seed=seed)


def train_point(split: Split, point: Mapping[str, Any], seed: int, work: Path, *,
                device: str, cache: Path | None = None) -> tuple[str, dict[str, float]]:
    """Outliers (offline when frozen) and a head for one point and seed, under ``work``.

    Offline outliers depend only on the synthesis settings, ``queue`` and the seed, so
    points that differ in head settings alone (e.g. ``ood-weight``) share one outliers
    store in ``cache`` (``DIR/outliers/``). Returns the head directory and the seconds
    spent per stage.
    """
    from npos.train_head import train_head

    config = head_config(point, seed)
    seconds: dict[str, float] = {}
    outliers = None
    if offline(point):
        start = time.perf_counter()
        outliers = _offline_outliers(split, config, seed, work, device, cache)
        seconds["synthesis"] = time.perf_counter() - start
    start = time.perf_counter()
    head = str(work / "head")
    train_head(split.train, head, config, device=device, outliers=outliers,
               outliers_per_step=point.get("outliers_per_step") if outliers else None)
    seconds["training"] = time.perf_counter() - start
    return head, seconds


def outliers_key(config, seed: int, train: str) -> str:
    """The id of the offline outliers a task trains on: its synthesis settings, ``queue``,
    seed and training store (``DIR/outliers/<key>.zarr``)."""
    return point_id({**config.synthesis.to_dict(), "queue": config.queue, "seed": seed,
                     "train": train})


def _offline_outliers(split: Split, config, seed: int, work: Path, device: str,
                      cache: Path | None) -> str:
    """The outliers store of ``config.synthesis``/``queue``/``seed``: from ``cache`` when an
    earlier run made it, else synthesized into ``work`` and moved into ``cache`` (a rename,
    so a cached store is always complete; one job at a time per store)."""
    from npos.store import FeatureStore
    from npos.synthesize.offline import OfflineSynthesis, synthesize_store, write_outliers

    def synthesized() -> str:
        source = FeatureStore.open(split.train)
        made = synthesize_store(source, config.synthesis, queue=config.queue, seed=seed,
                                device=device)
        assert isinstance(made, OfflineSynthesis)  # bank "sample", scope "class": the default
        url = work / "outliers.zarr"
        write_outliers(made, str(url), source=source).close()
        return str(url)

    if cache is None:
        return synthesized()
    key = outliers_key(config, seed, split.train)
    cached = cache / f"{key}.zarr"
    cache.mkdir(parents=True, exist_ok=True)
    # Parallel jobs that need the same outliers take turns: the second waits for the first's
    # store instead of synthesizing it again (the kernel drops the lock of a killed job).
    with _exclusive(cache / f".{key}.lock"):
        if not cached.exists():
            os.rename(synthesized(), cached)
    return str(cached)


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing) for the block, where the
    platform has one."""
    try:
        import fcntl
    except ImportError:  # not POSIX: a race only costs a duplicate synthesis
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def evaluate_point(split: Split, scores: str, *, head: str | None, device: str) -> dict:
    """``{"id_accuracy": ..., "metrics": {score: {set: {...}, "average": {...}}}}``."""
    from npos.evaluate import evaluate

    needs_train = any(s.strip() in _NEEDS_TRAIN for s in scores.split(","))
    result = evaluate(split.test, split.ood, scores=scores, head=head,
                      train=split.train if needs_train else None, device=device)
    return {"id_accuracy": result.id_accuracy, "metrics": jsonable(result.metrics)}


def run_task(split: Split, point: Mapping[str, Any], seed: int, out_dir: Path, *,
             scores: str, device: str) -> dict[str, Any]:
    """Train and evaluate one point x seed; write and return its record."""
    work = Path(out_dir) / "work" / f"{point_id(point)}-s{seed}"
    if work.exists():  # left by an interrupted run: start this task over
        shutil.rmtree(work)
    work.mkdir(parents=True)
    try:
        head, seconds = train_point(split, point, seed, work, device=device,
                                    cache=Path(out_dir) / "outliers")
        start = time.perf_counter()
        record = evaluate_point(split, scores, head=head, device=device)
        seconds["evaluation"] = time.perf_counter() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)
    record = {"point_id": point_id(point), "point": jsonable(dict(point)), "seed": seed,
              "offline": offline(point), **record, "seconds": seconds}
    write_json(task_path(out_dir, point, seed), record)
    return record


def write_json(path: str | os.PathLike, doc: Any) -> None:
    """``doc`` as JSON at ``path``, atomically (a killed run never leaves half a file)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, overwrite=True, directory=False, what="sweep file") as tmp:
        tmp.write_text(json.dumps(jsonable(doc), indent=1, allow_nan=True))


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def threads_per_job(jobs: int) -> int:
    """Torch threads of each parallel job: the cores shared evenly, at least one."""
    return max(1, (os.cpu_count() or 1) // max(1, jobs))


def run_tasks(plan: SweepPlan, *, progress: bool = False,
              log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Run every unfinished task of ``plan`` (``jobs`` processes); return all records, in
    task order. Finished tasks (their JSON file exists) are read, not run again."""
    from tqdm.auto import tqdm

    records: dict[tuple[str, int], dict[str, Any]] = {}
    pending = []
    for point, seed in plan.tasks():
        path = task_path(plan.out_dir, point, seed)
        if path.exists():
            records[point_id(point), seed] = json.loads(path.read_text())
        else:
            pending.append((point, seed))
    if log and records:
        log(f"resuming: {len(records)} of {len(plan.tasks())} point runs already done")
    if plan.jobs > 1:
        pending = _synthesis_first(pending, plan.split.train)
    bar = tqdm(total=len(pending), desc="sweep", unit="point", disable=not progress)
    kwargs = {"scores": plan.scores, "device": plan.device}
    if plan.jobs <= 1:
        for point, seed in pending:
            records[point_id(point), seed] = run_task(plan.split, point, seed, plan.out_dir,
                                                      **kwargs)
            bar.update()
    else:
        # spawn: a fresh interpreter per worker (no forked torch/OpenMP state)
        with ProcessPoolExecutor(plan.jobs, mp_context=get_context("spawn"),
                                 initializer=_worker_init,
                                 initargs=(threads_per_job(plan.jobs),)) as pool:
            futures = [pool.submit(run_task, plan.split, point, seed, plan.out_dir, **kwargs)
                       for point, seed in pending]
            for future in as_completed(futures):
                record = future.result()
                records[record["point_id"], record["seed"]] = record
                bar.update()
    bar.close()
    work = plan.out_dir / "work"
    if work.is_dir() and not any(work.iterdir()):
        work.rmdir()
    return [records[point_id(p), s] for p, s in plan.tasks()]


def _synthesis_first(tasks: list[tuple[dict[str, Any], int]],
                     train: str) -> list[tuple[dict[str, Any], int]]:
    """``tasks`` with the first task of each offline outliers store ahead of the tasks that
    reuse it: parallel jobs then rarely wait for each other's synthesis."""
    seen: set[str] = set()
    first: list[tuple[dict[str, Any], int]] = []
    reusing: list[tuple[dict[str, Any], int]] = []
    for point, seed in tasks:
        key = outliers_key(head_config(point, seed), seed, train) if offline(point) else None
        (reusing if key in seen else first).append((point, seed))
        if key is not None:
            seen.add(key)
    return first + reusing


def run_baselines(plan: SweepPlan) -> dict[str, Any]:
    """The frozen-embedding detectors (``plan.baselines``), evaluated once per sweep and kept
    in ``DIR/baselines.json``."""
    path = plan.out_dir / "baselines.json"
    if path.exists():
        return json.loads(path.read_text())
    names = available_baselines(plan.split, plan.baselines)
    record = evaluate_point(plan.split, ",".join(names), head=None, device=plan.device) \
        if names else {"id_accuracy": None, "metrics": {}}
    write_json(path, record)
    return record


def available_baselines(split: Split, baselines: str) -> list[str]:
    """The baselines that apply: ``mcm`` needs class text embeddings in the stores."""
    from npos.store import FeatureStore

    names = [s.strip() for s in baselines.split(",") if s.strip()]
    if "mcm" in names:
        has_text = any(FeatureStore.open(u).has("text_embeddings")
                       for u in (split.train, split.test))
        if not has_text:
            names.remove("mcm")
    return names


def run_sweep(plan: SweepPlan, *, progress: bool = False,
              log: Callable[[str], None] | None = None) -> tuple[list[dict], dict]:
    """Baselines, then every task. Returns ``(task records, baselines record)``."""
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    baselines = run_baselines(plan)
    return run_tasks(plan, progress=progress, log=log), baselines


def seeds_of(base: int, n: int) -> list[int]:
    """``n`` seeds from ``base``: base, base + 1, ..."""
    return [base + i for i in range(n)]


def describe(plan: SweepPlan) -> dict[str, Any]:
    """``DIR/sweep.json``: what the sweep runs."""
    return {"split": jsonable(plan.split.__dict__), "seeds": plan.seeds, "scores": plan.scores,
            "baselines": plan.baselines, "swept": plan.swept,
            "points": [{"point_id": point_id(p), **jsonable(p)} for p in plan.points]}



def write_outputs(plan: SweepPlan, records: list[dict], baselines: dict, *,
                  sort_by: str, boundary_classes: tuple[int, ...] = (0,)) -> list[dict]:
    """``results.csv``, ``results.json``, ``report.md``, ``plots/`` and ``boundary.png``
    (best point and the paper's setting, clipped to the data). Returns the sorted rows."""
    from npos.sweep import plots, report

    rows = report.label_rows(report.aggregate(records, plan.swept)
                             + report.baseline_rows(baselines), plan.swept)
    rows = report.sort_rows(rows, sort_by)
    out = plan.out_dir
    with atomic_path(out / "results.csv", overwrite=True, directory=False,
                     what="results") as tmp:
        tmp.write_text(report.to_csv(rows))
    write_json(out / "results.json", {"sort_by": sort_by, "rows": rows, **describe(plan)})
    scores = [s.strip() for s in plan.scores.split(",") if s.strip()]
    with atomic_path(out / "report.md", overwrite=True, directory=False, what="report") as tmp:
        tmp.write_text(report.markdown(rows, sort_by, list(plan.split.ood), scores))
    if plan.swept:
        plots.plot_metric(rows, plan.swept, sort_by, out / "plots")
    panels = {}
    synth = [r for r in rows if r["kind"] == "point"]
    if synth:
        best = next(p for p in plan.points if point_id(p) == synth[0]["point_id"])
        panels["best point"] = plots.boundary_data(plan.split.train, plots.best_setting(best),
                                                   classes=boundary_classes, seed=plan.seeds[0])
    panels["paper setting"] = plots.boundary_data(plan.split.train, plots.PAPER,
                                                  classes=boundary_classes, seed=plan.seeds[0])
    plots.draw_boundary(panels, out / "boundary.png")
    return rows
