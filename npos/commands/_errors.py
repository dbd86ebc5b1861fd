"""How the command line reports a failed command: one line, in the command's own terms.

* :class:`~npos.errors.ParameterError` — Python names become the command's flags (``'k'``
  -> ``--k``, ``queue=30`` -> ``--queue 30``), values the user did not type are marked
  ``(default)``, every violation is listed, and values that fit are proposed as flags.
* :class:`~npos.errors.OutputError` and any other :class:`OSError` — ``cannot write
  'PATH' (COMMAND --FLAG): REASON``: the user's path (never a temporary name), the flag that
  named it, the operating system's reason, and how to resume where the command keeps
  partial work.
* Ctrl-C — :func:`interrupted_message`: how to resume.

The context of the running command is remembered by :func:`remember_context` (wrapped
around every command's callback in :mod:`npos.cli`).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from typing import Any

import click
from click.core import ParameterSource

from npos.atomic import concerns, user_path
from npos.errors import NposError, OutputError, ParameterError

_CONTEXT_KEY = "npos.command"

#: What to do after a command was stopped (Ctrl-C, a full disk): its resume contract.
RESUME_HINTS = {
    "extract": "re-run the same command to continue (finished chunks are kept)",
    "store import": "re-run the same command to continue (finished chunks are kept)",
    "synthesize": "re-run the command (with --overwrite if its --out store was created)",
    "train-head": "re-run with --resume to continue from the last finished epoch",
    "finetune": "re-run with --resume to continue from the last finished epoch",
    "evaluate": "nothing was written; re-run the command",
    "score": "re-run the command (with --overwrite if its .zarr --out was created)",
    "demo": "re-run it: finished feature stores are reused",
}
DEFAULT_HINT = "re-run the command"

#: Python parameter names whose flag is spelled differently, per owner ("knn.k") or for all.
ALIASES = {"knn.k": "knn_k", "mcm.temperature": "mcm_temperature",
           "window_rows": "shuffle_window"}


def remember_context(callback: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a command's callback so errors can later be told in its terms (flags, values
    typed or defaulted, the command's name)."""
    @functools.wraps(callback)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        ctx.meta[_CONTEXT_KEY] = ctx
        return callback(*args, **kwargs)
    wrapper.npos_remembers = True  # type: ignore[attr-defined]
    return wrapper


def command_context(ctx: click.Context) -> click.Context | None:
    """The context of the (sub-)command that ran, if it started."""
    return ctx.meta.get(_CONTEXT_KEY)


def _name(cmd: click.Context | None) -> str:
    return " ".join(cmd.command_path.split()[1:]) if cmd is not None else ""


def _hint(cmd: click.Context | None) -> str:
    return RESUME_HINTS.get(_name(cmd), DEFAULT_HINT)


def interrupted_message(ctx: click.Context) -> str:
    """The one line printed on Ctrl-C (exit 130)."""
    cmd = command_context(ctx)
    return f"interrupted{f' ({_name(cmd)})' if cmd else ''}; {_hint(cmd)}"


# ------------------------------------------------------------------ flags
def _param(cmd: click.Context | None, name: str, owner: str | None = None):
    if cmd is None:
        return None
    name = ALIASES.get(f"{owner}.{name}", ALIASES.get(name, name))
    return next((p for p in cmd.command.params if p.name == name), None)


def _flag_of(param: click.Parameter) -> str:
    if isinstance(param, click.Option):
        longs = [o for o in param.opts if o.startswith("--")]
        return max(longs, key=len) if longs else param.opts[0]
    return param.human_readable_name


def _typed(cmd: click.Context, param: click.Parameter) -> bool:
    return cmd.get_parameter_source(param.name) not in (ParameterSource.DEFAULT, None)


def _value(cmd: click.Context, param: click.Parameter, value: Any) -> str:
    shown = "on" if value is True else value
    return f"{shown}" + ("" if _typed(cmd, param) else " (default)")


