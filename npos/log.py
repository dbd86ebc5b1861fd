"""Logging in npos: one ``npos`` logger tree, the CLI's one handler, and third-party chatter.

Where output goes:

* **stdout** — a command's result (tables, ``wrote ...`` lines, JSON): ``click.echo``.
* **stderr** — progress bars (tqdm), and messages about the work (epochs, resumed runs,
  demo steps) through the ``npos`` logger: ``get_logger(__name__).info(...)``. Library code
  never prints; warnings a caller may want to filter go through :func:`warnings.warn`.
* errors — one line from the CLI (``npos.cli``), exit code 2.

npos never touches the root logger: no ``logging.basicConfig``, no handler or level on root.
The ``npos`` logger has a ``NullHandler`` (the library convention; ``npos/__init__.py``), so
an application that configures logging decides what it sees. The CLI attaches **one** handler
to the ``npos`` logger for the duration of a command (:func:`cli_logging`; ``-q`` warnings
only, ``-v`` debug).

**Third-party chatter.** open_clip logs through the *root* logger with module-level calls
(``logging.info(...)``), and each such call runs ``logging.basicConfig()`` when root has no
handler: root gains a stderr handler, and from then on every record of a library that has its
own handler (huggingface_hub's download retries) is printed twice. :func:`third_party_logs`
puts one temporary handler on root while third-party code runs — so ``basicConfig`` does
nothing — which passes records not shown elsewhere on to ``npos.external`` (warnings stay
warnings, chatter below that becomes debug), leaves records that a library's own handler
already printed alone, drops notices npos asked for, and can hold back ERROR records that the
exception about to be raised repeats. On exit root is exactly as it was.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence

LOGGER_NAME = "npos"
#: open_clip's warning for every random-init model; npos asks for random init explicitly.
OPEN_CLIP_RANDOM_INIT = "No pretrained weights loaded"

_EXTERNAL = logging.getLogger(f"{LOGGER_NAME}.external")


def get_logger(name: str = LOGGER_NAME) -> logging.Logger:
    """The npos logger for a module: ``get_logger(__name__)`` (``npos.<module>``)."""
    if name != LOGGER_NAME and not name.startswith(LOGGER_NAME + "."):
        name = f"{LOGGER_NAME}.{name}"
    return logging.getLogger(name)


# ------------------------------------------------------------------------- the CLI's handler
class _CliHandler(logging.Handler):
    """Writes to the *current* ``sys.stderr`` (click's test runner swaps it per command),
    through ``tqdm.write`` so a running progress bar is not torn."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise (logging.Handler's rule)
            self.handleError(record)


class _CliFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.capitalize()}: {message}"
        return message


def verbosity_level(verbose: int = 0, quiet: bool = False) -> int:
    """The ``npos`` logger level of the CLI: WARNING with ``-q``, INFO by default, DEBUG with
    ``-v``."""
    if quiet:
        return logging.WARNING
    return logging.DEBUG if verbose > 0 else logging.INFO


@contextlib.contextmanager
def cli_logging(level: int = logging.INFO) -> Iterator[logging.Handler]:
    """Attach the CLI's one handler to the ``npos`` logger at ``level``; detach it and restore
    the logger's level on exit."""
    logger = logging.getLogger(LOGGER_NAME)
    handler = _CliHandler()
    handler.setFormatter(_CliFormatter())
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


# ------------------------------------------------------------------------- third parties
def _shown_elsewhere(name: str) -> bool:
    """Whether a record of logger ``name`` already met a real handler before root (e.g.
    huggingface_hub's own stderr handler), or never reaches root."""
    logger: logging.Logger | None = logging.getLogger(name)
    while logger is not None and logger is not logging.root:
        if any(not isinstance(h, logging.NullHandler) for h in logger.handlers):
            return True
        if not logger.propagate:
            return True
        logger = logger.parent
    return False


class _DropFilter(logging.Filter):
    def __init__(self, owner: _ExternalRecords) -> None:
        super().__init__()
        self.owner = owner

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.owner.drop)


class _ExternalRecords(logging.Handler):
    """The temporary root handler of :func:`third_party_logs`; :attr:`root_filter` drops the
    same notices for root's other handlers (an application's own logging setup)."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.drop: tuple[str, ...] = ()
        self.hold_errors = False
        self.held: list[logging.LogRecord] = []
        self.root_filter = _DropFilter(self)

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.split(".")[0] == LOGGER_NAME or _shown_elsewhere(record.name):
            return
        message = record.getMessage()
        if message.startswith(self.drop):
            return
        if record.levelno >= logging.ERROR and self.hold_errors:
            self.held.append(record)
            return
        self.forward(record)

    @staticmethod
    def forward(record: logging.LogRecord) -> None:
        level = record.levelno if record.levelno >= logging.WARNING else logging.DEBUG
        _EXTERNAL.log(level, "%s", record.getMessage())


@contextlib.contextmanager
def third_party_logs(*, drop: Sequence[str] = (),
                     errors_in_exception: bool = False) -> Iterator[None]:
    """Run third-party code with its root-logger records shown once (see the module
    docstring). Nests: an inner call adds its settings to the handler already in place.

    Parameters
    ----------
    drop : sequence of str
        Messages starting with any of these are not shown.
    errors_in_exception : bool
        Hold ERROR records back; show them only if the block ends without an exception
        (the exception repeats them, so the final error stays one line).
    """
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, _ExternalRecords)), None)
    installed = handler is None
    if handler is None:
        handler = _ExternalRecords()
        root.addHandler(handler)
        root.addFilter(handler.root_filter)
    saved = handler.drop, handler.hold_errors, handler.held
    handler.drop = (*handler.drop, *drop)
    handler.hold_errors = handler.hold_errors or errors_in_exception
    handler.held = []
    failed = True
    try:
        yield
        failed = False
    finally:
        held = handler.held
        handler.drop, handler.hold_errors, handler.held = saved
        if installed:
            root.removeHandler(handler)
            root.removeFilter(handler.root_filter)
        if not failed or not errors_in_exception:
            for record in held:
                (handler.held.append if handler.hold_errors else handler.forward)(record)


def open_clip_logs(*, random_init: bool) -> contextlib.AbstractContextManager[None]:
    """:func:`third_party_logs` for ``open_clip.create_model``: its random-init notice is
    dropped when npos asked for random init, and its "failed to download" error is left to
    the exception npos raises."""
    return third_party_logs(drop=(OPEN_CLIP_RANDOM_INIT,) if random_init else (),
                            errors_in_exception=True)
