"""The project's exception hierarchy.

Every error raised on purpose derives from :class:`EcomrecError`; the gRPC layer
maps these classes to status codes in one place.
"""

from __future__ import annotations


class EcomrecError(Exception):
    """Base class of every error ecomrec raises on purpose."""


class DataError(EcomrecError, ValueError):
    """Input data is malformed: names the file, row and column where known.

    ``line`` is a 1-based line number of a text file (the header is line 1); ``row`` is a
    0-based row index of a table (Parquet, a frame).
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        row: int | None = None,
        column: str | None = None,
        line: int | None = None,
    ) -> None:
        parts = []
        if file is not None:
            parts.append(f"file {file}")
        if line is not None:
            parts.append(f"line {line}")
        if row is not None:
            parts.append(f"row {row}")
        if column is not None:
            parts.append(f"column {column!r}")
        where = (", ".join(parts) + ": ") if parts else ""
        super().__init__(where + message)
        self.file = file
        self.row = row
        self.column = column
        self.line = line


class ConfigError(EcomrecError, ValueError):
    """A configuration file or value is invalid (unknown key, wrong type, bad range)."""


class ModelError(EcomrecError):
    """A model or checkpoint cannot be built, loaded or used."""


class NotFoundError(EcomrecError, KeyError):
    """A requested entity (user, item, segment, run, index version) does not exist."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "not found"


class IndexUnavailableError(EcomrecError):
    """The vector index cannot be reached or is not built."""


class InvalidArgumentError(EcomrecError, ValueError):
    """A caller passed an invalid argument; names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class MismatchError(EcomrecError):
    """Two artifacts were made from different data or models (run vs dataset, index vs
    model, export vs run); the message names both and what to do."""
