"""The vision graph's TensorRT plan: vision.onnx (encoder + projector, export/vision.py) -> one plan per target.

    name, entry = build_vision_plan(engine_dir, vision_spec, step_plan_name, target=..., ...)

Built by the step plan's builder (builder.build_plan) with one optimization profile over the image-size bound
(artifact.profiles.vision_profile: pixels [3, H, W], H and W from one merge patch up to max_side) and the fp32
precision check whatever the build's precision: the vision graph is exported float (fp8 / int8 recipes
quantize the step graph only). Its manifest entry sits under the step plan's entry as `vision`, so the runtime
that picks a step plan for this GPU has the vision plan of the same target and TensorRT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..artifact.profiles import vision_profile
from .builder import BuildOptions, build_plan

VISION_PRECISION = "fp32"


def vision_plan_name(step_plan_name: str) -> str:
    """engine.sm89.tensorrt_rtx-1.7.1.plan -> vision.sm89.tensorrt_rtx-1.7.1.plan"""
    return "vision." + step_plan_name.removeprefix("engine.")


def build_vision_plan(engine_dir: Path, vision: dict[str, Any], step_plan_name: str, *, target: str,
                      options: BuildOptions, progress: Callable[[str], None], trt, device) -> tuple[str, dict]:
    """Write engine_dir/<vision plan> and return (its file name, its manifest entry)."""
    data, info = build_plan(Path(engine_dir) / vision["file"], io_spec=vision, buckets={}, precision=VISION_PRECISION,
                            target=target, options=options, progress=progress, trt=trt, device=device,
                            profiles=[vision_profile(vision)])
    name = vision_plan_name(step_plan_name)
    (Path(engine_dir) / name).write_bytes(data)
    entry = {"file": name, "precision": VISION_PRECISION, "profiles": info.profiles,
             "precision_check": info.precision_check, "build_seconds": info.build_seconds, "bytes": len(data)}
    progress(f"{name}: {len(data):,} bytes in {info.build_seconds:.1f} s")
    return name, entry
