"""A vision-language checkpoint's TensorRT build (tensorrt_rtx ahead of time, on CPU): the step plan and the vision
plan (trt/vision_plan.py: one profile over the image-size bound, fp32 whatever the build's precision) per target,
both in the manifest; adding a target builds both for it."""

import pytest

from nemodiff_compile.artifact.manifest import read_manifest

pytestmark = pytest.mark.slow          # one tiny VLM export (~20-35 s on 2 cores) + four small plans


def test_vlm_tensorrt_build_writes_both_plans(rtx, tiny_vlm_dir, tmp_path):
    from nemodiff_compile.build_config import BuildConfig
    from nemodiff_compile.pipeline import build_engine

    out = tmp_path / "tiny-vlm-trt"
    kw = dict(source=str(tiny_vlm_dir), output=out, backend="tensorrt", precision="fp16", validate=False,
              batch_sizes=(1,), max_context=128)
    log = []
    build_engine(BuildConfig.of(gpus=("sm89",), **kw), progress=log.append)
    m = read_manifest(out, deep=True)
    (e,) = m.engines
    v = e["vision"]
    assert e["file"] == "engine.sm89.tensorrt_rtx-1.7.1.plan" and v["file"] == "vision.sm89.tensorrt_rtx-1.7.1.plan"
    for f in (e["file"], v["file"], "vision.onnx", "model.onnx"):
        assert f in m.artifacts
    assert (out / v["file"]).stat().st_size == v["bytes"] > 100_000
    assert e["precision_check"]["requested"] == "fp16" and e["precision_check"]["passed"]
    vc = v["precision_check"]                          # the vision tower stays float in an fp16 build
    assert v["precision"] == vc["requested"] == "fp32" and vc["passed"] and vc["gemms"] == vc["in_precision"] > 0
    (p,) = v["profiles"]
    assert p["shapes"] == {"pixels": [[3, 28, 28], [3, 112, 112], [3, 112, 112]]}
    assert any(line.startswith("parsing vision.onnx") for line in log)

    build_engine(BuildConfig.of(gpus=("sm86",), **kw), progress=log.append)        # same config: adds a target
    m = read_manifest(out, deep=True)
    assert sorted((x["target"], x["vision"]["file"]) for x in m.engines) == [
        ("sm86", "vision.sm86.tensorrt_rtx-1.7.1.plan"), ("sm89", "vision.sm89.tensorrt_rtx-1.7.1.plan")]
    assert any("graph is reused" in line for line in log)
