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
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

from ..errors import InvalidArgument

MODES = ("ar", "dlm", "linear-spec")
DEFAULT_THRESHOLD = {"dlm": 0.9, "linear-spec": 0.0}


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
        if self.threshold is None and self.steps is None and self.mode != "ar":
            object.__setattr__(self, "threshold", DEFAULT_THRESHOLD[self.mode])
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise InvalidArgument(f"threshold must be in [0, 1], got {self.threshold}")
        if self.block_length is not None and self.mode != "ar" and self.block_length < 2:
            raise InvalidArgument(f"block_length must be at least 2, got {self.block_length}")
        if self.steps is not None and not 1 <= self.steps <= (self.block_length or self.steps):
            top = self.block_length or "the model's block size"
            raise InvalidArgument(f"steps must be between 1 and block_length ({top}), got {self.steps}")
        if self.temperature < 0:
            raise InvalidArgument(f"temperature must be >= 0, got {self.temperature}")
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
