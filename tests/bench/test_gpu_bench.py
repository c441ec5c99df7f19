"""bench-gpu's arithmetic and plumbing on the CPU (the same functions time CUDA graphs on a GPU)."""

import pytest
import torch

from nemodiff_compile.bench import gpu


def test_peak_bandwidth_names():
    assert gpu.peak_bandwidth("NVIDIA H200") == 4.8e12
    assert gpu.peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert gpu.peak_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert gpu.peak_bandwidth("Some Future GPU") is None


def test_flops_and_which_floor_binds():
    from nemodiff_compile.config import PRESETS

    cfg = PRESETS["8b"]
    params = cfg.num_parameters() - cfg.vocab_size * cfg.hidden_size         # the embedding is a lookup
    f1 = gpu.pass_flops(cfg, params, 1, 32, 512)
    assert f1 == pytest.approx(2 * params * 32, rel=0.05)                      # attention is small here
    mem = 16e9 / gpu.peak_bandwidth("NVIDIA H200")
    assert f1 / gpu.peak_flops("NVIDIA H200", fp8=False) < mem                 # batch 1: memory-bound
    assert gpu.pass_flops(cfg, params, 8, 64, 512) / gpu.peak_flops("NVIDIA H200", fp8=False) > mem
    assert gpu.peak_flops("NVIDIA A100-SXM4-80GB", fp8=True) is None


def test_pass_bytes_counts_weights_and_visible_kv(tiny_cfg):
    kv_row = tiny_cfg.num_hidden_layers * 2 * tiny_cfg.num_key_value_heads * tiny_cfg.head_dim * 2
    assert gpu.pass_bytes(1000, tiny_cfg, 4, 16, 100, 2) == 1000 + 4 * kv_row * 116


def test_passes_and_modes_on_cpu(random_tiny):
    lines = []
    passes = gpu.bench_passes(random_tiny, precisions=("bf16", "fp8", "fp8-static"), batches=(1, 2), blocks=(8,),
                              context=16, iters=3, device_name="NVIDIA H200", log=lines.append)
    assert [(p.precision, p.batch) for p in passes] == [
        (v, b) for v in ("bf16", "fp8", "fp8-static") for b in (1, 2)]
    assert all(p.engine_ms > 0 and p.reference_ms > 0 for p in passes)
    assert passes[2].engine_bytes < passes[0].engine_bytes            # fp8 weights: fewer bytes
    js = passes[0].to_json()
    assert js["bound_fraction"] == pytest.approx(js["bound_ms"] / js["engine_ms"], abs=1e-4)
    assert js["bound_ms"] == max(js["memory_bound_ms"], js["compute_bound_ms"])
    assert passes[2].compute_ms == pytest.approx(passes[0].compute_ms / 2)     # fp8 tensor cores: 2x
    rows = gpu.bench_modes(random_tiny, batches=(1, 2), block=8, context=8, max_new_tokens=16, log=lines.append)
    assert {(r["mode"], r["backend"], r["batch"]) for r in rows} == {
        (m, b, n) for m in ("dlm", "ar") for b in ("engine", "reference") for n in (1, 2)}
    assert all(r["same_tokens_as_reference"] for r in rows if r["backend"] == "engine")
    report = dict(device="cpu", source="tiny", context=16, random_weights=False,
                  passes=[p.to_json() for p in passes], modes=rows)
    table = gpu.report_table(report)
    assert "fp8" in table and "tok/s" in table


def test_bench_gpu_cli_needs_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from click.testing import CliRunner

    from nemodiff_compile.cli import cli

    res = CliRunner().invoke(cli, ["bench-gpu", "--size", "tiny"])
    assert res.exit_code == 2 and "needs a CUDA GPU" in res.output


def test_pairs_sampled_and_gemv_variants_on_cpu(random_tiny):
    """Only the asked (batch, block) pairs are timed; the -gemv and -sampled variants run (on the CPU the
    GEMV kernel falls back to torch; the sampled pass draws its noise in the captured body)."""
    passes = gpu.bench_passes(random_tiny, precisions=("bf16", "bf16-gemv", "bf16-sampled"), batches=(), blocks=(),
                              pairs=((1, 8), (2, 4)), context=16, iters=3, device_name="NVIDIA H200", log=lambda m: 0)
    assert [(p.precision, p.batch, p.block) for p in passes] == [
        (v, b, l) for v in ("bf16", "bf16-gemv", "bf16-sampled") for b, l in ((1, 8), (2, 4))]
    js = passes[0].to_json()
    assert js["memory_fraction"] == pytest.approx(js["memory_bound_ms"] / js["engine_ms"], abs=1e-4)
    assert js["compute_fraction"] == pytest.approx(js["compute_bound_ms"] / js["engine_ms"], abs=1e-4)
    assert gpu.grid((1, 8), (32, 64)) == [(1, 32), (1, 64), (8, 32), (8, 64)]
    assert gpu.grid((1,), (2,), pairs=[[8, 64]]) == [(8, 64)]


def _row(precision, batch, block, ms, mem, comp):
    return dict(precision=precision, batch=batch, block=block, engine_ms=ms, memory_fraction=mem,
                compute_fraction=comp)


def test_pass_targets_arithmetic():
    rows = [_row("bf16", 1, 32, 5.4, 0.62, 0.01), _row("bf16-gemv", 1, 32, 4.7, 0.71, 0.01),
            _row("fp8", 1, 32, 3.0, 0.5, 0.01), _row("fp8-gemv", 1, 32, 2.5, 0.6, 0.01),
            _row("bf16", 8, 64, 15.7, 0.2, 0.53), _row("bf16-gemv", 8, 64, 15.9, 0.2, 0.52),
            _row("bf16-sampled", 1, 32, 1.0, 0.99, 0.9)]                     # never counted as bf16
    t = {x["check"].split(":")[0].split(" pass")[0]: x for x in gpu.pass_targets(rows)}
    mem = t["bf16 batch 1 block 32"]
    assert (mem["variant"], mem["value"], mem["met"]) == ("bf16-gemv", 0.71, True)
    ratio = t["fp8 / bf16"]
    assert ratio["variant"] == "fp8-gemv / bf16-gemv" and ratio["value"] == round(2.5 / 4.7, 4) and ratio["met"]
    comp = t["bf16 batch 8 block 64"]
    assert (comp["variant"], comp["value"], comp["met"]) == ("bf16", 0.53, False)
    missing = gpu.pass_targets([_row("bf16", 1, 32, 5.0, 0.66, 0.0)])
    assert [x["met"] for x in missing] == [False, None]                   # no batch-8 row: not judged
