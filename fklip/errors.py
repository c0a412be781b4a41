"""Typed errors. The CLI turns `FklipError` into one line on stderr and an exit code."""

from __future__ import annotations

import os
import stat
from pathlib import Path
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


def check_input_file(path: str | os.PathLike, what: str) -> Path:
    """`path` as a Path if it is a regular file one can read (or a link to one); otherwise
    DataError saying what it is instead: missing, a directory, a device, a pipe or a socket.
    `what` says what was expected ("val queries (JSON lines)")."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        missing = "is a broken symbolic link" if path.is_symlink() else "no such file"
        raise DataError(f"{path}: {missing}; expected {what}") from None
    except NotADirectoryError:
        raise DataError(f"{path}: no such file (a parent is not a directory); expected {what}") from None
    except PermissionError:
        raise DataError(f"{path}: cannot be read (permission denied); expected {what}") from None
    except OSError as e:  # a symbolic link loop, a name too long ...
        raise DataError(f"{path}: cannot be read ({e.strerror}); expected {what}") from None
    if stat.S_ISDIR(mode):
        raise DataError(f"{path}: is a directory; expected {what}")
    if not stat.S_ISREG(mode):
        kind = ("a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
                else "a named pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a special file")
        raise DataError(f"{path}: is not a regular file ({kind}); expected {what}")
    if not os.access(path, os.R_OK):
        raise DataError(f"{path}: cannot be read (permission denied); expected {what}")
    return path
