"""The README's quick start, install and test commands are exactly what CI runs."""

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _first_block_after(text: str, heading: str) -> str:
    section = text.split(heading, 1)[1]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def _commands(block: str) -> list[str]:
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_install_and_test_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    dev = (ROOT / "dev").read_text()
    install = _first_block_after(readme, "## Install").strip()
    pip_command = install.split("&&")[-1].strip()
    assert pip_command == 'pip install -e ".[cpu,dev]"'
    test_command = _first_block_after(readme, "## Tests").strip()
    assert test_command == "python -m pytest"
    # CI runs the quick start's test target; the target runs the README's commands.
    assert _commands(_first_block_after(readme, "## Quick start")) == ["./dev demo", "./dev test"]
    assert "./dev test" in ci.splitlines()
    assert 'rm -rf "$NPOS_VENV"' in ci  # a fresh environment on every CI run
    dev_lines = [line.strip() for line in dev.splitlines()]
    assert pip_command in dev_lines
    assert any(line.startswith(test_command) for line in dev_lines)
    assert "python3 -m venv" in dev and "python -m venv" in install


def test_dev_refuses_an_unknown_target():
    proc = subprocess.run([str(ROOT / "dev"), "nonsense"], capture_output=True, text=True,
                          env={**os.environ, "NPOS_VENV": "/nonexistent-npos-venv"})
    assert proc.returncode == 2
    assert "usage: ./dev demo|test" in proc.stderr
    assert not Path("/nonexistent-npos-venv").exists()
