"""One error type for bad input, so every message names the file, line and field."""
from __future__ import annotations

from ..errors import SftkitError


class DataError(SftkitError, ValueError):
    """A row the pipeline cannot use; `source`/`line` are filled in by whoever read the row."""

    def __init__(self, message: str, *, field: str | None = None, source: str | None = None, line: int | str | None = None):
        self.message, self.field, self.source, self.line = message, field, source, line
        super().__init__(self._text())

    def _text(self) -> str:
        where = []
        if self.source is not None:
            where.append(str(self.source) + (f":{self.line}" if self.line is not None else ""))
        elif self.line is not None:
            where.append(f"row {self.line}")
        if self.field:
            where.append(f"field '{self.field}'")
        return (", ".join(where) + ": " if where else "") + self.message

    def at(self, source: str, line: int | str | None) -> "DataError":
        """The same error, located in a file (or dataset) and line (or row index)."""
        return DataError(self.message, field=self.field, source=source, line=line)
