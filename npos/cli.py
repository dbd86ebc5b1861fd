"""The ``npos`` command line: a click group whose commands are thin wrappers over stage APIs.

Exit codes (the same for every command):

* ``0`` — success;
* ``1`` — the command ran but found a problem it was asked to look for
  (``npos store verify`` on a damaged store);
* ``2`` — an error: bad usage, bad input, missing file, refused overwrite, a bad ``--config``
  file, an output that cannot be written (disk full, read-only, file too large, I/O error, no
  permission: checked before any work where possible). The message is one line on stderr
  naming the user's flags and paths (:mod:`npos.commands._errors`); ``npos --debug ...``
  shows the traceback instead;
* ``130`` — interrupted (Ctrl-C); the line says how to resume.

Every command takes ``--config FILE.toml`` (:mod:`npos.config_file`); messages about the work
go through the ``npos`` logger to stderr (:mod:`npos.log`; ``-q`` / ``-v``).
"""

from __future__ import annotations

import signal

import click

from npos import __version__
from npos.commands._common import Interrupted, UserError
from npos.commands._errors import describe, interrupted_message, remember_context
from npos.config_file import add_config_option
from npos.log import cli_logging, third_party_logs, verbosity_level

class NposGroup(click.Group):
    """Turns errors raised by any sub-command into one line: exit code 2 for npos errors and
    OS errors (:func:`npos.commands._errors.describe`), 130 for Ctrl-C; other exceptions
    are bugs in npos and keep their traceback."""

    def invoke(self, ctx: click.Context):
        try:
            # Third-party root-logger records (open_clip, ...) are shown once, through the
            # npos handler, and the root logger is left as it was.
            with third_party_logs():
                return super().invoke(ctx)
        except click.ClickException:
            raise
        except KeyboardInterrupt:
            if ctx.meta.get("npos.debug"):
                raise
            raise Interrupted(interrupted_message(ctx)) from None
        except Exception as exc:  # noqa: BLE001 - filtered just below
            message = None if ctx.meta.get("npos.debug") else describe(exc, ctx)
            if message is None:
                raise
            raise UserError(message) from None


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
                sweep        a grid of synthesis/head settings, trained and evaluated
                calibrate    per-score thresholds at an ID true-positive rate
    Tools:      store        info / verify / import feature stores
                index        build / info: one faiss IVF index per store (kNN at scale)
                text-bank    word-list text embeddings for neglabel / csp
                demo         the whole pipeline on a small built-in dataset

    Every command takes --config FILE.toml: option values from a file (top-level keys for
    every command, a [COMMAND] table per command, [store.import] for sub-commands); flags on
    the command line win. Messages go to stderr (-q: warnings only, -v: debug).

    Scores follow one convention: higher = more in-distribution.

    \b
    Exit codes: 0  ok
                1  a check found problems (npos store verify)
                2  an error, told in one line (bad input or options, an output that
                   cannot be written: disk full, read-only, too large, I/O error)
              130  interrupted (Ctrl-C); the line says how to resume
    """
    ctx.meta["npos.debug"] = debug
    # One handler on the "npos" logger (never on root), removed when the command ends.
    ctx.with_resource(cli_logging(verbosity_level(verbose, quiet)))


def _register() -> None:
    # Each command lives in its own module under npos.commands; heavy imports (torch,
    # open_clip, faiss) happen inside the commands so `npos --help` stays fast.
    from npos.commands import (calibrate, demo, evaluate, extract, finetune, index, score,
                               store, sweep, synthesize, text_bank, train_head)

    for module in (extract, synthesize, train_head, finetune, evaluate, score, sweep, demo,
                   store, text_bank, calibrate, index):
        cli.add_command(module.command)
        add_config_option(module.command)
        _remember_contexts(module.command)


def _remember_contexts(command: click.Command) -> None:
    # Errors are told in the terms of the command that ran (its flags, its resume hint).
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            _remember_contexts(sub)
    elif command.callback is not None and not getattr(command.callback, "npos_remembers",
                                                          False):
        command.callback = remember_context(command.callback)


_register()


def main() -> None:
    """Console-script entry point."""
    if hasattr(signal, "SIGXFSZ"):
        # Past a file-size limit (ulimit -f) a write then fails with EFBIG, reported in one
        # line, instead of the signal killing the process without a word.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    cli.main(prog_name="npos")


if __name__ == "__main__":  # pragma: no cover
    main()
