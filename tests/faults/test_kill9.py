"""``kill -9`` at three seeded points in each long command; the re-run gives identical output.

Each case runs the CLI in a child process (``kill_at.py``) that SIGKILLs itself at a chosen
point — after the k-th store chunk is done, in the middle of the k-th chunk (rows written, not
its ``done`` flag), right after the output store is created, after the k-th epoch's resumable
state is saved, or when the k-th epoch is finished but not yet saved. k is drawn from a seeded
generator. Then the command is re-run as its contract says (in-process, for speed):

* ``extract``, ``store import``: the same command again (it resumes from the done chunks);
* ``train-head``, ``finetune``: the same command with ``--resume``;
* ``synthesize --out``, ``score --out x.zarr``: a plain re-run is refused (the output exists),
  the same command with ``--overwrite`` writes it again (both are cheap to recompute).

Every re-run takes over the killed run's stale writer lock with a warning, and its output must
equal an uninterrupted run's: every array of a store, every tensor of a head or tail.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from PIL import Image

from npos.cli import cli
from npos.store import FeatureStore, find_problems

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SEED = 20261130
_rng = np.random.default_rng(SEED)


def _k(n_units: int) -> int:
    """A seeded kill point in 1..n_units-1 (so the kill always comes before the end)."""
    return int(_rng.integers(1, n_units))


#: (command, kill point, k). Unit counts: extract 9 chunks, import 10 chunks, synthesize 1
#: chunk, train-head 4 epochs, finetune 3 epochs then 9 re-embedded chunks, score 10 chunks.
CASES = [
    ("extract", "chunk-after", _k(9)), ("extract", "chunk-during", _k(9)),
    ("extract", "create-after", 1),
    ("import", "chunk-after", _k(10)), ("import", "chunk-during", _k(10)),
    ("import", "chunk-after", _k(10)),
    ("synthesize", "create-after", 1), ("synthesize", "chunk-during", 1),
    ("synthesize", "chunk-after", 1),
    ("train-head", "epoch-after", _k(4)), ("train-head", "epoch-during", _k(4)),
    ("train-head", "epoch-after", _k(4)),
    ("finetune", "epoch-after", _k(3)), ("finetune", "epoch-during", _k(3)),
    ("finetune", "chunk-during", _k(9)),
    ("score", "chunk-after", _k(10)), ("score", "chunk-during", _k(10)),
    ("score", "create-after", 1),
]
RESUME = {"extract": [], "import": [], "train-head": ["--resume"], "finetune": ["--resume"],
          "synthesize": ["--overwrite"], "score": ["--overwrite"]}


def _images(root: Path, per_class: int) -> Path:
    rng = np.random.default_rng(0)
    for c, name in enumerate(("red", "green", "blue")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            base = np.full((32, 32, 3), 90.0)
            base[..., c] = 220
            pixels = np.clip(base + rng.normal(0, 35, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"img{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Inputs of every command, and the command line of each (``OUT`` stands for the output)."""
    root = tmp_path_factory.mktemp("kill9")
    images = _images(root / "images", 12)  # 36 images: 9 chunks of 4
    rng = np.random.default_rng(1)
    y = np.arange(1000) % 4
    np.save(root / "emb.npy", (rng.normal(size=(4, 16))[y] * 3
                               + rng.normal(size=(1000, 16))).astype(np.float32))
    np.save(root / "labels.npy", y)
    features = str(root / "features.zarr")
    small = ["--queue", "50", "--k", "5", "--select", "10", "--pick", "2", "--candidates", "20"]
    commands = {
        "extract": ["extract", str(images), "--out", "OUT", "--model", "npos-tiny",
                    "--pretrained", "none", "--chunk-rows", "4", "--batch-size", "4",
                    "--workers", "0", "--dtype", "float32", "--tokens-layer", "1"],
        "import": ["store", "import", "--embeddings", str(root / "emb.npy"), "--labels",
                   str(root / "labels.npy"), "--model", "generated", "--chunk-rows", "100",
                   "--out", "OUT"],
        "synthesize": ["synthesize", features, "--out", "OUT", *small, "--device", "cpu"],
        "train-head": ["train-head", features, "--out", "OUT", *small, "--epochs", "4",
                       "--start-epoch", "1", "--batch-size", "250", "--device", "cpu"],
        "score": ["score", features, "--train", features, "--scores", "knn", "--knn-k", "5",
                  "--batch-size", "100", "--device", "cpu", "--out", "OUT"],
    }
    _run([*_with_out(commands["import"], features)])
    tokens = str(root / "tokens.zarr")
    _run(_with_out(commands["extract"], tokens))
    commands["finetune"] = [
        "finetune", tokens, "--out", "OUT", "--model", "npos-tiny", "--pretrained", "none",
        "--queue", "8", "--k", "2", "--select", "4", "--pick", "2", "--candidates", "8",
        "--epochs", "3", "--start-epoch", "1", "--batch-size", "12", "--embed",
        f"again={tokens}", "--device", "cpu"]
    return {"root": root, "commands": commands, "references": {}}


