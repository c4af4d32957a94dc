"""User-facing errors.

Every problem a user can fix (a bad config key, a missing column, a malformed row) is raised as a
:class:`SftuneError`. The CLI prints its message and exits with status 2, without a traceback.
Anything else is a bug in sftune and keeps its traceback.
"""

from __future__ import annotations


class SftuneError(Exception):
    """An error the user can act on. The message says what went wrong, where, and what to do."""


class ConfigError(SftuneError):
    """The recipe, a ``key=value`` override or a combination of options is invalid."""


class DataError(SftuneError):
    """A data file, row or column cannot be used as configured."""

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        row: int | None = None,
        column: str | None = None,
        hint: str | None = None,
    ):
        self.source, self.row, self.column, self.hint = source, row, column, hint
        self.reason = message
        where = []
        if source:
            where.append(source)
        if row is not None:
            where.append(f"row {row}")
        if column:
            where.append(f"column '{column}'")
        text = (", ".join(where) + ": " if where else "") + message
        if hint:
            text += f"\n  → {hint}"
        super().__init__(text)


class RowSkip(Exception):
    """Raised inside formatting for a row that is skipped and counted, not fatal."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason
