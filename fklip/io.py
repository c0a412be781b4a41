"""Output files: never an input, all together or not at all, claimed for the run, one-line failures.

- `check_outputs` runs before any work: every output is distinct from the other outputs and from
  every input (paths resolved, links followed, hard links compared by inode), is not a folder,
  and exists already only if the user said `--overwrite`.
- `atomic_output` writes one file: a temporary beside it, renamed over it when complete.
- `OutputSet` is one command's output files: each is claimed (two runs writing the same file
  cannot both go on), staged beside its target, and all are renamed into place together once
  every one is complete; a failure puts back what was there.
- `staged_folder` builds a whole folder under a hidden name and swaps it into place at the end.

Temporary names carry their owner (`.NAME.fklip-HOST-PID-RAND.tmp`, `.partial`, `.old`), so the
leftovers of a killed run are removed by the next run that writes there, once their owner is
gone. Every OSError while writing becomes `OutputError`: one line naming the path and the cause.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from fklip.errors import ConfigError, InUseError, OutputError, raise_collected

logger = logging.getLogger(__name__)

_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.fklip-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]+"
                       r"\.(?P<kind>tmp|partial|old)(?:\.[^.]*)?$")
_CLAIM = re.compile(r"^\.(?P<name>.+)\.fklip-claim$")
_LEGACY = re.compile(r"^\.(?P<name>.+)\.partial-(?P<pid>\d+)$")  # export folders of fklip <= 0.1


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def is_leftover(name: str) -> bool:
    """Whether `name` is one of fklip's owned temporaries (`.NAME.fklip-HOST-PID-RAND.KIND`) or
    claims (`.NAME.fklip-claim`)."""
    return bool(_LEFTOVER.match(name)) or (name.startswith(".") and name.endswith(".fklip-claim"))


def owned_name(path: Path, kind: str) -> Path:
    """A hidden sibling of `path` owned by this process: `.NAME.fklip-HOST-PID-RAND.KIND`, plus
    the target's suffix for files (`x.npy` stages as `.x.npy.fklip-...tmp.npy`), so writers
    that check a suffix accept the staging name."""
    suffix = path.suffix if kind == "tmp" else ""
    return path.parent / f".{path.name}.fklip-{_HOST}-{os.getpid()}-{secrets.token_hex(3)}.{kind}{suffix}"


def _owner_alive(host: str, pid: int) -> bool:
    if host != _HOST or pid == os.getpid():
        return True  # another machine's files (a shared disk) are never judged from here
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(path: Path) -> list[Path]:
    """Remove the temporaries of `path` (files, partial folders, set-aside old versions) whose
    owner process is gone; an `.old` copy is put back when `path` itself is missing."""
    return _remove_leftovers(Path(path).parent, Path(path).name)


def remove_leftovers_in(folder: Path) -> list[Path]:
    """Remove every temporary in `folder` whose owner process is gone (see `remove_leftovers`)."""
    return _remove_leftovers(Path(folder), None)


def _remove_leftovers(folder: Path, name: str | None) -> list[Path]:
    removed = []
    try:
        siblings = list(folder.iterdir()) if folder.is_dir() else []
    except OSError:
        return removed
    for sibling in siblings:
        m = _LEFTOVER.match(sibling.name)
        legacy = None if m else _LEGACY.match(sibling.name)
        found = m or legacy
        if found is None or (name is not None and found["name"] != name):
            continue
        host, pid = (m["host"], int(m["pid"])) if m else (_HOST, int(legacy["pid"]))
        if _owner_alive(host, pid):
            continue
        target = folder / found["name"]
        try:
            if m and m["kind"] == "old" and not os.path.lexists(target):
                os.replace(sibling, target)  # a swap that was cut short: the old version goes back
                logger.warning("%s: put back from %s, left by a process that was stopped", target, sibling.name)
                continue
            if sibling.is_dir() and not sibling.is_symlink():
                shutil.rmtree(sibling)
            else:
                sibling.unlink()
            removed.append(sibling)
        except OSError as e:
            logger.warning("%s: could not remove a leftover of a stopped process (%s)", sibling, e.strerror)
    if removed:
        logger.info("removed %d leftover(s) of stopped processes in %s", len(removed), folder)
    return removed


_WRITE_FAILURES = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


def user_path(path: Path | str) -> Path | str:
    """`path` with every staging name in it (`.NAME.fklip-HOST-PID-RAND.tmp...`) shown as the
    output it stands for (NAME): what messages name."""
    if not isinstance(path, Path):
        return path

    def shown(part: str) -> str:
        while (m := _LEFTOVER.match(part) or _CLAIM.match(part)) is not None:  # a staging file's own temporary too
            part = m["name"]
        return part

    parts = [shown(part) for part in path.parts]
    return Path(*parts) if parts else path


def output_error(path: Path | str, e: OSError) -> OutputError:
    """One line for a failed write: the path (or what it was, in words) and the cause (full disk,
    read-only, not a folder). A staging file's name is shown as the output it stands for."""
    path = user_path(path)
    where = user_path(Path(e.filename)) if getattr(e, "filename", None) else path
    hints = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
             errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
             errno.EPERM: "permission denied", errno.ENOTDIR: "a parent of it is a file, not a folder",
             errno.EFBIG: "the file is too large for this file system or limit",
             errno.EISDIR: "it is a folder"}
    cause = hints.get(e.errno, e.strerror or str(e))
    shown = where
    return OutputError(f"cannot write {shown}: {cause}; nothing was written")


