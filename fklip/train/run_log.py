"""The run folder of one `fklip train`: claimed for the run, written by rank 0, closed on any exit.

`--logs/--name` holds `params.json`, `metrics.jsonl`, `checkpoints/` and `tensorboard/`. A new run
takes a folder that does not exist or is empty (or, with `--overwrite`, replaces what one holds);
a resumed run continues its own. The folder is claimed for the whole run (see `fklip.io.claim`),
so two runs with the same `--name` cannot interleave one `metrics.jsonl`: the second stops at once.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from fklip.errors import ConfigError
from fklip.io import claim, is_leftover, remove_leftovers_in, write_json

logger = logging.getLogger(__name__)

_EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pt$")
RUN_ENTRIES = {"params.json", "metrics.jsonl", "checkpoints", "tensorboard"}  # what a run folder holds


def last_checkpoint(run_dir: Path) -> Path | None:
    """`checkpoints/epoch_latest.pt`, else the highest `epoch_N.pt`, else None."""
    folder = Path(run_dir) / "checkpoints"
    if (folder / "epoch_latest.pt").is_file():
        return folder / "epoch_latest.pt"
    numbered = [(int(m[1]), p) for p in (folder.iterdir() if folder.is_dir() else [])
                if (m := _EPOCH_FILE.match(p.name)) and p.is_file()]
    return max(numbered)[1] if numbered else None


def _inside(path: Path, folder: Path) -> bool:
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))


class RunLog:
    """The run folder, for rank 0. Enter it before the slow work (it claims the folder and checks
    that the run may use it); `start` writes params.json and opens TensorBoard once the inputs are
    checked; `epoch` appends to metrics.jsonl; every file is closed and the claim released on
    any exit. Other ranks use `RunLog(None, ...)`, which does nothing."""

    def __init__(self, run_dir: Path | None, *, resuming: bool, overwrite: bool, report_to: str,
                 inputs: Iterable[tuple[str, Path]] = ()):
        self.run_dir = run_dir
        self.resuming, self.overwrite, self.report_to = resuming, overwrite, report_to
        self.inputs = [(flag, Path(p)) for flag, p in inputs]
        self.writer = None
        self._claim = None

    def __enter__(self) -> RunLog:
        if self.run_dir is None:
            return self
        self._claim = claim(self.run_dir)
        self._claim.__enter__()
        try:
            self._check()
        except BaseException:
            self._release()
            raise
        return self

    def _check(self) -> None:
        run_dir = self.run_dir
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(f"--name: {run_dir} is a file; expected a run folder")
        if self.resuming:
            if self.overwrite:
                raise ConfigError("--overwrite starts a new run, and --resume of a training checkpoint continues "
                                  "one: pass one of them")
            return
        if not run_dir.is_dir() or not any(run_dir.iterdir()):
            return
        foreign = sorted(p.name for p in run_dir.iterdir() if p.name not in RUN_ENTRIES and not is_leftover(p.name))
        if foreign:  # fklip replaces only what it made, --overwrite or not
            raise ConfigError(f"--name: {run_dir} is not an fklip run folder (it holds {', '.join(foreign[:3])}"
                              f"{', ...' if len(foreign) > 3 else ''}); pick another --name")
        if self.overwrite:
            inside = [f"{flag} {p}" for flag, p in self.inputs if _inside(p, run_dir)]
            if inside:
                raise ConfigError(f"--overwrite would remove the run folder {run_dir}, which holds the input "
                                  f"{inside[0]}; copy it elsewhere or pick another --name")
            return
        last = last_checkpoint(run_dir)
        if last is not None:
            raise ConfigError(f"--name: the run folder {run_dir} already holds a run (last checkpoint {last}); "
                              f"continue it with --resume {last}, start it again with --overwrite, or pick "
                              "another --name")
        raise ConfigError(f"--name: the run folder {run_dir} holds a run that wrote no checkpoint (it stopped "
                          "in its first epoch; its logs are there); start it again with --overwrite, or pick "
                          "another --name")

    def start(self, params: dict) -> None:
        """The inputs are checked: replace what --overwrite replaces, write params.json, open
        TensorBoard, and clear the temporaries of a killed earlier run of this folder."""
        if self.run_dir is None:
            return
        run_dir = self.run_dir
        if not self.resuming and self.overwrite and run_dir.is_dir():
            logger.warning("--overwrite: removing what the run folder %s held", run_dir)
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_leftovers_in(run_dir / "checkpoints")
        write_json(run_dir / "params.json", params)
        if self.report_to == "tensorboard":
            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, scalars: dict, step: int) -> None:
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)

    def epoch(self, record: dict) -> None:
        """One line of metrics.jsonl, appended when the epoch's checkpoint is written."""
        if self.run_dir is not None:
            with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def last_checkpoint(self) -> Path | None:
        return None if self.run_dir is None else last_checkpoint(self.run_dir)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self.writer is not None:
                self.writer.close()
        finally:
            self._release()

    def _release(self) -> None:
        if self._claim is not None:
            self._claim.__exit__(None, None, None)
            self._claim = None
