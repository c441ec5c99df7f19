"""Optimization profiles from the buckets, GPU targets and engine selection: pure Python, no TensorRT."""

import pytest

from nemodiff_compile.artifact.buckets import BatchBuckets
from nemodiff_compile.artifact.profiles import binding_shapes, make_profiles, profile_for, profiles_from_json
from nemodiff_compile.artifact.targets import (DeviceInfo, engine_file_name, parse_target, parse_targets,
                                            select_engine)
from nemodiff_compile.errors import InvalidArgument, NemodiffError
from nemodiff_compile.artifact.spec import step_spec

BUCKETS = {"batch_sizes": [4, 1], "max_context": 256, "block_length": 16}


@pytest.fixture
def spec(tiny_cfg):
    return step_spec(tiny_cfg, "float32", False, remask={"variant": "onnx", "policy": "threshold",
                                                          "threshold": 0.9, "mask_id": tiny_cfg.mask_token_id}).to_json()


def test_one_profile_per_batch_bucket(spec, tiny_cfg):
    profiles = make_profiles(spec, BUCKETS)
    assert [p.batch for p in profiles] == [1, 4]
    p = profiles[1]
    assert p.shapes["input_ids"] == ((4, 1), (4, 16), (4, 256))
    kv = (tiny_cfg.num_hidden_layers, 4, tiny_cfg.num_key_value_heads, 256, tiny_cfg.head_dim)
    assert p.shapes["past_keys"] == (kv, kv, kv)                      # the cache is bound whole
    assert p.shapes["gumbel_noise"][2] == (4, 256, tiny_cfg.vocab_size)
    assert p.shapes["causal"] == ((4,), (4,), (4,))                   # one flag per row
    assert "temperature" not in p.shapes                               # scalars need no profile
    assert {"canvas", "active", "quota"} <= set(p.shapes)
    assert profiles_from_json([q.to_json() for q in profiles]) == profiles


@pytest.mark.parametrize("batch,block", [(1, 1), (1, 16), (3, 16), (4, 256), (2, 37)])
def test_every_runtime_shape_is_inside_a_profile(spec, batch, block):
    profiles = make_profiles(spec, BUCKETS)
    bucket = BatchBuckets.built(BUCKETS["batch_sizes"]).pick(batch)
    shapes = binding_shapes(spec, batch=bucket, block=block, cache_len=256)
    assert profiles[profile_for(profiles, shapes)].batch == bucket


def test_shapes_outside_the_profiles_are_refused(spec):
    profiles = make_profiles(spec, BUCKETS)
    with pytest.raises(InvalidArgument, match="--batch-sizes including 5"):
        BatchBuckets.built(BUCKETS["batch_sizes"]).pick(5)
    with pytest.raises(InvalidArgument, match="no optimization profile"):
        profile_for(profiles, binding_shapes(spec, batch=4, block=300, cache_len=256))
    with pytest.raises(InvalidArgument, match="--block-length 512 exceeds --max-context 256"):
        make_profiles(spec, {**BUCKETS, "block_length": 512})


def test_target_names():
    assert parse_target("sm90") == (9, 0) and parse_target("SM_89") == (8, 9) and parse_target("12.0") == (12, 0)
    assert parse_targets("sm90, 8.9,sm90") == ("sm90", "sm89")
    with pytest.raises(InvalidArgument, match="--gpus 'h100'"):
        parse_targets("h100")
    assert engine_file_name("sm89", "tensorrt_rtx", "1.7.1.116") == "engine.sm89.tensorrt_rtx-1.7.1.plan"


def _entry(target, module="tensorrt", version="11.4.0.106", **kw):
    return {"target": target, "trt_module": module, "trt_version": version, "file": f"{target}.plan", **kw}


H100 = DeviceInfo("NVIDIA H100 80GB HBM3", (9, 0), "580.65")
L40 = DeviceInfo("NVIDIA L40S", (8, 9), "580.65")


def test_select_engine_picks_this_gpu():
    entries = [_entry("sm89"), _entry("sm90")]
    assert select_engine(entries, H100, "tensorrt", "11.4.0.106")["target"] == "sm90"
    assert select_engine(entries, L40, "tensorrt", "11.4.0.106")["target"] == "sm89"


def test_select_engine_compatibility_rules():
    vc = _entry("sm90", version="11.2.1.2", version_compatible=True)
    assert select_engine([vc], H100, "tensorrt", "11.4.0.106") is vc              # later runtime, same major
    with pytest.raises(NemodiffError):
        select_engine([vc], H100, "tensorrt", "11.1.0.106")                         # older runtime
    amp = _entry("sm80", hardware_compatibility="AMPERE_PLUS")
    assert select_engine([amp], H100, "tensorrt", "11.4.0.106") is amp
    exact = _entry("sm90")
    assert select_engine([amp, exact], H100, "tensorrt", "11.4.0.106") is exact    # exact one preferred


def test_select_engine_refusal_names_what_to_build():
    entries = [_entry("sm89", module="tensorrt_rtx", version="1.7.1.116")]
    with pytest.raises(NemodiffError) as e:
        select_engine(entries, H100, "tensorrt", "11.4.0.106", "engines/x")
    msg = str(e.value)
    assert "sm90" in msg and "sm89 (tensorrt_rtx 1.7.1.116)" in msg
    assert "nemodiff-compile build --backend tensorrt --gpus sm90 --output engines/x" in msg
    assert "\n" not in msg
    with pytest.raises(NemodiffError, match="no CUDA GPU"):
        select_engine(entries, None, "tensorrt", "11.4.0.106")


def test_timing_cache_key(tmp_path):
    from types import SimpleNamespace

    from nemodiff_compile.trt.builder import timing_cache_path

    trt = SimpleNamespace(flavor="tensorrt", version="11.4.0.106")
    assert timing_cache_path(trt, "sm90", tmp_path, H100).name == "tensorrt-11.4.0.106-sm90-NVIDIA_H100_80GB_HBM3.cache"
    assert timing_cache_path(trt, "sm89", tmp_path, H100).name == "tensorrt-11.4.0.106-sm89.cache"
