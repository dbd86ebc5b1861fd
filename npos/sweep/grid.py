"""The grid of a sweep: ``"sigma=0.005,0.01 k=50,200 ood-weight=0,0.1"`` -> checked points.

Every key is a ``train-head`` option name; values are converted by that option's own click
type (int, float, choice, ranges), so a wrong type or value fails here, before any training.
A key with one value fixes the option. ``ood-weight=0`` (the ablation) is always a point.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import click

from npos.errors import ParameterError

#: train-head options the sweep sets itself (or that make no sense to sweep).
NOT_SWEPT = ("out", "outliers", "val", "tpr", "seed", "device", "resume", "overwrite",
             "config")
#: The synthesis options: what every point with ``ood-weight`` 0 ignores.
SYNTHESIS_KEYS = ("method", "k", "select", "pick", "candidates", "sigma", "noise-space", "keep",
                  "queue", "backend", "start-epoch", "synth-every", "outliers-per-step")
DEFAULT_MAX_POINTS = 200


def option_key(name: str) -> str:
    """``ood_weight`` / ``--ood-weight`` -> ``ood-weight``."""
    return name.lstrip("-").replace("_", "-")


def sweepable_options(command: click.Command) -> dict[str, click.Option]:
    """``{"ood-weight": <click.Option>, ...}``: the options of ``command`` (train-head) a grid
    may name."""
    return {option_key(p.name): p for p in command.params
            if isinstance(p, click.Option) and p.name not in NOT_SWEPT}


@dataclass
class Grid:
    """Checked grid values per option key (in the order given) and the points they make.

    Attributes
    ----------
    values : dict of str to list
        Option key -> converted values (at least one each).
    points : list of dict
        Every combination, as ``{option_name: value}`` (underscore names, train-head's
        keyword arguments), with the ``ood_weight`` 0 ablation added when missing.
    """

    values: dict[str, list[Any]]
    points: list[dict[str, Any]] = field(default_factory=list)

    @property
    def swept(self) -> list[str]:
        """Keys with more than one value (the plotted parameters)."""
        return [k for k, v in self.values.items() if len(v) > 1]


def parse_spec(spec: str | Mapping[str, Any]) -> dict[str, list[Any]]:
    """``"a=1,2 b=x"`` (or a TOML table ``{a = [1, 2], b = "x"}``) -> ``{"a": [...], ...}``
    of raw values (strings from a spec, TOML values from a table)."""
    if isinstance(spec, Mapping):
        return {option_key(str(k)): list(v) if isinstance(v, (list, tuple)) else [v]
                for k, v in spec.items()}
    out: dict[str, list[Any]] = {}
    for item in str(spec).split():
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise ParameterError(f"--grid takes KEY=V1,V2,... entries separated by spaces; got "
                                 f"{item!r}")
        if option_key(key) in out:
            raise ParameterError(f"--grid names {option_key(key)!r} twice")
        out[option_key(key)] = [v for v in values.split(",") if v != ""]
    return out


def _convert(key: str, option: click.Option, raw: Any) -> Any:
    """One grid value through the option's click type (TOML booleans/numbers as they are)."""
    if option.is_flag and option.is_bool_flag:
        if isinstance(raw, bool):
            return raw
        text = str(raw).lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ParameterError(f"--grid {key}: {raw!r} is not a boolean (true/false)")
    if isinstance(raw, bool):
        raise ParameterError(f"--grid {key}: {raw!r} is not a valid {option.type.name}")
    try:
        return option.type.convert(raw, option, None)
    except click.BadParameter as exc:
        raise ParameterError(f"--grid {key}: {exc.message}") from None


