"""Typed errors. The CLI turns `FklipError` into one line on stderr and an exit code."""

from __future__ import annotations

from typing import Iterable, Sequence


class FklipError(Exception):
    """A problem the user can fix: bad input, a bad flag, a missing file. Exit code 2."""

    exit_code = 2


class DataError(FklipError):
    """A data file (JSON lines, image archive) is malformed or inconsistent."""


class CheckpointError(FklipError):
    """A checkpoint cannot be read, or does not fit the model it is loaded into."""


class ConfigError(FklipError):
    """A flag or combination of flags is invalid."""


class OutputError(FklipError):
    """An output cannot be written (a full or read-only disk, a parent that is a file); nothing of
    the command's outputs was left behind."""


class InUseError(FklipError):
    """Another fklip process is writing the same output or run folder."""


class MissingDependencyError(FklipError):
    """An optional dependency is not installed; the message names the extra to install."""


class NotAvailableError(FklipError):
    """A command that a later release fills in. Exit code 3, so scripts can tell it apart."""

    exit_code = 3


def preview(items: Sequence, limit: int = 5) -> str:
    """Show the first `limit` items of a list, and how many more there are."""
    shown = ", ".join(repr(x) for x in items[:limit])
    more = len(items) - limit
    return shown + (f", ... ({more} more)" if more > 0 else "")


def raise_collected(problems: Iterable[str], header: str, error: type[FklipError] = DataError,
                    limit: int = 5) -> None:
    """Raise once for every problem found: one line naming the first `limit` of them and the count."""
    problems = list(problems)
    if not problems:
        return
    shown = "; ".join(problems[:limit])
    if len(problems) == 1:
        raise error(f"{header}: {shown}")
    more = f"; ... and {len(problems) - limit} more" if len(problems) > limit else ""
    raise error(f"{header}: {len(problems)} problems: {shown}{more}")
