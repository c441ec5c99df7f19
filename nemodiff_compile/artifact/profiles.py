"""Optimization profiles from the runtime's buckets, and the binding shapes the runtime uses. Stdlib only.

The builder and the TensorRT runtime both call this module, so every shape the runtime binds is inside
a profile by construction (`profile_for` refuses a shape that is not, naming the build flag to change).

One profile per batch bucket:
  batch      fixed at the bucket (the runtime pads a smaller batch up to the next bucket)
  block      1 .. max_context, tuned (opt) for the block length: decode passes bind 1, diffusion
             passes the block length, prefill the prompt length
  cache_len  fixed at max_context: the static KV cache is bound whole, rows carry their own lengths
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import InvalidArgument

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Profile:
    batch: int
    dims: dict[str, tuple[int, int, int]]            # dim name -> (min, opt, max)
    shapes: dict[str, tuple[Shape, Shape, Shape]]    # input name -> (min, opt, max) shapes

    def to_json(self) -> dict[str, Any]:
        return {"batch": self.batch, "dims": {k: list(v) for k, v in self.dims.items()},
                "shapes": {k: [list(s) for s in v] for k, v in self.shapes.items()}}

    def contains(self, shapes: Mapping[str, Shape]) -> bool:
        for name, shape in shapes.items():
            if name not in self.shapes:
                continue
            lo, _, hi = self.shapes[name]
            if len(shape) != len(lo) or any(not (a <= s <= b) for a, s, b in zip(lo, shape, hi)):
                return False
        return True


def _resolve(shape, dims: Mapping[str, int]) -> Shape:
    return tuple(int(dims[d]) if isinstance(d, str) else int(d) for d in shape)


def binding_shapes(io_spec: Mapping[str, Any], *, batch: int, block: int, cache_len: int) -> dict[str, Shape]:
    """Input name -> concrete shape for one pass (io_spec: IOSpec.to_json())."""
    dims = {"batch": batch, "block": block, "cache_len": cache_len}
    return {t["name"]: _resolve(t["shape"], dims) for t in io_spec["inputs"]}


def output_shapes(io_spec: Mapping[str, Any], *, batch: int, block: int, cache_len: int) -> dict[str, Shape]:
    dims = {"batch": batch, "block": block, "cache_len": cache_len}
    return {t["name"]: _resolve(t["shape"], dims) for t in io_spec["outputs"]}


def make_profiles(io_spec: Mapping[str, Any], buckets: Mapping[str, Any]) -> list[Profile]:
    """buckets: the manifest's (build_config.Shapes.to_manifest(): batch_sizes, max_context, block_length)."""
    max_ctx, block = int(buckets["max_context"]), int(buckets["block_length"])
    sizes = sorted(set(int(b) for b in buckets["batch_sizes"]))
    if not sizes or sizes[0] < 1:
        raise InvalidArgument(f"--batch-sizes {sizes}: expected positive integers")
    if block > max_ctx:
        raise InvalidArgument(f"--block-length {block} exceeds --max-context {max_ctx}")
    out = []
    for b in sizes:
        dims = {"batch": (b, b, b), "block": (1, block, max_ctx), "cache_len": (max_ctx, max_ctx, max_ctx)}
        shapes = {}
        for t in io_spec["inputs"]:
            if not any(isinstance(d, str) for d in t["shape"]):
                continue                                  # static inputs need no profile entry
            lo, opt, hi = (_resolve(t["shape"], {k: v[i] for k, v in dims.items()}) for i in range(3))
            shapes[t["name"]] = (lo, opt, hi)
        out.append(Profile(b, dims, shapes))
    return out


def vision_profile(vision: Mapping[str, Any]) -> Profile:
    """The vision graph's one profile (vision: IOSpec extra["vision"]): pixels [3, H, W], H and W from one
    merge patch up to max_side, tuned (opt) for max_side (preprocessing downscales large images to it)."""
    m, top = int(vision["merge_patch"]), int(vision["max_side"])
    dims = {"height": (m, top, top), "width": (m, top, top)}
    return Profile(1, dims, {"pixels": tuple((3, dims["height"][i], dims["width"][i]) for i in range(3))})


def profile_for(profiles: list[Profile], shapes: Mapping[str, Shape]) -> int:
    """Index of the first profile containing every input shape."""
    for i, p in enumerate(profiles):
        if p.contains(shapes):
            return i
    raise InvalidArgument(f"no optimization profile holds the input shapes {dict(shapes)}: rebuild with "
                          "--batch-sizes / --max-context / --block-length covering them")


def profiles_from_json(items) -> list[Profile]:
    return [Profile(int(p["batch"]), {k: tuple(v) for k, v in p["dims"].items()},
                    {k: tuple(tuple(s) for s in v) for k, v in p["shapes"].items()}) for p in items]
