"""The command line end to end through click's test runner: build -> validate -> generate -> inspect -> bench."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from nemodiff_compile import TINY_ASSET
from nemodiff_compile.cli import cli

TRAINED = (TINY_ASSET / "config.json").is_file()


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_help_does_not_import_torch():
    code = "import sys; from nemodiff_compile.cli import cli; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    out = subprocess.run([sys.executable, "-m", "nemodiff_compile", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "build" in out.stdout and "validate" in out.stdout


@pytest.mark.skipif(not TRAINED, reason="the trained tiny checkpoint is not in this build of the package")
@pytest.mark.parametrize("mode", ["ar", "dlm", "linear-spec"])
def test_generate_reference_json(mode):
    r = run("generate", "--size", "tiny", "--mode", mode, "--max-new-tokens", "48", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    text = d["results"][0]["text"]
    assert isinstance(text, str) and len(text.split()) >= 3
    assert d["nfe"] == sum(d["nfe_by_phase"].values())
    if mode == "dlm":
        assert d["tokens_per_forward"] > 1.5, d


def test_bad_flags_are_one_line_exit_2(tmp_path):
    cases = [
        ("generate", "--size", "7b"),
        ("generate", "--checkpoint", tmp_path / "missing"),
        ("generate", "--prompt-ids", "1,x"),
        ("generate", "--steps", "3", "--threshold", "0.5"),
        ("info", "--checkpoint", tmp_path),
        ("inspect", tmp_path / "nowhere"),
        ("validate", tmp_path),
    ]
    for args in cases:
        r = CliRunner().invoke(cli, [str(a) for a in args])
        assert r.exit_code == 2, (args, r.output)
        assert r.output.startswith("error: ") and r.output.count("\n") == 1, (args, r.output)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    out = tmp_path_factory.mktemp("cli") / "tiny-fp32"
    r = run("build", "--output", out, "--with-logits", "--backend", "onnxruntime")
    assert r.exit_code == 0, r.output
    return out


def test_build_writes_a_validated_engine(engine):
    m = json.loads((engine / "manifest.json").read_text())
    assert m["validation"]["passed"] is True and m["validation"]["token_agreement"] == 1.0
    assert (engine / "model.onnx").is_file() and (engine / "model.onnx.data").is_file()
    if TRAINED:
        assert (engine / "tokenizer.json").is_file()


def test_validate_generate_inspect_bench(engine):
    r = run("validate", engine, "--json", "--max-new-tokens", "16")
    assert r.exit_code == 0, r.output
    v = json.loads(r.output)
    assert v["passed"] is True and v["token_agreement"] == 1.0
    r = run("generate", "--engine", engine, "--mode", "dlm", "--max-new-tokens", "32", "--json",
            *(["--prompt-ids", "1,5,6,7"] if not TRAINED else []))
    assert r.exit_code == 0, r.output
    ref = run("generate", "--size", "tiny", "--mode", "dlm", "--max-new-tokens", "32", "--json",
              *(["--prompt-ids", "1,5,6,7"] if not TRAINED else []))
    assert [x["tokens"] for x in json.loads(r.output)["results"]] == \
        [x["tokens"] for x in json.loads(ref.output)["results"]]
    r = run("inspect", engine)
    assert r.exit_code == 0 and "passed=True" in r.output
    r = run("bench", engine, "--json", "--max-new-tokens", "16", "--repeats", "1")
    assert r.exit_code == 0, r.output
    b = json.loads(r.output)
    assert b["engine_tokens_per_s"] > 0 and b["reference_tokens_per_s"] > 0 and b["speedup"] > 0


def test_validate_on_a_prompt_file(engine, tmp_path):
    """--prompts FILE replaces the built-in prompts (and the manifest says so); a bad file is one line."""
    f = tmp_path / "prompts.jsonl"
    f.write_text('{"ids": [1, 40, 41, 42]}\n{"ids": [1, 50, 51]}\n{"ids": [1, 60, 61, 62, 63]}\n')
    r = run("validate", engine, "--prompts", f, "--json", "--max-new-tokens", "8", "--mode", "dlm")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["settings"]["prompts"] == 3
    v = json.loads((engine / "manifest.json").read_text())["validation"]
    assert v["prompts"] == 3 and v["prompts_source"] == str(f)
    f.write_text('{"ids": [1, 99999999]}\n')
    for args, msg in [((f,), "outside the vocabulary"), ((tmp_path / "none.txt",), "file not found")]:
        r = CliRunner().invoke(cli, ["validate", str(engine), "--prompts", *map(str, args)])
        assert r.exit_code == 2 and r.output.startswith("error: --prompts ") and msg in r.output, r.output
        assert r.output.count("\n") == 1, r.output


def test_validate_fails_on_a_broken_engine(engine, tmp_path):
    """Same graph, wrong weights: validate must exit 1 and name the first divergence."""
    import shutil

    import torch

    from nemodiff_compile.artifact.manifest import file_digest, read_manifest, write_manifest

    broken = tmp_path / "broken"
    shutil.copytree(engine, broken)
    data = broken / "model.onnx.data"
    w = torch.frombuffer(bytearray(data.read_bytes()), dtype=torch.float32)
    w[: w.numel() // 2] *= 1.5                                       # scale half of the weights
    data.write_bytes(w.numpy().tobytes())
    m = read_manifest(broken)
    m.artifacts["model.onnx.data"] = file_digest(data)              # a consistent, but wrong, engine
    write_manifest(broken, m)
    r = run("validate", broken, "--json", "--max-new-tokens", "8", "--mode", "ar")
    assert r.exit_code == 1
    v = json.loads(r.output)
    assert v["passed"] is False and v["first_failure"] is not None
