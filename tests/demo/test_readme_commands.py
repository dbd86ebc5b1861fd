"""The README's install and test commands are exactly what CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _first_block_after(text: str, heading: str) -> str:
    section = text.split(heading, 1)[1]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def test_ci_runs_the_readme_install_and_test_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    install = _first_block_after(readme, "## Install").strip()
    pip_command = install.split("&&")[-1].strip()
    assert pip_command == 'pip install -e ".[cpu,dev]"'
    assert pip_command in ci.splitlines()
    test_command = _first_block_after(readme, "## Tests").strip()
    assert test_command == "python -m pytest"
    assert test_command in ci.splitlines()
    assert "python3 -m venv" in ci and "python -m venv" in install
