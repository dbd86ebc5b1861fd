"""Logging: the root logger is never changed, third-party chatter is shown once, the final
error stays one line, and -q/-v set what the CLI's one handler shows."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from npos.cli import cli
from npos.log import get_logger, third_party_logs

REPO_ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    # A child process: under pytest the root logger already has pytest's handlers, which
    # would hide a logging.basicConfig() triggered by a third party.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def images(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
                tmp_path / "data" / name / f"{i}.png")
    return tmp_path / "data"


def _root_state() -> tuple:
    root = logging.getLogger()
    return list(root.handlers), list(root.filters), root.level


def test_importing_npos_and_running_a_command_leave_the_root_logger_alone(images, tmp_path):
    # open_clip logs through the root logger with module-level logging.info(), which
    # configures root (logging.basicConfig) when it has no handler.
    result = _python("""
        import logging, sys
        root = logging.getLogger()
        before = (list(root.handlers), root.level)
        import npos, npos.cli, npos.log
        assert (list(root.handlers), root.level) == before, "import"
        from click.testing import CliRunner
        out = CliRunner().invoke(npos.cli.cli, ["extract", sys.argv[1], "--out", sys.argv[2],
                                                "--model", "npos-tiny", "--workers", "0"])
        assert out.exit_code == 0, out.output
        assert (list(root.handlers), root.level) == before, root.handlers
        assert logging.getLogger("npos").handlers[1:] == [], "CLI handler left behind"
        print("ok")
        """, str(images), str(tmp_path / "s.zarr"))
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_in_process_command_restores_root_and_npos_loggers(images, tmp_path):
    before = _root_state()
    npos_logger = logging.getLogger("npos")
    npos_before = (list(npos_logger.handlers), npos_logger.level)
    result = CliRunner().invoke(cli, ["extract", str(images), "--out", str(tmp_path / "s.zarr"),
                                      "--model", "npos-tiny", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert _root_state() == before
    assert (list(npos_logger.handlers), npos_logger.level) == npos_before


# A stand-in for open_clip.create_model offline: huggingface_hub's logger (its own stderr
# handler) reports retries, open_clip logs through root (configuring it when it has no
# handler) and logs the error it then raises.
FAKE_OFFLINE = """
    import logging, sys
    import open_clip
    import npos.cli

    hub = logging.getLogger("fakehub.http")
    hub.addHandler(logging.StreamHandler())  # as huggingface_hub does

    def create_model(*args, **kwargs):
        logging.info("Loaded built-in ViT-B-32 model config.")
        for attempt in (1, 2):
            hub.warning("RETRY-CHATTER attempt %d", attempt)
        logging.warning("ROOT-WARNING from open_clip")
        logging.error("Failed to download weights for tag 'openai': NO-NETWORK")
        raise RuntimeError("Failed to download weights for tag 'openai': NO-NETWORK")

    open_clip.create_model = create_model
    sys.argv = ["npos", "extract", sys.argv[1], "--out", sys.argv[2], "--model", "ViT-B-32",
                "--pretrained", "openai"]
    npos.cli.main()
    """


def test_third_party_chatter_is_shown_once_and_the_error_stays_one_line(images, tmp_path):
    result = _python(FAKE_OFFLINE, str(images), str(tmp_path / "s.zarr"))
    assert result.returncode == 2, result.stderr
    err = result.stderr
    assert err.count("RETRY-CHATTER attempt 1") == 1 and err.count("RETRY-CHATTER attempt 2") == 1
    assert err.count("ROOT-WARNING from open_clip") == 1
    assert "Warning: ROOT-WARNING from open_clip" in err  # through the npos handler
    assert err.count("NO-NETWORK") == 1  # the exception repeats open_clip's error log
    last = err.strip().splitlines()[-1]
    assert last.startswith("Error: weights for 'ViT-B-32' (openai) could not be downloaded")
    assert "NO-NETWORK" in last and "Traceback" not in err


def test_quiet_and_verbose_set_what_the_cli_shows():
    result = _python("""
        import logging
        from npos.cli import cli

        @cli.command("probe")
        def probe():
            log = logging.getLogger("npos.probe")
            log.debug("NPOS-DEBUG")
            log.info("NPOS-INFO")
            log.warning("NPOS-WARNING")

        for args in (["probe"], ["-v", "probe"], ["-q", "probe"]):
            cli.main(args, standalone_mode=False)
        """)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("NPOS-DEBUG") == 1  # -v only
    assert result.stderr.count("NPOS-INFO") == 2  # default and -v, not -q
    assert result.stderr.count("Warning: NPOS-WARNING") == 3
    assert result.stdout == ""  # messages never go to stdout


def test_third_party_logs_forwards_to_npos_and_restores_root(caplog):
    before = _root_state()
    with caplog.at_level(logging.DEBUG, logger="npos"):
        with third_party_logs(drop=("DROP ME",)):
            logging.getLogger("somelib").warning("lib warning")
            logging.getLogger().warning("DROP ME please")
            with pytest.raises(RuntimeError), third_party_logs(errors_in_exception=True):
                logging.getLogger("somelib").error("held back")
                raise RuntimeError("held back")
            logging.getLogger("otherlib").error("shown error")
    assert _root_state() == before
    forwarded = [(r.name, r.levelname, r.getMessage()) for r in caplog.records
                 if r.name == "npos.external"]
    assert forwarded == [("npos.external", "WARNING", "lib warning"),
                         ("npos.external", "ERROR", "shown error")]


def test_get_logger_names_children_of_npos():
    assert get_logger("npos.extract").name == "npos.extract"
    assert get_logger("demo").name == "npos.demo"
    assert get_logger().name == "npos"