def _mkdir(folder: Path, target: Path) -> list[Path]:
    """Make `folder` and its missing parents; returns the ones made, deepest last."""
    missing = [f for f in [folder, *folder.parents] if not os.path.lexists(f)][::-1]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"cannot write {target}: {folder} is a file, not a folder; nothing was written") from None
    except OSError as e:
        raise output_error(target, e) from None
    return missing


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a claim made, deepest first, where nothing was written into them."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            return


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds.

    On any exception the temporary file is removed and `path` is left as it was, so a reader
    never sees a half-written file. An OSError becomes OutputError (one line, exit code 2).
    """
    path = Path(path)
    _mkdir(path.parent, path)
    remove_leftovers(path)
    tmp = owned_name(path, "tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 & ~_umask())
        os.close(fd)
    except OSError as e:
        raise output_error(path, e) from None
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if getattr(e, "filename", None) is not None and str(e.filename) not in (str(tmp), str(path)):
            raise  # a read of some other file failed: it names itself
        raise output_error(path, e) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write one JSON object per line (json.dumps default separators, as the original). Atomic."""
    n = 0
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record))
            f.write("\n")
            n += 1
    return n


def write_json(path: str | os.PathLike, obj: object, indent: int | None = 2) -> None:
    """Write one JSON document. Atomic."""
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent)
        if indent is not None:
            f.write("\n")


# ---------------------------------------------------------------- checks before any work


