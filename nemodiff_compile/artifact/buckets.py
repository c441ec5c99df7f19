"""Static shapes for the fast engines: a batch is padded up to the smallest bucket that holds it. The one
bucket picker: the fast engine's buckets and a TensorRT plan's optimization profiles both pick through it.

The block length is never padded (padding would change what a bidirectional pass sees); each block
length the runtime serves gets its own captured passes, and prompt lengths run eagerly (prefill).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InvalidArgument

DEFAULT_BATCH_SIZES = (1, 2, 4, 8)


@dataclass(frozen=True)
class BatchBuckets:
    sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    # what to do about a batch no bucket holds ({batch}: that batch)
    remedy: str = field(default="split the request or add a bucket", compare=False)

    def __post_init__(self):
        if not self.sizes or any(s < 1 for s in self.sizes):
            raise InvalidArgument(f"batch buckets must be positive sizes, got {list(self.sizes)}")
        object.__setattr__(self, "sizes", tuple(sorted(set(self.sizes))))

    @classmethod
    def built(cls, sizes) -> "BatchBuckets":
        """An engine's buckets (its batch sizes, e.g. TensorRT profiles): a batch none holds needs a rebuild."""
        return cls(tuple(sizes), remedy="rebuild with --batch-sizes including {batch}")

    def pick(self, batch: int) -> int:
        """The smallest bucket >= batch."""
        for size in self.sizes:
            if size >= batch:
                return size
        raise InvalidArgument(f"batch {batch} exceeds the largest batch bucket {self.sizes[-1]} "
                              f"(buckets {list(self.sizes)}): {self.remedy.format(batch=batch)}")
