"""Frozen per-command configs, built once at the CLI edge. Checks name the flag at fault."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from fklip.errors import ConfigError

_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def check_device(device: str, flag: str = "--device") -> str:
    """Validate a device string and that it exists on this machine."""
    if not _DEVICE.match(device):
        raise ConfigError(f"{flag}: expected cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"{flag} {device}: no CUDA device is available here "
                              "(torch.cuda.is_available() is False); use --device cpu")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"{flag} {device}: only {torch.cuda.device_count()} CUDA devices")
    return device


def check_positive(value: int, flag: str) -> int:
    if value < 1:
        raise ConfigError(f"{flag}: expected a positive integer, got {value}")
    return value


@dataclass(frozen=True)
class DemoConfig:
    """`fklip demo`: where to work, the seed, and how to encode."""

    out: Path
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 128

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ConfigError(f"--seed: expected a non-negative integer, got {self.seed}")
        check_positive(self.batch_size, "--batch-size")
        if not _DEVICE.match(self.device):
            raise ConfigError(f"--device: expected cpu, cuda or cuda:N, got {self.device!r}")

    @property
    def data_dir(self) -> Path:
        return self.out / "data"
