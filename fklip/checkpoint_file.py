"""Reading a checkpoint file without running its code.

`torch.load(weights_only=True)` unpickles tensors and plain containers only. When it refuses a
file, the pickle is read again as opcodes (`pickletools`, which runs nothing) to tell a file that
needs more than tensors (a class, or a call such as `os.system`: refused with a message naming
`--trust-checkpoint`) from a file that is no pickle at all ("not a PyTorch checkpoint").
"""

from __future__ import annotations

import io
import pickle
import pickletools
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from fklip.errors import CheckpointError

# Module classes of a TorchScript archive -> the activation fklip records.
_TORCHSCRIPT_ACTIVATIONS = {"QuickGELU": "quick_gelu", "GELU": "gelu"}
# Modules of the globals every torch.save pickle imports (tensor rebuilding, OrderedDict, bytes).
_TENSOR_MODULES = ("torch", "collections", "_codecs")
_LEGACY_PICKLES = 5  # a legacy torch.save file: magic, protocol, sys info, the object, storage keys
_MAX_LINE = 1 << 16  # protocol 0 names end at a newline; a longer "line" is not a pickle


@dataclass(frozen=True)
class CheckpointFile:
    """What a checkpoint file holds, read without running its code (unless trusted)."""

    kind: str  # "torchscript" or "pickle"
    content: Any  # a TorchScript archive's state dict, or the unpickled object
    activation: str | None = None  # a TorchScript archive's, when its modules say it


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def _torchscript_activation(module) -> str | None:
    """"quick_gelu" or "gelu" when the archive's modules use exactly one of the two, else None."""
    found = {_TORCHSCRIPT_ACTIVATIONS[m.original_name] for m in module.modules()
             if getattr(m, "original_name", None) in _TORCHSCRIPT_ACTIVATIONS}
    return found.pop() if len(found) == 1 else None


class _CappedReader:
    """A file whose reads never ask for more than it holds: pickletools reads the lengths it is
    given from the file, and a file's read(n) reserves n bytes first."""

    def __init__(self, f: BinaryIO, size: int):
        self.f, self.size = f, size

    def read(self, n: int = -1) -> bytes:
        left = self.size - self.f.tell()
        return self.f.read(left if n < 0 else min(n, left))

    def readline(self) -> bytes:
        return self.f.readline(_MAX_LINE)

    def tell(self) -> int:
        return self.f.tell()


def _globals_of(stream: BinaryIO) -> list[str]:
    """"module.name" of every global one pickle imports, read as opcodes (nothing runs).

    ValueError when the stream does not hold a whole pickle. STACK_GLOBAL (protocol 4+) takes
    its two names from the strings pushed before it, possibly through the memo."""
    found, strings, memo, last = [], [], {}, None
    for op, arg, _ in pickletools.genops(stream):
        if op.name == "GLOBAL":
            found.append(str(arg).replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            found.append(".".join(strings[-2:]) if len(strings) >= 2 else "a global")
        if op.name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):  # these leave the stack as it is
            memo[len(memo) if op.name == "MEMOIZE" else arg] = last
            continue
        last = arg if op.name.endswith("UNICODE") else memo.get(arg) if op.name.endswith("GET") else None
        if isinstance(last, str):
            strings.append(last)
    return found


def pickle_globals(path: Path) -> list[str] | None:
    """The globals the pickles of a torch.save file (zip or legacy) or a plain pickle import,
    read without running them; None when the file holds no readable pickle."""
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("data.pkl")]
            if not names:
                return None
            with z.open(names[0]) as f:
                return _globals_of(io.BytesIO(f.read()))
    except zipfile.BadZipFile:
        pass
    except (ValueError, OSError):
        return None
    found = []
    with open(path, "rb") as f:
        capped = _CappedReader(f, path.stat().st_size)
        for index in range(_LEGACY_PICKLES):
            try:
                found += _globals_of(capped)
            except ValueError:  # the first stream is not a pickle, or the pickles have ended
                if index == 0:
                    return None
                break
    return found


def _named_global(error: str) -> str | None:
    """The global torch's weights-only unpickler names in its refusal, if it names one."""
    for line in error.splitlines():
        for start, end in (("Unsupported global: GLOBAL ", " was not"), ("unsupported GLOBAL ", " whose")):
            if start in line:
                return line.split(start)[-1].split(end)[0].strip()
    return None


def read_checkpoint_file(path: Path, trust: bool) -> CheckpointFile:
    """A TorchScript archive's state dict, or the unpickled object: tensors and plain containers
    only, unless `trust` (--trust-checkpoint) allows running the file's pickled code."""

    if _is_torchscript(path):
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as e:
            raise CheckpointError(f"{path}: unreadable TorchScript archive ({e})") from None
        return CheckpointFile("torchscript", dict(module.state_dict()), _torchscript_activation(module))
    try:
        return CheckpointFile("pickle", torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:  # torch.load raises many types (KeyError, RuntimeError...) on non-checkpoints
        named = _named_global(str(e)) if isinstance(e, pickle.UnpicklingError) else None
        scanned = pickle_globals(path) or []
        beyond = [g for g in scanned if g.split(".")[0] not in _TENSOR_MODULES]
        if named is None and not beyond:
            reason = "unreadable pickle" if isinstance(e, pickle.UnpicklingError) else \
                f"{type(e).__name__}: {str(e)[:200]}"
            raise CheckpointError(f"{path}: not a PyTorch checkpoint ({reason})") from None
        if not trust:
            what = ", ".join(dict.fromkeys(beyond[:3])) or named
            raise CheckpointError(
                f"{path}: the checkpoint holds Python objects beyond tensors ({what[:120]}); "
                "loading it could run code. Pass --trust-checkpoint only if you trust the file"
            ) from None
    try:
        return CheckpointFile("pickle", torch.load(path, map_location="cpu", weights_only=False))
    except Exception as e:  # arbitrary unpickling: report whatever it raised as one line
        raise CheckpointError(f"{path}: could not load the checkpoint ({str(e)[:200]})") from None
