"""The npos exception hierarchy.

Every error a user can cause derives from :class:`NposError` (a ``ValueError``), so the CLI
turns it into one line on stderr and exit code 2. Not-found errors are also
``FileNotFoundError`` so ``except FileNotFoundError`` keeps working for API users.
"""


class NposError(ValueError):
    """Base class of all npos errors caused by input, configuration or stored data."""


class ParameterError(NposError):
    """A parameter is outside its valid range or of the wrong kind."""


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


class LockError(NposError):
    """Another process is writing the same store or output (its lock file names it)."""