def _with_out(args: list[str], out: str) -> list[str]:
    return [out if a == "OUT" else a for a in args]


def _run(args: list[str]) -> None:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, f"npos {' '.join(args)}\n{result.output}"


def _output_name(command: str) -> str:
    return {"train-head": "head", "finetune": "ft", "score": "scores.zarr"}.get(
        command, "out.zarr")


def _reference(inputs, command: str) -> Path:
    """The output of an uninterrupted run (made once per command)."""
    refs = inputs["references"]
    if command not in refs:
        out = inputs["root"] / "reference" / command / _output_name(command)
        out.parent.mkdir(parents=True)
        _run(_with_out(inputs["commands"][command], str(out)))
        refs[command] = out
    return refs[command]


def _kill_at(point: str, k: int, args: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(HERE / "kill_at.py"), point, str(k), *args],
                          env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == -signal.SIGKILL, \
        f"expected a kill at {point} {k}, got exit {proc.returncode}:\n{proc.stderr[-3000:]}"


def assert_same_store(got: Path, want: Path) -> None:
    """Every array of store ``got`` equals ``want``'s (NaN where NaN), and it verifies clean."""
    store = FeatureStore.open(str(got))
    assert store.is_complete and find_problems(store) == []
    g, w = zarr.open_group(str(got), mode="r"), zarr.open_group(str(want), mode="r")
    assert sorted(g.array_keys()) == sorted(w.array_keys())
    for name in w.array_keys():
        np.testing.assert_array_equal(g[name][...], w[name][...], err_msg=name)


def assert_same_tensors(got: Path, want: Path) -> None:
    from safetensors.numpy import load_file

    a, b = load_file(str(got)), load_file(str(want))
    assert sorted(a) == sorted(b)
    for key in b:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def assert_same_output(command: str, got: Path, want: Path) -> None:
    if command == "train-head":
        assert_same_tensors(got / "model.safetensors", want / "model.safetensors")
        assert not got.with_name(got.name + ".partial").exists()
    elif command == "finetune":
        assert_same_tensors(got / "tail.safetensors", want / "tail.safetensors")
        assert_same_tensors(got / "head" / "model.safetensors", want / "head" / "model.safetensors")
        assert_same_store(got / "again.zarr", want / "again.zarr")
        assert not (got / "train.partial").exists()
    else:
        assert_same_store(got, want)


@pytest.mark.parametrize("command,point,k", CASES,
                         ids=[f"{c}-{p}-{k}" for c, p, k in CASES])
def test_kill9_then_rerun_gives_identical_output(inputs, tmp_path, command, point, k):
    want = _reference(inputs, command)
    out = tmp_path / _output_name(command)
    args = _with_out(inputs["commands"][command], str(out))
    _kill_at(point, k, args)
    if command in ("synthesize", "score"):  # the output exists: a plain re-run is refused
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2 and "pass --overwrite" in result.output
    with pytest.warns(UserWarning, match="taking over the stale lock"):
        _run(args + RESUME[command])
    assert_same_output(command, out, want)
