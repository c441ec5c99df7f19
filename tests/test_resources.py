"""The resource plan (nemodiff_compile/resources.py): what a build needs, and the one-line refusal
naming the option that would fit."""

from pathlib import Path

from nemodiff_compile.config import PRESETS
from nemodiff_compile.quant import recipe_for
from nemodiff_compile.resources import GIB, LIBRARIES, Machine, plan_build, probe, refusal

CFG = PRESETS["14b"]
CKPT = CFG.num_parameters() * 2                  # bf16, as published


OUT = Path("/nonexistent-root-for-tests/engines/x")         # its first existing ancestor is /


def _machine(ram_gib, gpu_gib=None, disk_gib=1000):
    return Machine(int(ram_gib * GIB), int(ram_gib * GIB), {"/": int(disk_gib * GIB)},
                   "NVIDIA H200" if gpu_gib else None, int(gpu_gib * GIB) if gpu_gib else None,
                   int(gpu_gib * GIB) if gpu_gib else None)


def test_quantized_plan_holds_the_checkpoint_once():
    fp8 = plan_build(CFG, precision="fp8", recipe=recipe_for("fp8"), validate=False, download=True,
                     output=OUT, cache="/tmp")
    assert fp8.checkpoint == CKPT and fp8.download == CKPT and fp8.gpu == 0 and fp8.host_validate == 0
    assert LIBRARIES + CKPT < fp8.host_build < 1.1 * CKPT          # the weights once + a fixed part
    # fp8 decoder weights, the float32 embedding and head (2 x 131072 x 5120 x 4 bytes), and the
    # recipe's kept first layers' projections in float32 (3 more bytes a weight)
    head = 2 * CFG.vocab_size * CFG.hidden_size * 4
    h = CFG.hidden_size
    kept = recipe_for("fp8").keep_first_layers * 3 * (2 * h * (CFG.q_width + CFG.kv_width) + 3 * h * CFG.intermediate_size)
    assert kept > 0.01 * fp8.engine_disk                           # visible at this tolerance
    assert abs(fp8.engine_disk - (CFG.num_parameters() - head / 4 + head + kept)) < 0.01 * fp8.engine_disk
    cuda = plan_build(CFG, precision="fp8", recipe=recipe_for("fp8"), calib_device="cuda", validate=False)
    assert cuda.gpu > CKPT and cuda.host_build < 1 * GIB
    fp32 = plan_build(CFG, precision="fp32", validate=True)
    assert fp32.host_build > 2 * CKPT and fp32.engine_disk == 2 * CKPT and fp32.host_validate > fp32.host_build
    trt = plan_build(CFG, precision="fp16", backend="tensorrt", gpu_targets=2, validate=True)
    assert trt.engine_disk == 3 * CKPT and trt.host_validate == 0        # graph + one plan per target


def test_refusal_names_the_option_that_fits():
    kw = dict(cfg=CFG, quantized=True)
    plan = plan_build(CFG, precision="fp8", recipe=recipe_for("fp8"), validate=True, output=OUT)
    assert refusal(plan, _machine(1000), **kw) is None
    msg = refusal(plan, _machine(40), **kw)             # builds in 40 GiB, cannot validate there
    assert msg.startswith("resource plan: this build needs") and "--no-validate" in msg and "\n" not in msg
    msg = refusal(plan_build(CFG, precision="fp8", recipe=recipe_for("fp8"), validate=False), _machine(16, gpu_gib=80), **kw)
    assert "--calib-device cuda" in msg
    msg = refusal(plan_build(CFG, precision="fp8", recipe=recipe_for("fp8"), validate=False), _machine(16), **kw)
    assert "a machine with at least 26.6 GiB of free RAM" in msg and "--calib-device" not in msg
    gpu = plan_build(CFG, precision="fp8", recipe=recipe_for("fp8"), calib_device="cuda", validate=False)
    assert "--calib-device cpu" in refusal(gpu, _machine(1000, gpu_gib=16), **kw)
    assert "--output" in refusal(plan_build(CFG, precision="fp8", recipe=recipe_for("fp8"), validate=False,
                                            output=OUT), _machine(1000, disk_gib=5), **kw)
    # a validation that fits once the KV caches are smaller: the largest --max-context that would
    small = PRESETS["tiny"]
    plan = plan_build(small, precision="fp32", batch_sizes=(64,), max_context=2048, validate=True)
    need_kv = plan.host_validate - plan.host_build
    m = Machine(plan.host_validate - need_kv // 2, plan.host_validate, {}, None, None, None)
    msg = refusal(plan, m, cfg=small, batch_sizes=(64,), max_context=2048)
    assert "a smaller --max-context (at most" in msg


def test_probe_reads_this_machine(tmp_path):
    m = probe(tmp_path / "out", str(tmp_path))
    assert 0 < m.ram_available <= m.ram_total and m.disk_free[str(tmp_path)] > 0
    assert "RAM" in m.describe()
