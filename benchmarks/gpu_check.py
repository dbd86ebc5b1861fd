"""One command that tells the whole truth about npos on a GPU: ``pytest -m cuda`` plus every
GPU measurement, each as a ratio against a baseline measured in the same run.

    PYTHONPATH=. python -m benchmarks.gpu_check [--out DIR] [--quick] [--only NAME ...]

Writes ``DIR/gpu_check.md`` and ``DIR/gpu_check.json`` (default ``./gpu_check``), rewritten
after every check so that a crash keeps what was measured. Checks (sizes in :data:`FULL`;
``--quick`` uses :data:`QUICK`, tiny sizes that also run on a CPU in under a minute):

* ``cuda-tests``    — ``pytest -m cuda`` in a subprocess; its summary line.
* ``extraction``    — pipeline vs encoder-only images/s, ViT-B-16 random init, generated
  JPEGs (goal >= 0.9).
* ``synthesis-in100`` / ``synthesis-in1k`` — the engine vs the per-class faiss-GPU loop
  (goal >= 20x, stretch 50x; the faiss-CPU loop stands in, labelled so, without a faiss GPU
  build) and vs the bare batched-matmul floor (goal <= 2x).
* ``ivf-vs-flat``   — faiss IVF vs exact flat on 1M x 512: recall and speed (needs a faiss
  GPU build; with ``--quick`` on a CPU, faiss-cpu).
* ``train-head``    — head-training epoch at the ImageNet-100 shape, synthesis every step, vs
  no synthesis (goal <= 60 s).
* ``finetune-step`` — the last two ViT-B/16 blocks from cached tokens vs from images.
* ``score``         — ``score`` rows/s with ``head,knn`` (torch kNN backend) vs reading.

Every check runs in a try/except with its own time limit (an alarm; the limits add up to
less than 8 minutes) and is reported as ``ok``, ``failed`` (one-line error; the traceback
goes into the JSON) or ``not run`` (with the missing dependency). The script never installs
anything; it needs torch, and each check names what else it needs.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

#: Full sizes (one H200): the issue's shapes.
FULL = {
    "pytest_paths": ["tests/cuda"],  # every test marked cuda lives there
    "extraction": dict(images=3000, size="500x375", model="ViT-B-16", batch_size=256,
                       workers=min(16, os.cpu_count() or 1), chunk_rows=1024, repeat=2,
                       resident=1024),
    "synthesis-in100": dict(classes=100, queue=1000, dim=512, k=400, select=300, pick=3,
                            candidates=1500, keep=2, repeat=2),
    "synthesis-in1k": dict(classes=1000, queue=1000, dim=512, k=400, select=300, pick=1,
                           candidates=1500, keep=2, repeat=2, loop_classes=100),
    "ivf-vs-flat": dict(bank=1_000_000, dim=512, queries=5000, clusters=1000, k=50,
                        nlist=1024),
    "train-head": dict(classes=100, rows_per_class=1260, dim=512, batch_size=256, steps=10,
                       queue=1000, synthesis=dict(k=400, select=300, pick=3, candidates=1500,
                                                  keep=2)),
    "finetune-step": dict(model="ViT-B-16", layer=10, batch_size=128, steps=5),
    "score": dict(rows=200_000, dim=512, classes=100, batch_size=65536),
}
#: Tiny sizes for ``--quick`` (CPU in CI, or a first look on a GPU).
QUICK = {
    "pytest_paths": ["tests/cuda"],
    "extraction": dict(images=24, size="64x48", model="npos-tiny", batch_size=8, workers=0,
                       chunk_rows=16, repeat=1, resident=24),
    "synthesis-in100": dict(classes=4, queue=120, dim=32, k=20, select=40, pick=3,
                            candidates=60, keep=2, repeat=1),
    "synthesis-in1k": dict(classes=8, queue=120, dim=32, k=20, select=40, pick=1,
                           candidates=60, keep=2, repeat=1, loop_classes=4),
    "ivf-vs-flat": dict(bank=4000, dim=32, queries=100, clusters=20, k=10, nlist=32),
    "train-head": dict(classes=4, rows_per_class=120, dim=32, batch_size=64, steps=2,
                       queue=60, synthesis=dict(k=10, select=20, pick=2, candidates=40,
                                                keep=2)),
    "finetune-step": dict(model="npos-tiny", layer=1, batch_size=4, steps=2),
    "score": dict(rows=2000, dim=32, classes=8, batch_size=1024),
}


@dataclasses.dataclass
class Check:
    """One measurement: ``run(ctx) -> dict`` with ``ratios`` (list of dicts) inside."""

    name: str
    what: str
    needs: tuple[str, ...]
    limit_s: int
    run: object


class CheckTimeout(Exception):
    """A check ran past its time limit."""


class Missing(Exception):
    """A dependency of a check is missing (the check is reported as not run)."""


# ---------------------------------------------------------------------------- helpers
def _load(name: str):
    """Import ``benchmarks/<name>.py`` under a private name (their CLIs stay scripts)."""
    spec = importlib.util.spec_from_file_location(f"npos_bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def ratio(name: str, value: float, baseline: str, goal: str | None = None,
          met: bool | None = None) -> dict:
    return {"name": name, "value": round(float(value), 4), "baseline": baseline,
            "goal": goal, "met": met}


def faiss_gpus() -> int:
    """GPUs faiss sees (0 without faiss or with a CPU build)."""
    if importlib.util.find_spec("faiss") is None:
        return 0
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def missing(needs, device: torch.device) -> str | None:
    """The first unmet need of a check, as a phrase, or None."""
    for need in needs:
        if need == "cuda":
            if device.type != "cuda":
                return "a CUDA GPU (torch.cuda.is_available() is False)"
        elif need == "faiss-gpu":
            if device.type == "cuda" and faiss_gpus() == 0:
                return ("a faiss GPU build (faiss is missing or faiss.get_num_gpus() == 0; "
                        "pip install \"npos[gpu]\")")
            if importlib.util.find_spec("faiss") is None:
                return "faiss"
        elif importlib.util.find_spec(need) is None:
            return need
    return None


# ---------------------------------------------------------------------------- checks
def check_cuda_tests(ctx) -> dict:
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rsP", "-p",
               "no:cacheprovider", *ctx["sizes"]["pytest_paths"]]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    # A session of its own, so that a timeout also ends the torchrun children of the tests.
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=max(5, ctx["limit"] - 5))
        timed_out = False
    except BaseException as exc:  # the pytest timeout, this check's alarm, or Ctrl-C
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        if isinstance(exc, KeyboardInterrupt):
            raise
        timed_out = True
    lines = [line for line in stdout.splitlines() if line.strip()]
    tail = lines[-1] if lines else stderr.strip()[-300:]
    summary = " ".join(tail.split())[:300]
    out = {"command": " ".join(command[1:]), "returncode": proc.returncode,
           "summary": summary,
           "output_tail": "\n".join(lines[-150:]) + "\n" + stderr[-2000:], "ratios": []}
    if timed_out:
        out["failed"] = f"pytest -m cuda ran past {max(5, ctx['limit'] - 5)} s: {summary}"
    elif proc.returncode not in (0, 5):  # 5: no tests collected
        out["failed"] = f"pytest -m cuda: {summary}"
    return out


def check_extraction(ctx) -> dict:
    size = ctx["sizes"]["extraction"]
    bench = _load("extract")
    r = bench.measure(pretrained="none", device=str(ctx["device"]), dtype="float16",
                      **size)
    r["ratios"] = [ratio("pipeline / encoder only", r["ratio"], "encoder only (same run)",
                         ">= 0.9", r["ratio"] >= 0.9)]
    return r


def _synthesis(shape_name):
    def run(ctx) -> dict:
        shape = dict(ctx["sizes"][shape_name])
        repeat, loop_classes = shape.pop("repeat"), shape.pop("loop_classes", None)
        device = ctx["device"]
        if importlib.util.find_spec("faiss") is None:
            loop = None
        else:
            loop = "faiss-gpu" if device.type == "cuda" and faiss_gpus() > 0 else "faiss-cpu"
        r = _load("synthesis").measure_shape(shape, device, repeat=repeat, loop=loop,
                                             loop_classes=loop_classes)
        ratios = [ratio("engine / bare bmm floor", r["engine_over_floor"], "floor (same run)",
                        "<= 2", r["engine_over_floor"] <= 2)]
        if loop is None:
            r["loop_note"] = "per-class loop not run, because faiss is missing"
        else:
            gpu_loop = loop == "faiss-gpu"
            goal = ">= 20 (stretch 50)" if gpu_loop and device.type == "cuda" else None
            scaled = (f" (timed on {r['loop_classes']} classes, scaled)"
                      if r.get("loop_extrapolated") else "")
            ratios.append(ratio(f"{loop} per-class loop{scaled} / engine", r["loop_over_engine"],
                                f"{loop} loop (same run)", goal,
                                r["loop_over_engine"] >= 20 if goal else None))
            if device.type == "cuda" and not gpu_loop:
                r["loop_note"] = ("faiss-GPU loop unmeasured (no faiss GPU build); the "
                                  "faiss-CPU loop stands in and is not the issue's baseline")
        r["ratios"] = ratios
        return r
    return run


def check_ivf(ctx) -> dict:
    import numpy as np

    size = ctx["sizes"]["ivf-vs-flat"]
    bench = _load("scoring")
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((size["clusters"], size["dim"])).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    bank, _ = bench.clustered(size["bank"], size["dim"], centres, rng)
    queries, _ = bench.clustered(size["queries"], size["dim"], centres, rng)
    r = bench.measure_knn(bank, queries, size["k"], device=str(ctx["device"]),
                          backends=("faiss-flat", "faiss-ivf"), nlist=size["nlist"])
    ivf = r["backends"]["faiss-ivf"]
    r["ratios"] = [ratio("IVF speedup over flat", ivf["speedup"], "faiss-flat (same run)",
                         ">= 5 at recall >= 0.95",
                         ivf["speedup"] >= 5 and ivf["recall"] >= 0.95),
                   ratio("IVF recall@k", ivf["recall"], "faiss-flat neighbours", ">= 0.95",
                         ivf["recall"] >= 0.95)]
    return r


def check_train_head(ctx) -> dict:
    from npos.synthesize import SynthesisConfig

    size = dict(ctx["sizes"]["train-head"])
    size["synthesis"] = SynthesisConfig(**size["synthesis"])
    r = _load("train_head").measure(modes=("no-synthesis", "every-step"),
                                    device=ctx["device"], **size)
    r["synthesis"] = dataclasses.asdict(size["synthesis"])
    every, base = r["modes"]["every-step"], r["modes"]["no-synthesis"]
    full = ctx["device"].type == "cuda" and not ctx["quick"]
    r["ratios"] = [ratio("epoch, synthesis every step / no synthesis",
                         every["total"] / base["total"], "no-synthesis epoch (same run)"),
                   ratio("epoch seconds, synthesis every step", every["epoch_s"],
                         "(absolute)", "<= 60 s" if full else None,
                         every["epoch_s"] <= 60 if full else None)]
    return r


def check_finetune(ctx) -> dict:
    r = _load("finetune").measure_step(device=str(ctx["device"]),
                                       **ctx["sizes"]["finetune-step"])
    r["ratios"] = [ratio("step from cached tokens / from images", r["cached_over_images"],
                         "step from images (same run)")]
    return r


def check_score(ctx) -> dict:
    import numpy as np

    size = ctx["sizes"]["score"]
    runs = [("head,knn (torch kNN)", dict(scores="head,knn", head=True, train=True,
                                          knn_backend="torch"), ".zarr")]
    with tempfile.TemporaryDirectory() as tmp:
        r = _load("scoring").measure_score(device=str(ctx["device"]),
                                           rng=np.random.default_rng(0), workdir=Path(tmp),
                                           runs=runs, **size)
    run = r["runs"]["head,knn (torch kNN)"]
    r["ratios"] = [ratio("head,knn scoring / reading the store", run["over_read"],
                         "streaming the store without scoring (same run)")]
    return r


CHECKS = [
    Check("cuda-tests", "pytest -m cuda (the CUDA tests)", ("cuda", "pytest", "zarr",
          "open_clip"), 140,
          check_cuda_tests),
    Check("extraction", "extract: pipeline vs encoder-only throughput", ("cuda", "open_clip",
          "zarr", "PIL"), 70, check_extraction),
    Check("synthesis-in100", "synthesis engine at the ImageNet-100 shape", ("cuda",), 30,
          _synthesis("synthesis-in100")),
    Check("synthesis-in1k", "synthesis engine at the ImageNet-1k shape", ("cuda",), 45,
          _synthesis("synthesis-in1k")),
    Check("ivf-vs-flat", "faiss IVF vs flat (recall, speed)", ("cuda", "faiss-gpu"), 45,
          check_ivf),
    Check("train-head", "train-head epoch, synthesis every step", ("cuda", "zarr"), 50,
          check_train_head),
    Check("finetune-step", "finetune step: cached tokens vs images", ("cuda", "open_clip",
          "zarr"), 30, check_finetune),
    Check("score", "score rows/s with head,knn (torch kNN)", ("cuda", "zarr"), 40,
          check_score),
]


# ---------------------------------------------------------------------------- running
def _version(dist: str, module: str | None = None) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001 - not installed, or installed without metadata
        if module and importlib.util.find_spec(module) is not None:
            return getattr(__import__(module), "__version__", "unknown")
        return None


def environment(args, device: torch.device) -> dict:
    """Machine, GPU, driver and library versions, date."""
    env = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "command": " ".join([Path(sys.executable).name, *sys.argv]), "quick": args.quick,
           "python": platform.python_version(), "platform": platform.platform(),
           "cpus": os.cpu_count(), "device": str(device), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   gpu_count=torch.cuda.device_count(),
                   cudnn=torch.backends.cudnn.version())
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    try:
        import npos

        env["npos"] = npos.__version__
    except Exception as exc:  # noqa: BLE001 - reported, never fatal
        env["npos"] = f"not importable: {exc}"
    for dist, module in (("open_clip_torch", "open_clip"), ("numpy", "numpy"),
                         ("zarr", "zarr"), ("pytest", "pytest")):
        env[module] = _version(dist, module)
    env["faiss"] = (_version("faiss-gpu", None) or _version("faiss-cpu", None)
                    or _version("faiss", "faiss"))
    env["faiss_gpus"] = faiss_gpus()
    return env


def _on_alarm(signum, frame):
    raise CheckTimeout()


def run_check(check: Check, ctx: dict) -> dict:
    """Run one check under its time limit; never raises."""
    entry = {"name": check.name, "what": check.what, "needs": list(check.needs),
             "limit_s": ctx["limit"], "status": None, "reason": None, "seconds": None,
             "results": None, "ratios": [], "error": None, "traceback": None}
    device = ctx["device"]
    needs = [n for n in check.needs if not (n == "cuda" and ctx["quick"])]
    absent = missing(needs, device)
    if absent is None and ctx["limit"] < 1:
        absent = "time (the run's budget was spent)"
    if absent is not None:
        entry.update(status="not run", reason=f"not run, because {absent} is missing")
        return entry
    start = time.perf_counter()
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, ctx["limit"])
    try:
        results = check.run(ctx)
        failed = results.pop("failed", None)
        entry.update(status="failed" if failed else "ok", error=failed, results=results,
                     ratios=results.pop("ratios", []))
        if ctx["quick"] or device.type != "cuda":  # goals are about full sizes on a GPU
            for r in entry["ratios"]:
                if r["goal"]:
                    r.update(goal=f"{r['goal']} (full sizes on a GPU only)", met=None)
    except CheckTimeout:
        entry.update(status="failed", error=f"ran past its time limit of {ctx['limit']} s",
                     traceback=traceback.format_exc())
    except ModuleNotFoundError as exc:
        entry.update(status="not run", reason=f"not run, because {exc.name} is missing",
                     traceback=traceback.format_exc())
    except BaseException as exc:  # noqa: BLE001 - one failing check never stops the rest
        if isinstance(exc, KeyboardInterrupt):
            raise
        message = " ".join(str(exc).split())[:300]
        entry.update(status="failed", error=f"{type(exc).__name__}: {message}",
                     traceback=traceback.format_exc())
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        entry["seconds"] = round(time.perf_counter() - start, 2)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return entry


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_reports(out: Path, env: dict, entries: list[dict]) -> None:
    """``gpu_check.json`` (everything) and ``gpu_check.md`` (tables), atomically."""
    out.mkdir(parents=True, exist_ok=True)
    counts = {s: sum(e["status"] == s for e in entries) for s in ("ok", "failed", "not run")}
    data = {"environment": env, "summary": counts, "checks": entries}
    lines = [f"# npos GPU check — {env['date']}", "",
             "| | |", "|---|---|"]
    for key in ("gpu", "driver", "device", "torch", "torch_cuda", "cudnn", "npos", "open_clip",
                "faiss", "faiss_gpus", "numpy", "zarr", "python", "cpus", "platform",
                "command"):
        if key in env:
            lines.append(f"| {key} | {env[key]} |")
    lines += ["", f"Checks: {counts['ok']} ok, {counts['failed']} failed, "
              f"{counts['not run']} not run."]
    if env["quick"]:
        lines += ["", "Quick sizes: these numbers show that every path runs, not its speed."]
    lines += ["",
              "| check | needs | status | seconds (limit) | ratios (value; goal) |",
              "|---|---|---|---|---|"]
    for e in entries:
        ratios = "; ".join(
            f"{r['name']} = {_short(r['value'])}"
            + (f" (goal {r['goal']}" + ("" if r["met"] is None else
                                        ": met" if r["met"] else ": NOT met") + ")"
               if r["goal"] else "")
            for r in e["ratios"]) or (e["results"] or {}).get("summary", "")
        status = e["status"] + (f": {e['error']}" if e["error"] else "") + (
            f" — {e['reason']}" if e["status"] == "not run" else "")
        needs = ", ".join(e["needs"]) or "torch"
        lines.append(f"| {e['name']} | {needs} | {status} | {e['seconds']} ({e['limit_s']}) | "
                     f"{ratios or '—'} |")
    for e in entries:
        if not e["results"]:
            continue
        flat = {k: v for k, v in e["results"].items() if k != "output_tail"}
        lines += ["", f"## {e['name']} — {e['what']}", "", "```",
                  json.dumps(flat, indent=1, default=str)[:4000], "```"]
        if e["results"].get("output_tail"):
            lines += ["", "```", e["results"]["output_tail"][-8000:], "```"]
    for name, text in (("gpu_check.json", json.dumps(data, indent=1, default=str)),
                       ("gpu_check.md", "\n".join(lines) + "\n")):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check", help="Report folder (default ./gpu_check)")
    parser.add_argument("--quick", action="store_true",
                        help="Tiny sizes; runs on a CPU too (CI)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--budget", type=float, default=460,
                        help="Seconds for all checks together (default 460: under 8 minutes)")
    parser.add_argument("--only", nargs="+", choices=[c.name for c in CHECKS],
                        help="Run only these checks")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    from npos.device import resolve_device

    device = resolve_device(args.device)
    if device.type == "cuda":
        # A plain "cuda" has no index, which torch.cuda.set_device refuses.
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None
                              else device.index)
        torch.cuda.set_device(device)
    out = Path(args.out)
    env = environment(args, device)
    sizes = QUICK if args.quick else FULL
    print(f"gpu_check: {env.get('gpu', 'no GPU')} | torch {env['torch']} (CUDA "
          f"{env['torch_cuda']}) | faiss {env['faiss']} ({env['faiss_gpus']} GPUs) | "
          f"{'quick' if args.quick else 'full'} sizes -> {out}", flush=True)
    entries = []
    for check in CHECKS:
        if args.only and check.name not in args.only:
            continue
        left = args.budget - (time.perf_counter() - started)
        ctx = {"device": device, "quick": args.quick, "sizes": sizes,
               "limit": int(min(check.limit_s, left - 2)) if left > 10 else 0}
        entry = run_check(check, ctx)
        entries.append(entry)
        ratios = "; ".join(f"{r['name']} = {_short(r['value'])}" for r in entry["ratios"])
        detail = entry["error"] or entry["reason"] or ratios
        print(f"[{entry['status']:>7}] {check.name:<16} {entry['seconds'] or 0:7.1f} s  "
              f"{detail}", flush=True)
        write_reports(out, env, entries)
    print(f"gpu_check: done in {time.perf_counter() - started:.0f} s; wrote "
          f"{out / 'gpu_check.md'} and {out / 'gpu_check.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
