"""Grid parsing and the bad-input messages of `npos sweep` (before any training)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from npos.cli import cli
from npos.commands import train_head
from npos.errors import ParameterError
from npos.sweep.grid import build_grid, parse_spec


def _fixed(**over):
    ctx = train_head.command.make_context("train-head", ["x", "--out", "y"])
    values = {k: v for k, v in ctx.params.items()
              if k not in ("features", "out", "outliers", "val", "tpr", "seed", "device", "resume",
                           "overwrite")}
    return {**values, **over}


def test_spec_and_toml_table_give_the_same_points():
    text = build_grid("sigma=0.01,0.03 k=50,200 method=npos,gaussian ood-weight=0,0.1",
                      train_head.command, _fixed())
    table = build_grid({"sigma": [0.01, 0.03], "k": [50, 200], "method": ["npos", "gaussian"],
                        "ood_weight": [0, 0.1]}, train_head.command, _fixed())
    assert text.points == table.points
    # npos: 2 sigmas x 2 k; gaussian: 2 sigmas (k does not change its outliers); one ablation
    assert len(text.points) == 4 + 2 + 1
    assert {(p["method"], p["k"]) for p in text.points if p["ood_weight"] > 0} == {
        ("npos", 50), ("npos", 200), ("gaussian", 50)}
    assert [p for p in text.points if p["ood_weight"] == 0] == [
        {**_fixed(), "sigma": 0.01, "k": 50, "method": "npos", "ood_weight": 0.0}]
    assert text.swept == ["sigma", "k", "method", "ood-weight"]
    assert isinstance(text.points[0]["k"], int) and isinstance(text.points[0]["sigma"], float)


def test_the_ablation_is_always_included():
    grid = build_grid("sigma=0.01,0.03", train_head.command, _fixed(ood_weight=0.1))
    assert [p["ood_weight"] for p in grid.points] == [0.1, 0.1, 0.0]
    assert parse_spec("a=1,2 b=x") == {"a": ["1", "2"], "b": ["x"]}


@pytest.mark.parametrize("spec, fixed, message", [
    ("sigmaa=0.1", {}, "--grid: unknown option 'sigmaa' (keys are train-head option names); "
                    "did you mean sigma?"),
    ("seed=1,2", {}, "--grid: 'seed' cannot be swept (the sweep sets it)"),
    ("k=5,x", {}, "--grid k: 'x' is not a valid integer range."),
    ("method=npos,foo", {}, "--grid method: 'foo' is not one of 'npos', 'vos', 'gaussian'."),
    ("sigma", {}, "--grid takes KEY=V1,V2,... entries separated by spaces; got 'sigma'"),
    ("sigma=0.01,0.03 ood-weight=0", {},
     "--grid sweeps 'sigma', which no point uses (every point has ood-weight 0: no synthesis)"),
    ("synth-every=1,2", {"id_loss": "none"},
     "--grid sweeps 'synth-every', which no point uses (offline outliers with --id-loss none, "
     "or ood-weight 0)"),
    ("select=10,20", {"method": "gaussian"},
     "--grid sweeps 'select', which no point uses (not used by --method gaussian/vos, nor "
     "with ood-weight 0)"),
    ("k=1,2,3,4,5,6 sigma=0.1,0.2", {},
     "--grid makes 13 points, more than --max-points 10; narrow the grid or raise "
     "--max-points"),
])
def test_bad_grids_name_the_problem(spec, fixed, message):
    with pytest.raises(ParameterError) as err:
        build_grid(spec, train_head.command, _fixed(**fixed), max_points=10)
    assert str(err.value) == message


@pytest.mark.parametrize("extra, message", [
    (["--grid", "k=5,x"], "--grid k: 'x' is not a valid integer range."),
    (["--grid", "sigma=0.01,0.02", "--k", "60"],
     "--k 60 must be an int in the range [1, 50) (--k < --queue 50: the K-th nearest other "
     "point); values that fit --queue 50: try --k 16"),
    (["--grid", "sigma=0.01,0.02", "--holdout-classes", "1"],
     "--holdout-classes replaces --val-id/--val-ood; give one or the other"),
    (["--grid", "sigma=0.01,0.02", "--scores", "head,foo"], "unknown score(s) 'foo'; choose "
     "from mcm"),
    (["--grid", "sigma=0.01,0.02", "--baselines", "knn,head"], "--baselines score the frozen "
     "embeddings: 'head' needs a trained head (it is in --scores)"),
    (["--grid", "sigma=0.01,0.02", "--sort-by", "head/average/auc"],
     "--sort-by 'head/average/auc': expected SCORE/SET/auroc|fpr95 with SCORE one of head, "
     "knn, mcm (or id_accuracy)"),
])
def test_cli_bad_input_is_one_line_exit_2_before_training(data, small, tmp_path, extra,
                                                          message):
    out = tmp_path / "sweep"
    result = CliRunner().invoke(cli, ["sweep", *data, "--out", str(out), *small,
                                      *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("n, message", [
    (3, "--holdout-classes 3: {train!r} has 4 labelled classes and at least 2 must stay "
        "in-distribution"),
    (9, "--holdout-classes 9: {train!r} has 4 labelled classes and at least 2 must stay "
        "in-distribution")])
def test_too_many_held_out_classes(world, small, tmp_path, n, message):
    out = tmp_path / "sweep"
    result = CliRunner().invoke(cli, ["sweep", world["train"], "--holdout-classes", str(n),
                                      "--grid", "sigma=0.01,0.02", "--out", str(out), *small])
    assert result.exit_code == 2
    assert message.format(train=world["train"]) in result.output
    assert not out.exists()


def test_grid_from_a_config_table(data, small, tmp_path):
    config = tmp_path / "sweep.toml"
    config.write_text('[sweep.grid]\nsigma = [0.01, "x"]\n')
    result = CliRunner().invoke(cli, ["sweep", *data, "--out", str(tmp_path / "o"),
                                      "--config", str(config), *small])
    assert result.exit_code == 2
    assert "--grid sigma: 'x' is not a valid float range." in result.output
