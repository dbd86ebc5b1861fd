"""Pieces shared by the command modules: exit codes and the user-facing error."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_ERROR = 2
#: Ctrl-C (SIGINT), as shells report a process ended by it (128 + 2).
EXIT_INTERRUPTED = 130


class UserError(click.ClickException):
    """A one-line error for the user, exit code 2."""

    exit_code = EXIT_ERROR


class Interrupted(UserError):
    """Ctrl-C: one line saying how to resume, exit code 130."""

    exit_code = EXIT_INTERRUPTED


def not_available(name: str) -> None:
    raise UserError(f"'npos {name}' is not available yet in this version of npos")


def _check_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from npos.device import resolve_device
    from npos.errors import ParameterError

    try:
        resolve_device(value)
    except ParameterError as exc:
        raise UserError(str(exc)) from None
    return value


def device_option(what: str = "") -> Callable[[F], F]:
    """The ``--device`` option every command shares, checked before any work
    (:func:`npos.device.resolve_device`)."""
    return click.option("--device", default="auto", show_default=True, callback=_check_device,
                        help="auto (cuda when a GPU is visible, else cpu), cpu, cuda or cuda:N."
                             + (f" {what}" if what else ""))
