"""`DecodePolicy`: how to decode (mode, block length, commit rule, sampling), defaults resolved and checked here
and nowhere else. Stdlib only.

The commit rules of block diffusion (research note §4):
  threshold   (dlm default 0.9) each refinement pass commits the most confident masked position plus every
              masked position with confidence >= threshold; linear-spec drafts with the same rule
              (default 0: one draft pass fills the block)
  steps       (dlm only, excludes threshold) a hard budget of `steps` passes per block, each committing an
              even split of the block's masks (the LLaDA schedule)
The block length defaults to the model's `block_size`: `resolve(config)` fills it in. AR ignores the block
length and the threshold.

`check_bounds` holds the bounds of every generation argument (max_new_tokens too, which is not a policy
field) for the CLI, the Python API and the server alike: the same bounds and the same sentence, naming the
argument as the caller spells it (`API` keywords, or the `CLI` flags).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace
from typing import Any, Mapping

from ..errors import InvalidArgument

MODES = ("ar", "dlm", "linear-spec")
DEFAULT_THRESHOLD = {"dlm": 0.9, "linear-spec": 0.0}

# how messages name each argument: Python keywords, or the `generate` command's flags
API = {"max_new_tokens": "max_new_tokens", "block_length": "block_length", "steps": "steps",
       "threshold": "threshold", "temperature": "temperature", "seed": "seed", "prompt": "prompt",
       "max_len": "raise the backend's max_len (Session.open(max_len=N), up to the engine's --max-context)"}
CLI = {"max_new_tokens": "--max-new-tokens", "block_length": "--block-length", "steps": "--steps",
       "threshold": "--threshold", "temperature": "--temperature", "seed": "--seed", "prompt": "--prompt-ids",
       "max_len": "rebuild the engine with a larger --max-context"}


def check_bounds(*, max_new_tokens=None, block_length=None, steps=None, threshold=None, temperature=0.0,
                 seed=0, names: Mapping[str, str] = API) -> None:
    """InvalidArgument (one line, `names` naming the argument) for a value out of bounds:
    max_new_tokens >= 1, block_length >= 2, steps >= 1, threshold in [0, 1], temperature >= 0 and finite,
    seed an integer. None skips an argument (max_new_tokens, block_length, steps, threshold)."""
    for key, value, low in (("max_new_tokens", max_new_tokens, 1), ("block_length", block_length, 2),
                            ("steps", steps, 1)):
        if value is not None and (not _integer(value) or value < low):
            raise InvalidArgument(f"{names[key]} {value!r}: expected an integer >= {low}")
    if threshold is not None and not (_real(threshold) and 0.0 <= threshold <= 1.0):
        raise InvalidArgument(f"{names['threshold']} {threshold!r}: expected a number in [0, 1]")
    if not (_real(temperature) and 0.0 <= temperature < math.inf):
        raise InvalidArgument(f"{names['temperature']} {temperature!r}: expected a number >= 0")
    if not _integer(seed):
        raise InvalidArgument(f"{names['seed']} {seed!r}: expected an integer")


def _integer(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and not math.isnan(v)


@dataclass(frozen=True)
class DecodePolicy:
    mode: str = "dlm"
    block_length: int | None = None       # None: the model's block_size (`resolve`)
    threshold: float | None = None        # None: the mode's default, unless `steps` asks for the fixed schedule
    steps: int | None = None              # dlm: fixed passes per block instead of the threshold rule
    temperature: float = 0.0              # 0: greedy
    seed: int = 0                         # the host generator of the Gumbel noise
    check_every: int = 4                  # device block refiners: passes between reads of the done flag
    device_refine: bool = True            # greedy dlm blocks may run on a backend's device block refiner

    def __post_init__(self):
        if self.mode not in MODES:
            raise InvalidArgument(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.steps is not None and (self.mode != "dlm" or self.threshold is not None):
            raise InvalidArgument("steps (the fixed-steps schedule) is a dlm policy and excludes threshold")
        check_bounds(block_length=None if self.mode == "ar" else self.block_length,     # AR ignores it
                     steps=self.steps, threshold=self.threshold, temperature=self.temperature, seed=self.seed)
        if self.threshold is None and self.steps is None and self.mode != "ar":
            object.__setattr__(self, "threshold", DEFAULT_THRESHOLD[self.mode])
        if self.steps is not None and not 1 <= self.steps <= (self.block_length or self.steps):
            top = self.block_length or "the model's block size"
            raise InvalidArgument(f"steps {self.steps}: expected an integer between 1 and block_length ({top})")
        if self.check_every < 1:
            raise InvalidArgument(f"check_every must be at least 1, got {self.check_every}")

    @classmethod
    def of(cls, mode: "str | DecodePolicy", knobs: Mapping[str, Any]) -> "DecodePolicy":
        """`mode` when it is already a policy (then no knobs), else DecodePolicy(mode, **knobs)."""
        if isinstance(mode, DecodePolicy):
            if knobs:
                raise InvalidArgument(f"give decoding knobs in the policy or as keywords, not both: {sorted(knobs)}")
            return mode
        return cls(mode, **knobs)

    def resolve(self, config) -> "DecodePolicy":
        """This policy with the block length filled in from `config.block_size` (and checked against it)."""
        if self.block_length is not None or self.mode == "ar":
            return self
        return replace(self, block_length=config.block_size)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def passes(self) -> int:
        """Refinement passes a dlm block may take: the steps budget, or one per position (resolved policies)."""
        return self.steps if self.steps is not None else self.block_length