def _translate(text: str, names, cmd: click.Context | None, *, bare: bool = False) -> str:
    """Python names of ``names`` in ``text`` as flags: ``'k'`` / ``k=400`` / ``tokens_layer``
    (a bare name: with ``bare``, or when it has an underscore, so it is no English word)."""
    for name in names:
        param = _param(cmd, name)
        if param is None:
            continue
        flag = _flag_of(param)
        quoted = re.escape(repr(name))
        text = re.sub(rf"The {quoted} parameter(?: of [\w-]+)?", flag, text)
        default = "" if cmd is None or _typed(cmd, param) else " (default)"
        text = re.sub(rf"(?<![\w-])(?:{quoted}|{re.escape(name)})=(\S+?)(?=[,;:.)]?(?:\s|$))",
                      rf"{flag} \1{default}", text)
        text = re.sub(quoted, flag, text)
        if bare or "_" in name:
            text = re.sub(rf"(?<![\w'-]){re.escape(name)}(?![\w'])", flag, text)
    return text


def _violation(cmd: click.Context | None, v) -> str:
    param = _param(cmd, v.name, v.owner)
    if param is None or cmd is None:
        return v.message()
    names = [p.name for p in cmd.command.params if p.name]
    why = _translate(v.why, names, cmd, bare=True)
    return f"{_flag_of(param)} {_value(cmd, param, v.value)} must be {v.expected}{why}"


def parameter_message(exc: ParameterError, cmd: click.Context | None) -> str:
    """``exc`` in the command's terms: flags, every violation, values that fit."""
    if cmd is None or not (exc.params or exc.violations):
        return str(exc)
    parts = [_translate(exc.text, exc.params, cmd).rstrip(". ")] if exc.text else []
    parts += [_violation(cmd, v) for v in exc.violations]
    message = "; ".join(parts)
    if exc.suggestion:
        flags = []
        for name, value in exc.suggestion.items():
            param = _param(cmd, name)
            flags.append(f"{_flag_of(param) if param else name} {value}")
        reason = _translate(exc.reason, [p.name for p in cmd.command.params if p.name], cmd)
        message += f"; {reason}: try {' '.join(flags)}"
    return message


# ------------------------------------------------------------------ OS errors
def _path_param(cmd: click.Context | None, path: str):
    """The command's parameter whose value is ``path`` or contains it."""
    if cmd is None:
        return None
    for param in cmd.command.params:
        values = cmd.params.get(param.name)
        for value in values if isinstance(values, (list, tuple)) else [values]:
            if isinstance(value, str) and "=" in value and not os.path.exists(value):
                value = value.split("=", 1)[1]  # NAME=STORE options
            if isinstance(value, (str, os.PathLike)) and value and concerns(path, value):
                return param
    return None


def _operation(cmd: click.Context | None, param) -> str:
    return " ".join(x for x in (_name(cmd), _flag_of(param) if param else "") if x)


def os_error_message(exc: OSError, cmd: click.Context | None) -> str:
    """``cannot write 'PATH' (COMMAND --FLAG): REASON[; how to resume]``."""
    if isinstance(exc, OutputError):
        message = exc.describe(_operation(cmd, _path_param(cmd, exc.path)))
        if exc.before_work or cmd is None:
            return message
        return f"{message}; {_hint(cmd)}"
    code = exc.errno
    reason = os.strerror(code) if isinstance(code, int) and code > 0 else \
        (exc.strerror or str(exc) or type(exc).__name__)
    if exc.filename is None:
        return f"{_name(cmd) or 'npos'}: {reason}"
    path = user_path(os.fspath(exc.filename))
    param = _path_param(cmd, path)
    verb = "write" if param is not None and param.name == "out" else "read"
    where = f" ({_operation(cmd, param)})" if param is not None else ""
    return f"cannot {verb if param is not None else 'access'} {path!r}{where}: {reason}"


def describe(exc: BaseException, ctx: click.Context) -> str | None:
    """The one line for ``exc``, or None when it is a bug in npos (keep its traceback)."""
    cmd = command_context(ctx)
    if isinstance(exc, ParameterError):
        return parameter_message(exc, cmd)
    if isinstance(exc, NposError) and not isinstance(exc, OutputError):
        return str(exc)
    if isinstance(exc, OSError):
        return os_error_message(exc, cmd)
    return None
