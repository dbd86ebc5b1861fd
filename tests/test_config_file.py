"""`--config FILE.toml` on every command: precedence, tables, value types, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

from npos.cli import cli
from npos.store import FeatureStore

NAMES = ["cat", "dog", "fox", "owl"]
FAST = {"k": 10, "select": 30, "candidates": 100, "queue": 100}


@pytest.fixture
def features(tmp_path, make_store, rng):
    centres = rng.normal(size=(4, 16))
    y = np.repeat(np.arange(4), 100)
    x = (centres[y] + 0.4 * rng.normal(size=(y.size, 16))) * 10
    make_store(tmp_path / "f.zarr", x, y, class_names=NAMES, text_embeddings=centres)
    return str(tmp_path / "f.zarr")


def _toml(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _fast_table(**changes) -> str:
    return "\n".join(f"{k} = {v}" for k, v in {**FAST, **changes}.items())


def _invoke(*args):
    return CliRunner().invoke(cli, list(args))


def _summary_line(output: str) -> str:
    return next(line for line in output.splitlines() if "outliers from" in line)


def test_file_values_are_used_and_flags_win(features, tmp_path):
    config = _toml(tmp_path / "c.toml", f"[synthesize]\n{_fast_table(seed=5)}\nsigma = 0.02\n")
    out = str(tmp_path / "o.zarr")
    result = _invoke("synthesize", features, "--out", out, "--config", config, "--seed", "3")
    assert result.exit_code == 0, result.output
    line = _summary_line(result.output)
    assert "k=10 select=30 pick=3 candidates=100" in line and "sigma=0.02 queue=100" in line
    assert "seed=3" in line  # the flag beats the file's seed = 5
    # the same with --config given last: the order on the command line does not matter
    result = _invoke("synthesize", features, "--stats-only", "--seed", "3", "--config", config)
    assert "seed=3" in _summary_line(result.output)
    settings = FeatureStore.open(out).attrs["settings"]
    assert settings["k"] == 10 and settings["sigma"] == 0.02 and settings["seed"] == 3
    assert settings["npos_version"] and settings["device"] == "cpu"


def test_table_beats_top_level_and_other_commands_keys_are_ignored(features, tmp_path):
    config = _toml(tmp_path / "c.toml",
                   "seed = 7\nk = 11\nepochs = 2\nstats-only = true\n"
                   f"[synthesize]\n{_fast_table(seed=4)}\n[train-head]\nood-weight = 0.5\n")
    result = _invoke("synthesize", features, "--config", config, "--k", "12")
    assert result.exit_code == 0, result.output
    line = _summary_line(result.output)
    assert "seed=4" in line and "k=12" in line  # table > top level; flag > table
    assert "--stats-only: nothing written" in result.output  # a boolean flag from the file


def test_group_subcommand_tables_and_underscore_keys(tmp_path, rng):
    np.save(tmp_path / "e.npy", rng.normal(size=(50, 8)).astype(np.float32))
    for i, table in enumerate(["[store.import]", '["store import"]']):
        out = str(tmp_path / f"s{i}.zarr")
        config = _toml(tmp_path / f"c{i}.toml",
                       f'{table}\nembeddings = "{tmp_path / "e.npy"}"\nchunk_rows = 7\n'
                       f'dtype = "float32"\nout = "{out}"\n')
        result = _invoke("store", "import", "--config", config)
        assert result.exit_code == 0, result.output
        store = FeatureStore.open(out)
        assert store.attrs["chunk_rows"] == 7 and store.dtype == "float32"


def test_repeatable_options_are_arrays_and_required_options_come_from_the_file(
        features, tmp_path, make_store, rng):
    for name in ("a", "b"):
        make_store(tmp_path / f"{name}.zarr", rng.normal(size=(40, 16)))
    report = tmp_path / "rep"
    config = _toml(tmp_path / "c.toml", f'[evaluate]\nid = "{features}"\nood = '
                   f'["far={tmp_path / "a.zarr"}", "near={tmp_path / "b.zarr"}"]\n'
                   f'out = "{report}"\nscores = "mcm"\nmcm-temperature = 2\n')
    result = _invoke("evaluate", "--config", config, "--device", "cpu")
    assert result.exit_code == 0, result.output
    doc = json.loads((report / "metrics.json").read_text())
    assert list(doc["scores"]["mcm"]) == ["far", "near", "average"]
    # a flag given on the command line replaces the file's whole list
    result = _invoke("evaluate", "--config", config, "--ood", f"only={tmp_path / 'a.zarr'}",
                     "--overwrite")
    assert result.exit_code == 0, result.output
    doc = json.loads((report / "metrics.json").read_text())
    assert list(doc["scores"]["mcm"]) == ["only", "average"]


@pytest.mark.parametrize("text, message", [
    ("[synthesize]\nkk = 3\n",
     "unknown key 'kk' in [synthesize]; did you mean k?"),
    ("[train-head]\nepoch = 3\n",  # a typo in another command's table is reported too
     "unknown key 'epoch' in [train-head]; did you mean epochs"),
    ("no-such-option = 1\n", "unknown key 'no-such-option' at the top level"),
    ("[synthesise]\nk = 3\n", "unknown command table [synthesise]"),
    ("[store.imprt]\nk = 3\n", "unknown command table [store.imprt]"),
    ("[synthesize]\nk = 3\nstats_only = true\nstats-only = true\n",
     "'stats_only' and 'stats-only' in [synthesize] are the same option"),
    ("k = 'ten'\n", "The 'k' key at the top level of config file {path!r} must be an int. "
                    "Got 'ten' instead."),
    ("[synthesize]\nk = 2.5\n", "The 'k' key in [synthesize] of config file {path!r} must be "
                                "an int. Got 2.5 instead."),
    ("[synthesize]\nsigma = true\n", "must be a float. Got True instead."),
    ("[synthesize]\nstats-only = 'yes'\n", "must be a boolean. Got 'yes' instead."),
    ("[synthesize]\nk = 0\n", "The 'k' key in [synthesize] of config file {path!r} is "
                              "invalid: 0 is not in the range x>=1."),
    ("[synthesize]\nmethod = 'npos2'\n", "'method' key in [synthesize]"),
    ("[evaluate]\nood = 'far=a.zarr'\n", "must be an array (--ood is repeatable)"),
    ("[evaluate]\nood = [1]\n", "must be an array of strings"),
    ("[evaluate]\nhead = 'no-such-dir'\n", "The 'head' key in [evaluate] of config file "
                                          "{path!r} is invalid: Directory 'no-such-dir' does "
                                          "not exist."),
    ("[synthesize]\nk = \n", "config file {path!r} is not valid TOML: "),
    ("synthesize = 3\n", "unknown key 'synthesize' at the top level"),
])
def test_bad_files_are_one_line_errors_naming_file_and_key(features, tmp_path, text, message):
    config = _toml(tmp_path / "c.toml", text)
    # values are type-checked for the command that runs; names are checked for all
    args = (["evaluate"] if text.startswith("[evaluate]")
            else ["synthesize", features, "--stats-only"])
    result = _invoke(*args, "--config", config)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert message.format(path=config) in lines[0]
    assert config in lines[0]


def test_missing_file_and_directory(features, tmp_path):
    for path in (tmp_path / "nope.toml", tmp_path):
        result = _invoke("synthesize", features, "--config", str(path))
        assert result.exit_code == 2
        assert result.output.strip().splitlines() == [
            f"Error: config file {str(path)!r} "
            + ("does not exist" if path.suffix else "is a directory")]


def _leaves(group: click.Group, prefix=()):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _leaves(command, (*prefix, name))
        else:
            yield (*prefix, name)


def test_every_command_takes_config_and_help_mentions_it():
    result = _invoke("--help")
    assert "--config FILE.toml" in result.output
    leaves = list(_leaves(cli))
    assert ("store", "import") in leaves and len(leaves) >= 10
    for path in leaves:
        result = _invoke(*path, "--help")
        assert result.exit_code == 0 and "--config FILE.toml" in result.output, path


def test_readme_example_is_a_valid_config_file(tmp_path):
    from npos.config_file import read_config_file, split_config

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = readme.split("```toml\n# npos.toml\n", 1)[1].split("```", 1)[0]
    path = _toml(tmp_path / "npos.toml", example)
    top, tables = split_config(read_config_file(path), cli, path)
    assert top == {"device": "cuda", "seed": 0}
    assert set(tables) == {"synthesize", "train-head", "evaluate", "store.import"}