def build_grid(spec: str | Mapping[str, Any], command: click.Command, fixed: Mapping[str, Any],
               *, max_points: int = DEFAULT_MAX_POINTS) -> Grid:
    """Parse, convert and expand a grid; check it (see :func:`check_ignored`).

    Parameters
    ----------
    spec : str or mapping
        ``--grid`` text or a ``[sweep.grid]`` table.
    command : click.Command
        ``train-head``: its options define the keys and their types.
    fixed : mapping
        The fixed settings (keyword names), the value of every option the grid leaves out.
    max_points : int
        More points than this is an error (before any training).
    """
    options = sweepable_options(command)
    values: dict[str, list[Any]] = {}
    for key, raws in parse_spec(spec).items():
        if key in map(option_key, NOT_SWEPT):
            raise ParameterError(f"--grid: {key!r} cannot be swept (the sweep sets it)")
        if key not in options:
            import difflib

            close = difflib.get_close_matches(key, list(options), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ParameterError(f"--grid: unknown option {key!r} (keys are train-head option "
                                 f"names){hint}")
        if not raws:
            raise ParameterError(f"--grid {key}: no value given")
        converted = [_convert(key, options[key], raw) for raw in raws]
        values[key] = list(dict.fromkeys(converted))  # duplicates once, order kept
    names = {key: options[key].name for key in values}
    combos = [dict(zip((names[k] for k in values), combo, strict=True))
              for combo in itertools.product(*values.values())]
    points = [{**fixed, **combo} for combo in combos]
    if not any(p["ood_weight"] == 0 for p in points):
        # the ablation: the first point's settings without synthesis
        points.append({**points[0], "ood_weight": 0.0})
    points = _distinct(points)
    if len(points) > max_points:
        raise ParameterError(f"--grid makes {len(points)} points, more than --max-points "
                             f"{max_points}; narrow the grid or raise --max-points")
    grid = Grid(values, points)
    check_ignored(grid)
    return grid


def _distinct(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Points that differ only in options they ignore are one point (the first): e.g. one
    ablation row, not one per sigma."""
    seen, out = set(), []
    for point in points:
        ignored = ignored_keys(point)
        key = tuple(sorted((k, repr(v)) for k, v in point.items()
                           if option_key(k) not in ignored))
        if key not in seen:
            seen.add(key)
            out.append(point)
    return out


def offline(point: Mapping[str, Any]) -> bool:
    """Whether a point trains on offline outliers: synthesis on, embedding space frozen."""
    return point["id_loss"] == "none" and point["ood_weight"] > 0


def ignored_keys(point: Mapping[str, Any]) -> set[str]:
    """Option keys a point's training does not use (so sweeping them changes nothing)."""
    out: set[str] = set()
    if point["ood_weight"] == 0:
        out.update(SYNTHESIS_KEYS)
    elif offline(point):
        out.add("synth-every")  # offline outliers: no queues to synthesize from per step
    else:
        out.add("outliers-per-step")  # online synthesis draws no stored outliers
    method = point.get("method")
    # k only sets the reported K-th-NN distances of gaussian/vos outliers, not which are kept
    if method == "gaussian":
        out.update(("select", "candidates", "k"))
    elif method == "vos":
        out.update(("select", "k"))
    out.add("rbf-centres" if point["head"] == "mlp" else "head-hidden")
    return out


def check_ignored(grid: Grid, points: Iterable[Mapping[str, Any]] | None = None) -> None:
    """A swept option that every point ignores is an error (the sweep would repeat itself)."""
    points = list(points if points is not None else grid.points)
    for key in grid.swept:
        if all(key in ignored_keys(p) for p in points):
            raise ParameterError(f"--grid sweeps {key!r}, which no point uses ({_why(key)})")


def _why(key: str) -> str:
    if key == "synth-every":
        return "offline outliers with --id-loss none, or ood-weight 0"
    if key == "outliers-per-step":
        return "only offline outliers (--id-loss none) draw them"
    if key in ("select", "candidates", "k"):
        return "not used by --method gaussian/vos, nor with ood-weight 0"
    if key in ("rbf-centres", "head-hidden"):
        return "set for the other --head"
    return "every point has ood-weight 0: no synthesis"


def point_label(point: Mapping[str, Any], keys: Sequence[str]) -> str:
    """``"sigma=0.01 k=50"``: a point by its swept values."""
    return " ".join(f"{option_key(k)}={point[k.replace('-', '_')]}" for k in keys) or "fixed"
