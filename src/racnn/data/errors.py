"""The one exception type of :mod:`racnn.data`."""

from __future__ import annotations

from pathlib import Path

__all__ = ["DatasetError", "line_error"]


class DatasetError(ValueError):
    """A dataset folder, metadata file or image is missing or invalid.

    The message is one line that names the file (and the line, as ``"{file}:{lineno}: {problem}"``).
    """


def line_error(path: str | Path, lineno: int, problem: str) -> DatasetError:
    """Build a :class:`DatasetError` for line ``lineno`` (1-based) of ``path``."""
    return DatasetError(f"{path}:{lineno}: {problem}")