def foreign_files(folder: Path, own: Iterable[str], own_folders: Iterable[str] = ()) -> list[str]:
    """The files under `folder` (relative POSIX paths, sorted) that are neither one of `own`
    (relative paths a command wrote there), nor under one of `own_folders`, nor fklip's own
    temporaries: what replacing `folder` whole would lose."""
    own, trees = set(own), tuple(f"{f.rstrip('/')}/" for f in own_folders)
    found = []
    for path in sorted(Path(folder).rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_dir() and not path.is_symlink():
            continue
        if rel in own or rel.startswith(trees) or any(is_leftover(part) for part in path.relative_to(folder).parts):
            continue
        found.append(rel)
    return found


def _identity(path: Path) -> tuple:
    """What two spellings of one file share: the inode when it exists, else the resolved path."""
    try:
        st = os.stat(path)
        return ("inode", st.st_dev, st.st_ino)
    except OSError:
        return ("path", os.path.realpath(path))


def check_outputs(outputs: Mapping[str, Path | None], inputs: Mapping[str, Path | Iterable[Path] | None] = {},
                  *, overwrite: bool = False, overwrite_flag: str = "--overwrite") -> None:
    """Before any work: each output (flag -> path) distinct from the other outputs and from every
    input, not a folder, its parent a folder or absent, and absent unless `overwrite`. Every
    problem is collected and raised once as ConfigError."""
    ins: list[tuple[str, Path]] = []
    for flag, value in inputs.items():
        if value is None:
            continue
        for p in ([value] if isinstance(value, (str, os.PathLike)) else value):
            ins.append((flag, Path(p)))
    in_ids = {}
    for flag, p in ins:
        in_ids.setdefault(_identity(p), (flag, p))
        in_ids.setdefault(("path", os.path.realpath(p)), (flag, p))
    problems, seen = [], {}
    for flag, p in outputs.items():
        if p is None:
            continue
        p = Path(p)
        keys = {_identity(p), ("path", os.path.realpath(p))}
        clash = next((in_ids[k] for k in keys if k in in_ids), None)
        twin = next((seen[k] for k in keys if k in seen), None)
        if clash is not None:
            problems.append(f"{flag} {p} is also the input {clash[0]} {clash[1]}: an output never "
                            "replaces an input; choose another path")
        elif twin is not None:
            problems.append(f"{flag} {p} and {twin[0]} {twin[1]} are the same file; give each output its own path")
        elif p.is_dir():
            problems.append(f"{flag} {p} is a folder; expected a file path")
        elif os.path.lexists(p) and not overwrite:
            problems.append(f"{flag} {p} exists; pass {overwrite_flag} to replace it")
        else:
            parent = next((a for a in [p.parent, *p.parent.parents] if os.path.lexists(a)), None)
            if parent is not None and not parent.is_dir():
                problems.append(f"{flag} {p}: {parent} is a file, not a folder")
        for k in keys:
            seen.setdefault(k, (flag, p))
    raise_collected(problems, "output paths", ConfigError)


# ---------------------------------------------------------------- claims


@contextmanager
def claim(path: Path) -> Iterator[None]:
    """Hold `path` for this process for the block: a second fklip process that claims it fails
    at once (InUseError) instead of mixing its writes with ours. The claim is an exclusive lock
    on `.NAME.fklip-claim` beside `path`, which the system releases when the process ends, so a
    killed run never blocks the next one. On file systems without locks it warns and goes on.
    Folders made for the claim are removed at the end when nothing was written into them."""
    path = Path(path)
    lock_path = path.parent / f".{path.name}.fklip-claim"
    made = _mkdir(path.parent, path)
    try:
        yield from _claimed(path, lock_path)
    finally:
        _remove_empty(made)


def _claimed(path: Path, lock_path: Path) -> Iterator[None]:
    import fcntl

    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        except OSError as e:
            raise output_error(path, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise InUseError(f"{path} is being written by another fklip process ({holder}); wait for it "
                             "to end, or choose another path") from None
        except OSError as e:  # ENOLCK, EOPNOTSUPP: no locks on this file system
            os.close(fd)
            logger.warning("%s: this file system has no locks (%s); two runs writing here at once "
                           "would not be stopped", path, e.strerror)
            yield
            return
        try:  # the file may have been removed by its last holder between our open and lock
            same = os.path.samestat(os.fstat(fd), os.stat(lock_path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        try:  # who holds it, for the message of a second claimant; a full disk only loses that
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        except OSError:
            pass
        yield
    finally:
        try:
            lock_path.unlink()
        except OSError:
            pass
        os.close(fd)


# ---------------------------------------------------------------- several files, one folder


class OutputSet:
    """One command's output files, all or nothing.

    `path(target)` gives the staging file to write for `target`; on a clean exit every staged file
    is renamed over its target, the replaced versions set aside until all renames succeeded and
    put back if one fails. On an exception nothing is renamed and the staging files are removed.
    Each target is claimed for the block (see `claim`).
    """

    def __init__(self, targets: Iterable[Path]):
        self.targets = list(dict.fromkeys(Path(t) for t in targets))
        self._staged: dict[Path, Path] = {}
        self._claims: list = []

    def __enter__(self) -> OutputSet:
        try:
            for target in sorted(self.targets, key=lambda t: os.path.realpath(t)):  # one order: no deadlock
                c = claim(target)
                c.__enter__()
                self._claims.append(c)
                remove_leftovers(target)
        except BaseException:
            self._release()
            raise
        return self

    def path(self, target: Path) -> Path:
        """The staging file for `target` (one of the set's targets)."""
        target = Path(target)
        if target not in self.targets:
            raise ValueError(f"{target} is not one of this output set's targets")
        if target not in self._staged:
            self._staged[target] = owned_name(target, "tmp")
        return self._staged[target]

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._commit()
            elif isinstance(exc, OSError) and exc.errno in _WRITE_FAILURES and self.targets:
                # a write into a staging file (f.write names no file): say where the outputs go
                folders = sorted({str(t.parent) for t in self.targets})
                where = self.targets[0] if len(self.targets) == 1 else f"the outputs in {', '.join(folders)}"
                raise output_error(where, exc) from None
        finally:
            for tmp in self._staged.values():
                try:
                    if tmp.is_dir():
                        shutil.rmtree(tmp, ignore_errors=True)
                    else:
                        tmp.unlink(missing_ok=True)
                except OSError:
                    pass
            self._release()

    def _commit(self) -> None:
        staged = [(t, s) for t, s in self._staged.items() if os.path.lexists(s)]
        done: list[tuple[Path, Path | None]] = []
        current = None
        try:
            for target, tmp in staged:
                current = target
                backup = None
                if os.path.lexists(target):
                    backup = owned_name(target, "old")
                    os.replace(target, backup)
                done.append((target, backup))
                os.replace(tmp, target)
        except BaseException as e:  # a failed rename, or an interrupt between two: put back what was there
            for target, backup in reversed(done):
                try:
                    if os.path.isdir(target) and not os.path.islink(target):
                        shutil.rmtree(target)
                    else:
                        target.unlink(missing_ok=True)
                    if backup is not None:
                        os.replace(backup, target)
                except OSError:
                    logger.error("%s: could not be put back after a failed write", target)
            if isinstance(e, OSError):
                raise output_error(current, e) from None
            raise
        for _, backup in done:
            if backup is not None:
                try:
                    if backup.is_dir() and not backup.is_symlink():
                        shutil.rmtree(backup)
                    else:
                        backup.unlink()
                except OSError:
                    logger.warning("%s: could not remove the replaced version", backup)

    def _release(self) -> None:
        while self._claims:
            self._claims.pop().__exit__(None, None, None)


@contextmanager
def staged_folder(out: Path, flag: str = "--out", recheck: Callable[[], None] | None = None) -> Iterator[Path]:
    """Yield an empty hidden folder beside `out`; on a clean exit it replaces `out` whole (an
    earlier `out` is removed only after the swap). On an exception it is removed and `out` is
    left as it was. `out` is claimed for the block; `recheck` (the caller's check of what `out`
    holds) runs again just before the swap, so files put there meanwhile are not swapped away.
    `out` may not be the working folder or hold it (a folder cannot be swapped out from under
    its own processes): ConfigError before any work."""
    out = Path(out)
    here = Path.cwd().resolve()
    if here == out.resolve() or out.resolve() in here.parents:
        raise ConfigError(f"{flag} {out} is the current folder or holds it; fklip builds {flag} beside it and "
                          "swaps it into place: give a new folder (for example a subfolder)")
    with OutputSet([out]) as outputs:
        tmp = outputs.path(out)
        try:
            tmp.mkdir()
        except OSError as e:
            raise output_error(out, e) from None
        try:
            yield tmp
            if recheck is not None:
                recheck()
        except OSError as e:
            raise output_error(out, e) from None

