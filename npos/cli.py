"""The ``npos`` command line: a click group whose commands are thin wrappers over stage APIs.

Exit codes (the same for every command):

* ``0`` — success;
* ``1`` — the command ran but found a problem it was asked to look for
  (``npos store verify`` on a damaged store);
* ``2`` — an error: bad usage, bad input, missing file, refused overwrite, a bad ``--config``
  file. The message is one line on stderr; ``npos --debug ...`` shows the traceback instead.

Every command takes ``--config FILE.toml`` (:mod:`npos.config_file`); messages about the work
go through the ``npos`` logger to stderr (:mod:`npos.log`; ``-q`` / ``-v``).
"""

from __future__ import annotations


import click

from npos import __version__
from npos.commands._common import UserError
from npos.config_file import add_config_option
from npos.errors import NposError
from npos.log import cli_logging, third_party_logs, verbosity_level

def _is_user_error(exc: BaseException) -> bool:
    # Missing files and permissions are the user's to fix; anything else is a bug in npos
    # and keeps its traceback.
    return isinstance(exc, (NposError, FileNotFoundError, PermissionError, IsADirectoryError,
                            NotADirectoryError))


class NposGroup(click.Group):
    """Turns npos errors raised by any sub-command into one line and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            # Third-party root-logger records (open_clip, ...) are shown once, through the
            # npos handler, and the root logger is left as it was.
            with third_party_logs():
                return super().invoke(ctx)
        except click.ClickException:
            raise
        except Exception as exc:  # noqa: BLE001 - filtered just below
            if ctx.meta.get("npos.debug") or not _is_user_error(exc):
                raise
            raise UserError(str(exc)) from None


@click.group(cls=NposGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="npos")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.option("-v", "--verbose", count=True, help="Also show debug messages.")
@click.option("-q", "--quiet", is_flag=True,
              help="Show warnings and errors only (no epoch lines or step messages).")
@click.pass_context
def cli(ctx: click.Context, debug: bool, verbose: int, quiet: bool) -> None:
    """npos — Non-parametric Outlier Synthesis (NPOS) for OOD detection on a feature cache.

    \b
    Stage one:  extract      images -> Zarr feature store (frozen open_clip encoder)
    Stage two:  synthesize   virtual outliers from a store (tune parameters)
                train-head   projection + OOD head with online synthesis
                finetune     last encoder blocks from cached tokens
                evaluate     OOD metrics, report with plots
                score        per-row scores for any store
    Tools:      store        info / verify / import feature stores
                demo         the whole pipeline on a small built-in dataset

    Every command takes --config FILE.toml: option values from a file (top-level keys for
    every command, a [COMMAND] table per command, [store.import] for sub-commands); flags on
    the command line win. Messages go to stderr (-q: warnings only, -v: debug).

    Scores follow one convention: higher = more in-distribution.
    Exit codes: 0 ok, 1 a check found problems, 2 error.
    """
    ctx.meta["npos.debug"] = debug
    # One handler on the "npos" logger (never on root), removed when the command ends.
    ctx.with_resource(cli_logging(verbosity_level(verbose, quiet)))


def _register() -> None:
    # Each command lives in its own module under npos.commands; heavy imports (torch,
    # open_clip, faiss) happen inside the commands so `npos --help` stays fast.
    from npos.commands import (calibrate, demo, evaluate, extract, finetune, score, store,
                               sweep, synthesize, text_bank, train_head)

    for module in (extract, synthesize, train_head, finetune, evaluate, score, sweep, demo,
                   store, text_bank, calibrate):
        cli.add_command(module.command)
        add_config_option(module.command)


_register()


def main() -> None:
    """Console-script entry point."""
    cli.main(prog_name="npos")


if __name__ == "__main__":  # pragma: no cover
    main()
