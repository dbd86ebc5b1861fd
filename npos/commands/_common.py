"""Pieces shared by the command modules: exit codes and the user-facing error."""

from __future__ import annotations

import click

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_ERROR = 2


class UserError(click.ClickException):
    """A one-line error for the user, exit code 2."""

    exit_code = EXIT_ERROR


def not_available(name: str) -> None:
    raise UserError(f"'npos {name}' is not available yet in this version of npos")
