"""`npos evaluate` (not built yet)."""

import click

from npos.commands._common import not_available


@click.command("evaluate", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def command(args):
    """Not available yet in this version of npos."""
    not_available("evaluate")
