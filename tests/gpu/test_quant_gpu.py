"""Quantized builds calibrated on the GPU (`build --calib-device cuda`; skipped without CUDA or
ModelOpt; scripts/gpu_check.py runs the GPU tests): the graph equals the CPU-calibrated one."""

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
pytest.importorskip("modelopt", reason="needs nvidia-modelopt (pip install -e '.[quant]')")
onnx = pytest.importorskip("onnx")


def test_calibrating_on_the_gpu_writes_the_cpu_graph(tmp_path, quantized_linears):
    """fp8 (max calibration): the weight codes and scales depend on the weights only, so they are
    identical; the activation scales come from GPU arithmetic, so they agree to rounding."""
    from onnx import numpy_helper

    from nemodiff_compile.build_config import BuildConfig
    from nemodiff_compile.pipeline import build_engine
    from nemodiff_compile.quant import recipe_for

    torch.backends.cuda.matmul.allow_tf32 = False
    recipe = recipe_for("fp8").with_(calib_modes=("dlm",), calib_max_new_tokens=8)
    inits = {}
    for device in ("cpu", "cuda"):
        out = build_engine(BuildConfig.of(source="tiny", output=tmp_path / device, backend="onnxruntime",
                                          precision="fp8", validate=False, calib_device=device), recipe=recipe)
        m = onnx.load(str(out / "model.onnx"))
        inits[device] = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    cpu, gpu = inits["cpu"], inits["cuda"]
    assert cpu.keys() == gpu.keys()
    act = [n for n in cpu if n.endswith(".act_scale")]
    assert len(act) == quantized_linears("fp8")
    for name in cpu:
        if name in act:
            assert abs(float(gpu[name]) / float(cpu[name]) - 1) < 1e-2, name
        else:
            assert cpu[name].dtype == gpu[name].dtype and (cpu[name] == gpu[name]).all(), name
