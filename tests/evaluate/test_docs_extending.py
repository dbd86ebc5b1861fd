"""The "Adding a detector" example of docs/extending.md runs as written, and the detector it
registers then works from ``npos evaluate`` (so the docs cannot rot)."""

import json
import re
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from npos.cli import cli
from npos.evaluate import detector_names, ood_metrics, unregister_detector

DOC = Path(__file__).resolve().parents[2] / "docs" / "extending.md"


def _section_code(title: str) -> str:
    """The first ```python block of the ``## title`` section."""
    text = DOC.read_text(encoding="utf-8")
    section = re.split(r"^## ", text, flags=re.M)
    body = next(s for s in section if s.startswith(title + "\n"))
    return re.search(r"```python\n(.*?)```", body, re.S).group(1)


def test_adding_a_detector_example_runs(world, capsys):
    code = _section_code("Adding a detector")
    assert len(code.strip().splitlines()) <= 20
    namespace: dict = {}
    try:
        exec(compile(code, str(DOC), "exec"), namespace)
        printed = capsys.readouterr().out
        assert "centroid" in detector_names()
        # It printed four finite scores, the distances to the train mean, negated.
        values = np.array(printed.strip().strip("[]").split(), dtype=float)
        assert values.shape == (4,) and (values < 0).all()
        out = world["tmp"] / "rep"
        result = CliRunner().invoke(cli, [
            "evaluate", "--id", world["test"], "--ood", f"far={world['far']}", "--train",
            world["train"], "--scores", "centroid", "--device", "cpu", "--out", str(out)])
        assert result.exit_code == 0, result.output
        doc = json.loads((out / "metrics.json").read_text())
        # The metrics are those of the documented formula computed directly.
        mean = world["z_train"].astype(np.float32).mean(0)
        want = ood_metrics(-np.linalg.norm(world["z_test"] - mean, axis=1),
                           -np.linalg.norm(world["z_far"] - mean, axis=1))
        for key, value in want.items():
            assert abs(doc["scores"]["centroid"]["far"][key] - value) < 1e-6
    finally:
        if "centroid" in detector_names():
            unregister_detector("centroid")
