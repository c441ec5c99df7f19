"""scripts/gpu_check.py on the CPU: its options, its plan, the projection shapes it times, and that without
a GPU it skips every section with the reason, writes its outputs and exits 2 (a real subprocess)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_defaults_and_plan(gc):
    a = gc.parse_args([])
    assert a.sections == gc.SECTIONS and a.sizes == ("3b", "8b", "14b")
    assert a.pairs == ((1, 32), (8, 64))
    assert {"bf16", "bf16-gemv", "fp8", "fp8-gemv", "bf16-sampled"} == set(a.precisions)
    lines = gc.plan(gc.parse_args(["--sections", "bench,gemv", "--sizes", "8b", "--pairs", "2x16"]))
    assert len(lines) == 2 and lines[0].startswith("bench: 8b x bf16") and "batch 2 x block 16" in lines[0]
    assert "generations at 8b" in lines[0] and lines[1].startswith("gemv:")


@pytest.mark.parametrize("argv,flag", [(["--sections", "bench,nope"], "--sections"), (["--sizes", "7b"], "--sizes"),
                                       (["--pairs", "1x"], "--pairs"), (["--pairs", "0x32"], "--pairs"),
                                       (["--precisions", "int4"], "--precisions"), (["--iters", "1"], "--iters")])
def test_bad_options_are_one_line(gc, argv, flag, capsys):
    assert gc.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {flag} ")


def test_projection_shapes(gc):
    from nemodiff_compile.config import PRESETS

    s = gc.projection_shapes(PRESETS["8b"])
    assert s == {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the script would run")
def test_without_a_gpu_every_section_is_skipped_with_the_reason(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "o"), "--sections", "tests,bench"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == ("error: no CUDA GPU (torch.cuda.is_available() is False): "
                                                    "every GPU check skipped; nothing measured")
    assert "# bench: skipped (no CUDA GPU" in proc.stdout
    rows = [json.loads(ln) for ln in (tmp_path / "o" / "gpu_check.jsonl").read_text().splitlines()]
    assert [(r["section"], "no CUDA GPU" in r["skipped"]) for r in rows] == [("tests", True), ("bench", True)]
    assert not (tmp_path / "o" / "gpu_check.jsonl.partial").exists()
    assert "# tests: skipped" in (tmp_path / "o" / "gpu_check.log").read_text()
    assert json.loads((tmp_path / "o" / "gpu_report.json").read_text())["cuda"] is False


def test_gemv_section_rows_on_cpu(gc, tmp_path):
    """The GEMV section's loop and rows, on the CPU with small shapes (there the kernel falls back to torch)."""
    o = gc.Output(tmp_path)
    rows = gc.gemv_section(o, ("3b",), device="cpu", shapes=lambda cfg: {"o": (48, 64)}, sweep=False)
    assert [(r["M"], r["weights"]) for r in rows] == [(m, w) for m in (1, 16, 32, 64) for w in ("bf16", "row")]
    assert all(r["within_1ulp_of_definition"] and r["gemv_us"] > 0 and r["N"] == 48 for r in rows)
    o.close({})
    assert len((tmp_path / "gpu_check.jsonl").read_text().splitlines()) == len(rows)


def test_bench_section_targets_on_cpu(gc, tmp_path, monkeypatch, random_tiny):
    """bench_section's glue: rows per pass, the targets judged at the --pairs points, budget skips."""
    from nemodiff_compile.bench import gpu

    def fake_report(size, *, precisions, batches, blocks, pairs, context, iters, modes, log):
        passes = gpu.bench_passes(random_tiny, precisions=precisions, batches=batches, blocks=blocks, pairs=pairs,
                                  context=context, iters=iters, device_name="NVIDIA H200", log=log)
        return dict(device="cpu", source=size, context=context, random_weights=True,
                    passes=[p.to_json() for p in passes], modes=[])

    monkeypatch.setattr(gpu, "gpu_report", fake_report)
    args = gc.parse_args(["--sizes", "3b,8b", "--precisions", "bf16,fp8", "--pairs", "1x8,2x4", "--context", "16",
                          "--iters", "3", "--no-modes"])
    o = gc.Output(tmp_path)
    left = iter([100.0, 50.0])                               # 8b runs, then under 90 s are left
    out = gc.bench_section(o, args, lambda: next(left))
    o.close({})
    assert out["3b"]["skipped"].startswith("time budget")
    rows = [json.loads(ln) for ln in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    bench = [r for r in rows if r["section"] == "bench" and "precision" in r]
    assert [(r["size"], r["precision"], r["batch"], r["block"]) for r in bench] == [
        ("8b", p, b, l) for p in ("bf16", "fp8") for b, l in ((1, 8), (2, 4))]
    targets = [r for r in rows if r["section"] == "target"]
    assert [t["check"].split(":")[0] for t in targets] == ["bf16 batch 1 block 8", "fp8 / bf16 pass time at batch 1 block 8",
                                                          "bf16 batch 2 block 4"]
    assert all(t["met"] in (True, False) for t in targets)


def test_serve_section_on_cpu(gc, tmp_path):
    """The serve section's code on the CPU with the tiny model: the fast engine behind the scheduler at concurrency
    1 and 8, a row per level and the target judged on their ratio."""
    o = gc.Output(tmp_path)
    res = gc.serve_section(o, size="tiny", device="cpu", dtype="float32", prompt_len=8, max_new_tokens=8, block=4,
                           rounds=1, requests=lambda c: c)
    o.close({})
    rows = [json.loads(ln) for ln in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    levels = [r for r in rows if r["section"] == "serve"]
    assert [r["concurrency"] for r in levels] == [1, 8] and all(r["tokens"] > 0 for r in levels)
    assert levels[0]["rows_per_pass"] == 1.0 < levels[1]["rows_per_pass"]       # concurrent requests shared passes
    (target,) = [r for r in rows if r["section"] == "target"]
    assert target["value"] == res["ratio"] == round(levels[1]["tokens_per_s"] / levels[0]["tokens_per_s"], 2)
    assert target["met"] == (res["ratio"] >= gc.SERVE_TARGET) and target["target"] == 3.0
