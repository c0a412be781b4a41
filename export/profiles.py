"""TensorRT optimisation profiles as plain value objects (no TensorRT import here).

A `ShapeRange(min, opt, max)` is what an `IOptimizationProfile.set_shape` call takes for one
input; `profiles_for` derives one per input of a tower from its `TowerSpec`: the batch axis
ranges 1..max_batch and is tuned for opt_batch, the text length axis ranges 1..context length
and is tuned for the full length, fixed axes (channels, image size) stay fixed. The dicts
round-trip through JSON for manifests and `engine.json` files.
"""

from __future__ import annotations

from dataclasses import dataclass

from export.specs import TowerSpec
from fklip.errors import ConfigError, DataError, raise_collected


def _is_dim(d) -> bool:
    return isinstance(d, int) and not isinstance(d, bool)


@dataclass(frozen=True)
class ShapeRange:
    """The (min, opt, max) shapes of one input: same rank, all >= 1, min <= opt <= max per axis."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def __post_init__(self):
        for field in ("min", "opt", "max"):
            object.__setattr__(self, field, tuple(getattr(self, field)))
        header = f"shape range min={list(self.min)} opt={list(self.opt)} max={list(self.max)}"
        problems = []
        ranks = {len(self.min), len(self.opt), len(self.max)}
        if len(ranks) != 1:
            problems.append(f"min, opt and max have different ranks "
                            f"({len(self.min)}, {len(self.opt)}, {len(self.max)})")
        if 0 in ranks:
            problems.append("a shape has no axes")
        for field in ("min", "opt", "max"):
            bad = [d for d in getattr(self, field) if not _is_dim(d) or d < 1]
            if bad:
                problems.append(f"{field} has dimensions that are not integers >= 1: {bad}")
        if len(ranks) == 1:
            for axis, (lo, mid, hi) in enumerate(zip(self.min, self.opt, self.max)):
                if all(_is_dim(d) for d in (lo, mid, hi)) and not lo <= mid <= hi:
                    problems.append(f"axis {axis}: expected min <= opt <= max, got {lo}, {mid}, {hi}")
        raise_collected(problems, header, error=ConfigError)

    def contains(self, shape: tuple[int, ...]) -> bool:
        """Whether a concrete input shape lies inside the range."""
        return len(shape) == len(self.min) and all(
            lo <= d <= hi for lo, d, hi in zip(self.min, shape, self.max))

    def as_dict(self) -> dict:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, d: dict, where: str = "profile") -> ShapeRange:
        """The inverse of `as_dict`; a malformed entry raises DataError naming `where`."""
        if not isinstance(d, dict) or set(d) != {"min", "opt", "max"}:
            keys = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise DataError(f"{where}: expected an object with keys max, min, opt, got {keys}")
        if not all(isinstance(d[k], list) and all(_is_dim(x) for x in d[k]) for k in d):
            raise DataError(f"{where}: min, opt and max must be lists of integers, got {d}")
        try:
            return cls(d["min"], d["opt"], d["max"])
        except ConfigError as e:
            raise DataError(f"{where}: {e}") from None


def profiles_for(spec: TowerSpec, opt_batch: int, max_batch: int) -> dict[str, ShapeRange]:
    """One ShapeRange per input of the tower: batch 1..max_batch (opt_batch), text length
    1..context length (opt = max = the context length), every other axis fixed."""
    problems = []
    opt_ok = _is_dim(opt_batch) and opt_batch >= 1
    if not opt_ok:
        problems.append(f"--opt-batch: expected an integer >= 1, got {opt_batch!r}")
    if not _is_dim(max_batch) or max_batch < 1:
        problems.append(f"--max-batch: expected an integer >= 1, got {max_batch!r}")
    elif opt_ok and max_batch < opt_batch:
        problems.append(f"--max-batch: expected at least --opt-batch ({opt_batch}), got {max_batch}")
    raise_collected(problems, f"{spec.tower} tower profile", error=ConfigError)
    profiles = {}
    for tensor in spec.inputs:
        axes = []  # (min, opt, max) per axis
        for d in tensor.shape:
            if d == spec.batch_axis:
                axes.append((1, opt_batch, max_batch))
            elif isinstance(d, str):
                # The text length: runners cut each batch after its last end token, so any
                # length up to the context length occurs; the full length is the common case.
                if spec.max_length is None:
                    raise ConfigError(f"{spec.tower} tower: input {tensor.name!r} has the dynamic "
                                      f"axis {d!r} but the spec gives no max_length")
                axes.append((1, spec.max_length, spec.max_length))
            else:
                axes.append((d, d, d))
        lo, mid, hi = zip(*axes)
        profiles[tensor.name] = ShapeRange(lo, mid, hi)
    return profiles


def profiles_as_dict(profiles: dict[str, ShapeRange]) -> dict[str, dict]:
    """{input name: {"min": [...], "opt": [...], "max": [...]}}, inputs in sorted order."""
    return {name: profiles[name].as_dict() for name in sorted(profiles)}


def profiles_from_dict(d: dict, where: str = "profiles") -> dict[str, ShapeRange]:
    """The inverse of `profiles_as_dict`; a malformed entry raises DataError naming `where`."""
    if not isinstance(d, dict) or not d:
        raise DataError(f"{where}: expected an object mapping input names to shape ranges, got {d!r}")
    return {name: ShapeRange.from_dict(r, where=f"{where}[{name!r}]") for name, r in d.items()}
