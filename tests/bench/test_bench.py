"""bench(): interleaved timing of denoisers on the same loop, on the tiny model."""

import copy
import json

import pytest
import torch

from nemodiff_compile.bench import bench
from nemodiff_compile.bench.run import _quantile
from nemodiff_compile.decoding import loops
from nemodiff_compile.errors import InvalidArgument
from nemodiff_compile.backends.eager import TorchDenoiser

PROMPTS = [[1, 40, 41, 42, 43, 44, 45], [1, 50, 51]]


def test_engine_vs_reference_reports_speedup(random_tiny):
    bf16 = copy.deepcopy(random_tiny).to(torch.bfloat16)
    dens = {"engine": TorchDenoiser(bf16, 64), "reference": TorchDenoiser(random_tiny, 64)}
    rep = bench(dens, PROMPTS, mode="dlm", max_new_tokens=16, block_length=8, warmup=1, repeats=2)
    js = json.loads(json.dumps(rep.to_json()))
    assert js["engine_tokens_per_s"] > 0 and js["reference_tokens_per_s"] > 0
    assert js["speedup"] == pytest.approx(js["engine_tokens_per_s"] / js["reference_tokens_per_s"])
    for name, d in js["denoisers"].items():
        assert d["tokens"] > 0 and d["tokens_per_forward"] > 0 and d["peak_rss_delta_mb"] >= 0
        lat = d["pass_ms"]
        assert lat["all"]["mean"] > 0 and lat["all"]["p50"] <= lat["all"]["p90"]
        assert lat["all"]["n"] == 2 * d["nfe"]                                  # every pass of every repeat
        assert {ph: v["n"] for ph, v in lat.items() if ph != "all"} == {ph: 2 * n for ph, n in d["nfe_by_phase"].items()}
    want = [loops.generate(d, PROMPTS, "dlm", max_new_tokens=16, block_length=8).tokens for d in dens.values()]
    assert js["denoisers"]["engine"]["same_tokens_as_reference"] is (want[0] == want[1])
    table = rep.to_table()
    assert "speedup" in table and "engine" in table and "reference" in table


def test_same_tokens_as_reference_is_true_and_false_when_it_should_be(random_tiny):
    """The same model under both names agrees; a model with a perturbed head does not."""
    other = copy.deepcopy(random_tiny)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    for engine, same in ((random_tiny, True), (other, False)):
        dens = {"engine": TorchDenoiser(engine, 64), "reference": TorchDenoiser(random_tiny, 64)}
        rep = bench(dens, PROMPTS[:1], mode="ar", max_new_tokens=8, warmup=0, repeats=1)
        assert rep.to_json()["denoisers"]["engine"]["same_tokens_as_reference"] is same


@pytest.mark.parametrize("mode", ["ar", "linear-spec"])
def test_other_modes_and_a_single_denoiser(random_tiny, mode):
    rep = bench({"engine": TorchDenoiser(random_tiny, 64)}, PROMPTS[:1], mode=mode, max_new_tokens=8,
                block_length=8, warmup=0, repeats=1)
    js = rep.to_json()
    assert js["engine_tokens_per_s"] > 0 and "speedup" not in js and "reference_tokens_per_s" not in js
    phases = set(js["denoisers"]["engine"]["pass_ms"]) - {"all"}
    assert phases == ({"prefill", "decode"} if mode == "ar" else {"prefill", "draft", "verify"})


def test_arguments_and_quantiles(random_tiny):
    with pytest.raises(InvalidArgument):
        bench({}, PROMPTS)
    with pytest.raises(InvalidArgument):
        bench({"engine": TorchDenoiser(random_tiny, 64)}, PROMPTS, repeats=0)
    assert _quantile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5 and _quantile([5.0], 0.9) == 5.0
    assert _quantile([0.0, 10.0], 0.9) == pytest.approx(9.0)


def test_bench_three_remask_variants_side_by_side(tiny_engine, remask_engine):
    """`bench` on the host remask (no stage), the standard-ops stage and the plugin stage in one run: the
    stage engines refine their dlm blocks on the device, every variant reports its refinement ms per pass,
    and all three write the reference's tokens (fp32)."""
    from click.testing import CliRunner

    from nemodiff_compile.cli import cli

    dirs = [tiny_engine, remask_engine("onnx"), remask_engine("plugin")]
    r = CliRunner().invoke(cli, ["bench", *map(str, dirs), "--max-new-tokens", "16", "--repeats", "1",
                                 "--batch", "1", "--threads", "1", "--json"])
    assert r.exit_code == 0, r.output
    js = json.loads(r.output)
    assert list(js["denoisers"]) == [d.name for d in dirs] + ["reference"]
    loops_ = {k: d["device_loop"] for k, d in js["denoisers"].items()}
    assert loops_ == {dirs[0].name: False, dirs[1].name: True, dirs[2].name: True, "reference": False}
    for name in (d.name for d in dirs):
        d = js["denoisers"][name]
        assert d["same_tokens_as_reference"] and d["refine_ms_per_pass"] > 0 and d["speedup"] > 0
        assert d["pass_ms"]["denoise"]["n"] == (d["device_passes"] if d["device_loop"] else d["nfe_by_phase"]["denoise"])
    r = CliRunner().invoke(cli, ["bench", *map(str, dirs[:2]), "--sweep", "threshold=0.5,0.9"])
    assert r.exit_code == 2 and "--sweep takes one ENGINE_DIR" in r.output


def test_compare_passes_script_times_both_engines(tiny_engine, tmp_path):
    """scripts/compare_passes.py: one JSON line with a positive median per engine and batch, and their ratio
    (the same engine twice: the ratio is a ratio of two timings of one graph, so it is near 1), and a one-line
    error for a missing folder and for a folder that holds no engine."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    script = [sys.executable, str(root / "scripts/compare_passes.py")]
    r = subprocess.run(script + [str(tiny_engine), str(tiny_engine), "--reps", "2", "--passes", "2", "--batches", "1,2",
                                 "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    line = json.loads(r.stdout.splitlines()[-1])
    assert set(line["ms_per_pass_before"]) == set(line["ms_per_pass_after"]) == {"1", "2"}
    assert all(v > 0 for v in (*line["ms_per_pass_before"].values(), *line["ms_per_pass_after"].values()))
    assert all(0.2 < v < 5 for v in line["after_over_before"].values())
    for where, says in ((tmp_path / "missing", "expected an engine directory"), (tmp_path, str(tmp_path))):
        bad = subprocess.run(script + [str(where), str(tiny_engine)], capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and says in bad.stderr.strip().splitlines()[-1], bad.stderr[-1000:]
