"""TensorRT runtime bookkeeping without a GPU: the engine chosen for a (fake) device, the bucket,
profile and every binding shape of a pass."""

import pytest

from nemodiff_compile.artifact.manifest import read_manifest
from nemodiff_compile.artifact.profiles import make_profiles
from nemodiff_compile.artifact.targets import DeviceInfo
from nemodiff_compile.errors import NemodiffError
from nemodiff_compile.artifact.spec import step_spec
from nemodiff_compile.backends.trt import BindingPlan, select_plan


@pytest.fixture
def plan(tiny_cfg):
    spec = step_spec(tiny_cfg, "float16", False).to_json()
    buckets = {"batch_sizes": [1, 4], "max_context": 128, "block_length": 16}
    entry = {"profiles": [p.to_json() for p in make_profiles(spec, buckets)]}
    return BindingPlan(spec, entry, buckets, 128)


def test_pass_bindings(plan, tiny_cfg):
    b = plan.plan(3, 16)                                  # 3 rows ride in the 4-row bucket
    assert (b.bucket, b.block, b.profile) == (4, 16, 1)
    assert b.inputs["input_ids"] == (4, 16) and b.inputs["causal"] == (4,) and b.inputs["temperature"] == ()
    assert b.inputs["past_keys"] == (tiny_cfg.num_hidden_layers, 4, tiny_cfg.num_key_value_heads, 128,
                                     tiny_cfg.head_dim)
    assert b.outputs["new_keys"][3] == 16 and b.outputs["token"] == (4, 16)
    assert plan.plan(1, 1).profile == 0 and plan.plan(1, 100).inputs["gumbel_noise"] == (1, 100, tiny_cfg.vocab_size)


def test_refusals(plan, tiny_cfg):
    with pytest.raises(NemodiffError, match="--batch-sizes including 5"):
        plan.plan(5, 16)
    with pytest.raises(NemodiffError, match="no optimization profile"):
        plan.plan(1, 129)
    with pytest.raises(NemodiffError, match="--max-context 64"):
        BindingPlan(plan.io_spec, {"profiles": [p.to_json() for p in plan.profiles]},
                    {"batch_sizes": [1, 4], "max_context": 128, "block_length": 16}, 64)


def test_select_plan_for_a_fake_gpu(trt_fp32_dir, rtx):
    from nemodiff_compile.backends.trt_shim import load

    m = read_manifest(trt_fp32_dir)
    trt = load(("tensorrt_rtx",))
    ada = DeviceInfo("NVIDIA RTX 4090", (8, 9), "580.65")
    assert select_plan(trt_fp32_dir, m, device=ada, trt=trt)["target"] == "sm89"
    h100 = DeviceInfo("NVIDIA H100 80GB HBM3", (9, 0), "580.65")
    with pytest.raises(NemodiffError, match="--gpus sm90"):
        select_plan(trt_fp32_dir, m, device=h100, trt=trt)
    p = BindingPlan(m.io_spec, m.engines[0], m.buckets, m.buckets["max_context"]).plan(2, 16)
    assert {"canvas", "active", "quota"} <= set(p.inputs) and p.outputs["commit"] == (2, 16)
