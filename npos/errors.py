"""The npos exception hierarchy.

Every error a user can cause derives from :class:`NposError` (a ``ValueError``), so the CLI
turns it into one line on stderr and exit code 2. Not-found errors are also
``FileNotFoundError`` so ``except FileNotFoundError`` keeps working for API users.
"""


class NposError(ValueError):
    """Base class of all npos errors caused by input, configuration or stored data."""


class ParameterError(NposError):
    """A parameter is outside its valid range or of the wrong kind.

    The message names parameters by their Python names (``'k'``, ``queue=30``). The
    attributes let the command line say the same with its flags (``--k``, ``--queue 30``):

    Attributes
    ----------
    text : str
        The free-text part of the message (without the violations and the suggestion).
    params : tuple of str
        The parameters the message names (as ``'name'``, ``name=value`` or the bare name).
    violations : tuple
        For errors from :mod:`npos.validation`: one
        :class:`~npos.validation.Violation` per parameter out of its range, all of them.
    suggestion : dict
        Values that would fit (``{"queue": 30, "k": 10}``), in the order to show them.
    reason : str
        What the values were checked against ("the largest class has 30 rows").
    """

    def __init__(self, message: str, *, text: str | None = None, params: tuple[str, ...] = (),
                 violations: tuple = (), suggestion: dict | None = None,
                 reason: str = "") -> None:
        super().__init__(message)
        self.text = message if text is None else text
        self.params = tuple(params) or tuple(v.name for v in violations)
        self.violations = tuple(violations)
        self.suggestion = dict(suggestion or {})
        self.reason = reason


class StoreError(NposError):
    """A store is malformed, incomplete, or does not match what the caller expects."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """No store exists at the given location."""


class StoreExistsError(StoreError, FileExistsError):
    """A store already exists where a new one would be written (pass ``overwrite``)."""


class OutputExistsError(NposError, FileExistsError):
    """An output (report folder, score file, checkpoint) exists and ``overwrite`` was not
    given."""


class IncompatibleStoreError(StoreError):
    """Stores (or a store and a checkpoint) come from different encoders or settings."""


class MissingDependencyError(NposError, ImportError):
    """An optional dependency is needed for the requested feature."""


class ConfigFileError(NposError):
    """A ``--config`` file is missing, is not valid TOML, or names an unknown command, an
    unknown option or a value of the wrong type."""


class OutputError(NposError, OSError):
    """An output could not be written (disk full, read-only, too large, I/O error, no
    permission). Also an :class:`OSError` with the original ``errno``; ``filename`` is the
    user's path, never a temporary file's.

    Attributes
    ----------
    path : str
        The output the user named (a store, a report folder, a file).
    what : str
        What it is ("store", "report folder", "checkpoint").
    reason : str
        The operating system's words (``os.strerror``), e.g. "No space left on device".
    before_work : bool
        True when found by the check before any work (nothing to resume).
    """

    def __init__(self, path: str, what: str, exc: BaseException, *,
                 before_work: bool = False) -> None:
        import os

        code = getattr(exc, "errno", None)
        reason = os.strerror(code) if isinstance(code, int) and code > 0 else \
            (getattr(exc, "strerror", None) or str(exc) or type(exc).__name__)
        self.path, self.what, self.reason = str(path), what, reason
        self.before_work = before_work
        super().__init__(self.describe())
        self.errno, self.strerror, self.filename = code, reason, self.path

    def describe(self, operation: str = "") -> str:
        """``cannot write {what} '{path}'{ (operation)}: {reason}``."""
        where = f" ({operation})" if operation else ""
        return f"cannot write {self.what} {self.path!r}{where}: {self.reason}"

    def __str__(self) -> str:
        return self.describe()


class LockError(NposError):
    """Another process is writing the same store or output (its lock file names it)."""
