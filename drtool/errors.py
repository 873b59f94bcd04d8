"""Errors drtool reports to the operator, each carrying its process exit code.

Messages are one line and name the file, key or object at fault. They must never
contain a secret: build them from redacted values (drtool.secrets).
"""


class DrtoolError(Exception):
    """An operation failed (exit 1)."""

    exit_code = 1


class ConfigError(DrtoolError):
    """Usage or configuration error (exit 2)."""

    exit_code = 2


class LockError(DrtoolError):
    """Another run holds the repository lock (exit 3)."""

    exit_code = 3


class DiskThresholdError(DrtoolError):
    """A disk threshold is breached and could not be cleared (exit 4)."""

    exit_code = 4


class RepositoryError(DrtoolError):
    """The repository or its object store failed or is damaged."""


class ObjectNotFound(RepositoryError):
    """An object the caller asked for does not exist."""


class IntegrityError(RepositoryError):
    """Stored bytes do not match their recorded hash or size."""


class SourceError(DrtoolError):
    """A source (pg_dump, asbackup, a blob store) failed."""
