"""Option values from TOML files: ``npos COMMAND --config FILE.toml``.

Every command (group sub-commands such as ``npos store import`` included) takes ``--config``.
The file gives option values; a flag given on the command line always wins::

    # top-level keys: for every command that has the option (others ignore them)
    device = "cuda"
    seed = 1

    [train-head]                    # a table per command
    epochs = 20
    ood-weight = 0.1                # or ood_weight
    detach-head = false             # on/off flags are booleans

    [evaluate]
    ood = ["inat=inat.zarr", "textures=textures.zarr"]   # repeatable options: arrays
    scores = "mcm,knn"

    [store.import]                  # sub-commands of a group: a nested table
    dtype = "float32"

Precedence: command-line flag > the command's table > top-level key > built-in default.
Keys are the long option names without ``--`` (``-`` and ``_`` are the same); values have the
option's TOML type (int, float, bool, string; an array for repeatable options). Paths are
used as written, relative to the current directory, as on the command line. Positional
arguments are not read from the file.

The whole file is checked against every command, so a typo in a table of another command
is reported too: an unknown table, an unknown key, a value of the wrong type (for the command
that runs) or a file that is missing or not TOML is one line naming the file and the key,
exit code 2 (:class:`~npos.errors.ConfigFileError`).

Implementation: an eager ``--config`` option (processed before the others) fills click's
``default_map`` for the command being run, as black's ``--config`` does.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from typing import Any

import click

from npos.errors import ConfigFileError

CONFIG_PARAM = "config"


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a TOML file; :class:`ConfigFileError` (one line) when missing or invalid."""
    try:
        import tomllib  # Python >= 3.11
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10 uses the tomli backport
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            from npos.errors import MissingDependencyError

            raise MissingDependencyError(
                "--config needs a TOML parser on Python 3.10: pip install tomli") from None
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigFileError(f"config file {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise ConfigFileError(f"config file {str(path)!r} is a directory") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigFileError(f"config file {str(path)!r} is not UTF-8 text: {exc}") from None


# ------------------------------------------------------------------------- the file's layout
def _key(name: str) -> str:
    return name.replace("_", "-")


def option_keys(command: click.Command) -> dict[str, click.Option]:
    """The keys a config file may give for ``command``: its long option names (``-``
    spelling) -> the option. Positional arguments and ``--config`` itself are excluded."""
    keys = {}
    for param in command.params:
        if isinstance(param, click.Option) and param.name != CONFIG_PARAM:
            for opt in param.opts:
                if opt.startswith("--"):
                    keys[_key(opt[2:])] = param
    return keys


def _join(label: str, name: str) -> str:
    return f"{label}.{name}" if label else name


def _leaf_tables(data: Mapping[str, Any], commands: Mapping[str, click.Command],
                 where: str, path: str) -> dict[str, dict[str, Any]]:
    """``{"store.import": {...}, "train-head": {...}}`` from the tables of ``data``; a table
    naming no command is an error (``where`` locates it in messages)."""
    tables: dict[str, dict[str, Any]] = {}
    for name, value in data.items():
        command: click.Command | None = None
        level: Mapping[str, click.Command] | None = commands
        label = where
        # ["store import"] and [store.import] are the same table
        for part in name.split() or [name]:
            command = level.get(part) if level is not None else None
            if command is None:
                known = ", ".join(sorted(level or {}))
                raise ConfigFileError(f"config file {path!r}: unknown command table "
                                      f"[{_join(label, part)}] (commands: {known})")
            label = _join(label, part)
            level = command.commands if isinstance(command, click.Group) else None
        if not isinstance(value, dict):
            raise ConfigFileError(f"config file {path!r}: [{label}] must be a table; "
                                  f"got {value!r}")
        if isinstance(command, click.Group):
            tables.update(_leaf_tables(value, command.commands, label, path))
        else:
            tables[label] = value
    return tables


def split_config(data: Mapping[str, Any], root: click.Command,
                 path: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Split a parsed file into top-level keys and per-command tables, and check that every
    table names a command and every key an option (of its command; top-level keys: of at
    least one command). Returns ``(top_level, {"train-head": {...}, "store.import": {...}})``.
    """
    commands: Mapping[str, click.Command] = (
        root.commands if isinstance(root, click.Group) else {str(root.name): root})
    is_table = {name: isinstance(value, dict) for name, value in data.items()}
    top = {k: v for k, v in data.items() if not is_table[k]}
    tables = _leaf_tables({k: v for k, v in data.items() if is_table[k]}, commands, "", path)
    leaves = _leaf_commands(commands)
    everywhere = {key for command in leaves.values() for key in option_keys(command)}
    _check_keys(top, everywhere, "at the top level", path)
    for label, table in tables.items():
        _check_keys(table, option_keys(leaves[label]), f"in [{label}]", path)
    return top, tables


def _leaf_commands(commands: Mapping[str, click.Command],
                   prefix: str = "") -> dict[str, click.Command]:
    leaves: dict[str, click.Command] = {}
    for name, command in commands.items():
        label = _join(prefix, name)
        if isinstance(command, click.Group):
            leaves.update(_leaf_commands(command.commands, label))
        else:
            leaves[label] = command
    return leaves


def _check_keys(values: Mapping[str, Any], known: set[str] | Mapping[str, Any], where: str,
                path: str) -> None:
    seen: dict[str, str] = {}
    for key in values:
        if _key(key) in seen:
            raise ConfigFileError(f"config file {path!r}: {seen[_key(key)]!r} and {key!r} "
                                  f"{where} are the same option; give it once")
        seen[_key(key)] = key
        if _key(key) not in known:
            close = difflib.get_close_matches(_key(key), list(known), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigFileError(f"config file {path!r}: unknown key {key!r} {where}{hint} "
                                  "(keys are option names without '--')")


# ------------------------------------------------------------------------- values
_ARTICLE = {"int": "an int", "float": "a float", "boolean": "a boolean", "string": "a string"}


def _kind_ok(param: click.Option, value: Any) -> tuple[bool, str]:
    """Whether a TOML value has the option's kind, and the kind's name for messages."""
    kind = param.type
    if getattr(kind, "accepts_table", False) and isinstance(value, dict):
        return True, "table"  # e.g. sweep's --grid: a [sweep.grid] table
    if (param.is_flag and param.is_bool_flag) or isinstance(kind, click.types.BoolParamType):
        return isinstance(value, bool), "boolean"
    if isinstance(kind, click.types.IntParamType):
        return isinstance(value, int) and not isinstance(value, bool), "int"
    if isinstance(kind, click.types.FloatParamType):
        return isinstance(value, (int, float)) and not isinstance(value, bool), "float"
    return isinstance(value, str), "string"


def check_value(ctx: click.Context, param: click.Option, key: str, value: Any, where: str,
                path: str) -> Any:
    """Check a file value against its option (kind, then click's own conversion: ranges,
    choices, paths); return it in the form click's ``default_map`` takes."""
    def fail(expected: str) -> ConfigFileError:
        return ConfigFileError(f"The {key!r} key {where} of config file {path!r} must be "
                               f"{expected}. Got {value!r} instead.")

    if param.multiple and not isinstance(value, list):
        raise fail(f"an array (--{_key(key)} is repeatable)")
    for item in value if param.multiple else [value]:
        ok, kind = _kind_ok(param, item)
        if not ok:
            raise fail(f"an array of {kind}s" if param.multiple else _ARTICLE[kind])
        if kind in ("boolean", "table"):
            continue
        try:
            param.type.convert(item, param, ctx)
        except click.BadParameter as exc:
            raise ConfigFileError(f"The {key!r} key {where} of config file {path!r} is "
                                  f"invalid: {exc.message}") from None
    return tuple(value) if param.multiple else value


def config_defaults(ctx: click.Context, path: str) -> dict[str, Any]:
    """The ``default_map`` the file at ``path`` gives the command of ``ctx``: top-level keys
    the command has, overridden by its own table; checked as described in the module
    docstring."""
    names: list[str] = []
    node: click.Context | None = ctx
    while node is not None and node.parent is not None:
        names.append(str(node.command.name))
        node = node.parent
    root = ctx.find_root().command
    label = ".".join(reversed(names)) if names else str(ctx.command.name)
    top, tables = split_config(read_config_file(path), root, path)
    keys = option_keys(ctx.command)
    defaults: dict[str, Any] = {}
    for values, where in ((top, "at the top level"), (tables.get(label, {}), f"in [{label}]")):
        for key, value in values.items():
            param = keys.get(_key(key))
            if param is not None:
                defaults[param.name] = check_value(ctx, param, key, value, where, path)
    return defaults


def _apply_config(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is None or ctx.resilient_parsing:
        return
    ctx.default_map = {**(ctx.default_map or {}), **config_defaults(ctx, value)}


def add_config_option(command: click.Command) -> None:
    """Give ``command`` (for a group: each of its sub-commands, recursively) the eager
    ``--config FILE.toml`` option. Idempotent."""
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            add_config_option(sub)
        return
    if any(p.name == CONFIG_PARAM for p in command.params):
        return
    command.params.append(click.Option(
        ["--config", CONFIG_PARAM], metavar="FILE.toml", is_eager=True, expose_value=False,
        callback=_apply_config,
        help="Read option values from a TOML file: top-level keys and/or a table named "
             "after the command (see 'npos --help'). Flags given here win."))
