"""GPU checks of the fast engine (skipped without CUDA; scripts/gpu_check.py runs them on a GPU box):
CUDA-graph replay equals eager per pass, and the fast engine equals the reference token for token."""

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from nemodiff_compile import load_reference  # noqa: E402
from nemodiff_compile.backends.fast import FastDenoiser  # noqa: E402
from nemodiff_compile.backends.eager import TorchDenoiser  # noqa: E402
from nemodiff_compile.decoding import loops  # noqa: E402

PROMPTS = [[1, 40, 41, 42, 43, 44, 45], [1, 50, 51], [1, 60, 61, 62, 63, 64, 65, 66, 67, 68]]
MAX_LEN = 128


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def model(request):
    torch.backends.cuda.matmul.allow_tf32 = False
    return load_reference("tiny", dtype=request.param, device="cuda")


def test_graph_replay_equals_eager_per_pass(model):
    dens = [FastDenoiser(model, MAX_LEN, graphs=g) for g in (True, False)]
    traces = [loops.generate(d, PROMPTS, "dlm", max_new_tokens=48, trace=True).trace for d in dens]
    assert dens[0].graphs.captures > 0 and dens[1].graphs.captures == 0
    assert len(traces[0]) == len(traces[1])
    for a, b in zip(*traces):
        assert torch.equal(a.out_token, b.out_token)
        assert torch.equal(a.conf, b.conf)


@pytest.mark.parametrize("kw", [dict(threshold=0.9), dict(threshold=None, steps=4)])
def test_device_loop_equals_reference(model, kw):
    ref = loops.diffusion_generate(TorchDenoiser(model, MAX_LEN), PROMPTS, max_new_tokens=48, **kw)
    den = FastDenoiser(model, MAX_LEN)
    got = loops.diffusion_generate(den, PROMPTS, max_new_tokens=48, **kw)         # the device refiner
    assert got.tokens == ref.tokens
    assert got.nfe_by_phase == ref.nfe_by_phase and got.row_nfe == ref.row_nfe
    assert den.graphs.captures >= 2


@pytest.mark.parametrize("mode", ["ar", "linear-spec"])
def test_other_modes_equal_reference(model, mode):
    ref = loops.generate(TorchDenoiser(model, MAX_LEN), PROMPTS, mode, max_new_tokens=32)
    got = loops.generate(FastDenoiser(model, MAX_LEN), PROMPTS, mode, max_new_tokens=32)
    assert got.tokens == ref.tokens


@pytest.mark.parametrize("mode", ["row", "tensor", "static"])
def test_fp8_tracks_bf16(mode):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 matmuls need sm_89 or newer")
    model = load_reference("tiny", dtype="bfloat16", device="cuda")
    ref = loops.diffusion_generate(TorchDenoiser(model, MAX_LEN), PROMPTS, max_new_tokens=48, threshold=0.9)
    den = FastDenoiser(model, MAX_LEN, fp8=mode)
    if mode == "static":
        den.calibrate([[1, 30, 31, 32, 33], [1, 70, 71, 72]], max_new_tokens=32)
    got = loops.diffusion_generate(den, PROMPTS, max_new_tokens=48, threshold=0.9)
    agree = sum(a == b for r, g in zip(ref.tokens, got.tokens) for a, b in zip(r, g))
    total = sum(len(r) for r in ref.tokens)
    print(f"fp8 ({mode}) vs bf16 reference: position-wise token agreement {agree}/{total}")
    assert agree / total > 0.5


@pytest.mark.parametrize("kw", [dict(threshold=0.5), dict(threshold=None, steps=4)])
def test_sampled_device_loop_equals_host_loop(model, kw):
    """Temperature > 0 on the captured device loop: noise drawn on the GPU (decoding/noise.py) gives the host
    loop's tokens (noise drawn on the CPU) for the same seed; the eager reference too."""
    kw = dict(max_new_tokens=48, temperature=1.0, seed=5, **kw)
    den = FastDenoiser(model, MAX_LEN)
    device = loops.diffusion_generate(den, PROMPTS, **kw)
    assert device.device_passes >= device.nfe_by_phase["denoise"] > 0
    assert any(k[0] == "denoise" and k[-1] == 1.0 for k in den.graphs.graphs)
    host = loops.diffusion_generate(den, PROMPTS, device_refine=False, **kw)
    ref = loops.diffusion_generate(TorchDenoiser(model, MAX_LEN), PROMPTS, **kw)
    assert device.tokens == host.tokens == ref.tokens
    assert device.nfe_by_phase == host.nfe_by_phase and device.row_nfe == host.row_nfe


@pytest.mark.parametrize("fp8", [None, "row"])
def test_gemv_kernel_in_the_engine(model, fp8):
    """The split-K small-M projections (kernels/gemv.py) under graph replay: the same dlm tokens as the
    engine without them up to near-ties (each product within one ulp of the output dtype; a broken kernel
    agrees on almost nothing)."""
    if fp8 and (model.dtype != torch.bfloat16 or torch.cuda.get_device_capability() < (8, 9)):
        pytest.skip("FP8 GEMV: bf16 model on sm_89+")
    kw = dict(max_new_tokens=48, threshold=0.9)
    off = loops.diffusion_generate(FastDenoiser(model, MAX_LEN, fp8=fp8), PROMPTS, **kw)
    den = FastDenoiser(model, MAX_LEN, fp8=fp8, gemv=True)
    on = loops.diffusion_generate(den, PROMPTS, **kw)
    assert den.graphs.captures >= 2
    agree = sum(a == b for x, y in zip(on.tokens, off.tokens) for a, b in zip(x, y)) / sum(map(len, off.tokens))
    assert agree >= 0.9, agree
