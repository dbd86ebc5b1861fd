"""The README's "Real-world recipe" and "Python API" examples run as written, on generated data.

The code blocks are read from README.md (so the test follows the README) and run in-process in
a temporary folder. Only what cannot run here is substituted, each replacement asserted to
match the README text:

* the encoder: ``--model ViT-B-16 --pretrained openai`` -> ``--model npos-tiny --pretrained
  none`` (a seeded random-init ViT with 3 blocks, so ``--tokens-layer 10`` -> ``1``);
* the data: ``/data/...`` -> generated image folders under ``TMP/data/...`` with the same
  layout (ImageNet WordNet-id class folders, so ``--class-names imagenet`` works as is);
  ``feats/new-images.zarr``, which the recipe assumes exists, is extracted first;
* sizes for 24 images per class: ``--queue 16 --k 4 --select 8 --pick 2 --candidates 16``,
  2 epochs with synthesis from epoch 1, batches of 16, ``--workers 0``.

The Python API example runs with no substitution at all, on stores imported from generated
embeddings (1,000 rows per class, as its default queue needs).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from npos.cli import cli

ROOT = Path(__file__).resolve().parents[2]
WNIDS = (ROOT / "npos" / "data" / "imagenet_wnids.txt").read_text().split()[:3]

RECIPE_SUBSTITUTIONS = [
    ("--model ViT-B-16 --pretrained openai", "--model npos-tiny --pretrained none"),
    ("--tokens-layer 10", "--tokens-layer 1"),
    ("--batch-size 256 --workers 16", "--batch-size 16 --workers 0"),
    ("--queue 1000 --k 400 --select 300 --pick 3 --candidates 1500",
     "--queue 16 --k 4 --select 8 --pick 2 --candidates 16"),
    ("--epochs 20 --start-epoch 10", "--epochs 2 --start-epoch 1"),
    ("--epochs 20", "--epochs 2"),
    ("--batch-size 800", "--batch-size 16"),
]


def readme_block(heading: str, language: str) -> str:
    """The first ``language`` code block after ``heading`` in README.md."""
    section = (ROOT / "README.md").read_text(encoding="utf-8").split(heading, 1)[1]
    return re.search(rf"```{language}\n(.*?)```", section, re.DOTALL).group(1)


def shell_commands(script: str) -> list[list[str]]:
    """The commands of a small bash script: comments, ``\\`` continuations, ``X="..."``
    assignments, ``$X`` expansion and ``for v in ...; do ...; done`` loops."""
    lines = [ln for ln in script.replace("\\\n", " ").splitlines()
             if ln.strip() and not ln.strip().startswith("#")]
    env: dict[str, str] = {}
    commands: list[list[str]] = []

    def expand(text: str, extra: dict[str, str]) -> str:
        return re.sub(r"\$(\w+)", lambda m: {**env, **extra}[m.group(1)], text)

    i = 0
    while i < len(lines):
        line = lines[i].strip()
        assign = re.fullmatch(r'(\w+)="(.*)"', line)
        loop = re.fullmatch(r"for (\w+) in (.*); do", line)
        if assign:
            env[assign.group(1)] = assign.group(2)
        elif loop:
            end = next(j for j in range(i, len(lines)) if lines[j].strip() == "done")
            for value in loop.group(2).split():
                commands += [shlex.split(expand(body, {loop.group(1): value}), comments=True)
                             for body in lines[i + 1:end]]
            i = end
        else:
            commands.append(shlex.split(expand(line, {}), comments=True))
        i += 1
    return commands


def _images(folder: Path, n: int, *, seed: int, classes=("",)) -> None:
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            base = np.full((32, 32, 3), 90.0)
            if name:
                base[..., c] = 220
            pixels = np.clip(base + rng.normal(0, 35, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / name / f"img{i:03d}.png")


def test_shell_commands_parser():
    script = ('A="--x 1"\n# c\nnpos a $A \\\n  --y 2  # note\n'
              'for s in p q; do\n  npos b $s/$A\ndone\n')
    assert shell_commands(script) == [["npos", "a", "--x", "1", "--y", "2"],
                                      ["npos", "b", "p/--x", "1"], ["npos", "b", "q/--x", "1"]]


@pytest.mark.slow
def test_readme_real_world_recipe_runs(tmp_path, monkeypatch):
    script = readme_block("## Real-world recipe", "bash")
    for old, new in RECIPE_SUBSTITUTIONS:
        assert old in script, f"README recipe no longer contains {old!r}"
        script = script.replace(old, new)
    script = script.replace("/data/", f"{tmp_path}/data/")
    _images(tmp_path / "data/in100/train", 24, seed=0, classes=WNIDS)
    _images(tmp_path / "data/in100/val", 8, seed=1, classes=WNIDS)
    for k, name in enumerate(("iNaturalist", "SUN", "Places", "Textures")):
        _images(tmp_path / "data/ood" / name, 8, seed=10 + k)
    _images(tmp_path / "data/new-images", 6, seed=20)
    monkeypatch.chdir(tmp_path)
    commands = shell_commands(script)
    assert [c[1] for c in commands] == ["extract"] * 6 + ["synthesize", "train-head",
                                        "train-head", "finetune", "evaluate", "evaluate",
                                        "evaluate", "score"]
    runner = CliRunner()
    setup = ["extract", "data/new-images", "--out", "feats/new-images.zarr", "--model",
             "npos-tiny", "--pretrained", "none", "--tokens-layer", "1"]
    commands.insert(6, ["npos", *setup])
    for command in commands:
        assert command[0] == "npos"
        result = runner.invoke(cli, command[1:])
        assert result.exit_code == 0, f"{shlex.join(command)}\n{result.output}"
    for report in ("zero-shot", "head-paper", "finetune"):
        assert (tmp_path / "reports" / report / "report.md").exists()
    assert (tmp_path / "scores.parquet").exists()
    assert not (tmp_path / "runs" / "outliers.zarr").exists()  # --stats-only writes nothing


@pytest.mark.slow
def test_readme_python_api_example_runs(tmp_path, monkeypatch):
    from npos.store import import_embeddings

    code = readme_block("## Python API", "python")
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(2, 16)) * 2
    (tmp_path / "gen").mkdir()
    for split, n, labeled in (("train", 2000, True), ("test", 200, True), ("ood", 200, False)):
        y = np.arange(n) % 2
        z = centers[y] + rng.normal(size=(n, 16)) if labeled else rng.normal(size=(n, 16)) * 2
        np.save(tmp_path / "gen" / f"{split}.npy", z.astype(np.float32))
        np.save(tmp_path / "gen" / f"{split}_y.npy", y if labeled else np.full(n, -1))
        np.save(tmp_path / "gen" / "text.npy", centers.astype(np.float32))
        import_embeddings(tmp_path / "gen" / f"{split}.npy", str(tmp_path / f"feats/{split}.zarr"),
                          labels=tmp_path / "gen" / f"{split}_y.npy",
                          text_embeddings=tmp_path / "gen" / "text.npy", model="generated",
                          chunk_rows=512)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), namespace)  # noqa: S102 (the test)
    assert namespace["scores"].shape == (10,)
    assert set(namespace["res"].metrics) == {"mcm", "knn", "head"}
    assert (tmp_path / "reports" / "run1" / "metrics.json").exists()
