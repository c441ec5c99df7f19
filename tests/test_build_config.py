"""BuildConfig: defaults and checks in one place, JSON and TOML, the CLI generated from it, the
manifest's build_config / backend_choice, and what --backend auto chooses."""

import json
import re

import pytest
from click.testing import CliRunner

from nemodiff_compile.build_config import (GROUPS, KV_CACHE_DTYPES, QUANTIZED, BuildConfig, Quantization, Remask,
                                           Shapes, TensorRT, leaves)
from nemodiff_compile.cli import cli
from nemodiff_compile.errors import InvalidArgument


def cli_run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_defaults():
    c = BuildConfig()
    assert (c.source, c.precision, c.backend, c.output, c.with_logits, c.validate) == \
        ("tiny", "fp32", "auto", None, False, True)
    assert c.shapes == Shapes((1, 4), 1024, None)
    assert c.quantization == Quantization(None, None, None, None, "auto")
    assert c.remask == Remask("none", 0.9)
    assert c.tensorrt == TensorRT(None, None, None, "NONE", False)


def test_tables_agree_with_the_recipes():
    from nemodiff_compile.quant import recipe as qr

    assert tuple(qr.RECIPES) == QUANTIZED and qr.KV_CACHE_DTYPES is KV_CACHE_DTYPES


def test_every_field_is_a_cli_option_in_its_group():
    keys = [leaf.key for leaf in leaves()]
    assert len(keys) == len(set(keys)) == 21
    r = cli_run("build", "--help")
    assert r.exit_code == 0
    sections = dict(re.findall(r"(?m)^(\S[^\n]*):\n((?:(?: .*)?\n)*)", r.output))
    assert list(sections)[1:7] == list(GROUPS) and "--config FILE.toml" in sections["Configuration"]
    for leaf in leaves():
        m = leaf.meta
        assert m["help"] and m["group"] in GROUPS
        for flag in m["flag"].split("/"):
            assert flag in sections[m["group"]], (flag, m["group"])
    # the defaults shown are the config's
    assert "[default: 1,4]" in sections["Shapes"] and "[default: 1024]" in sections["Shapes"]
    assert "[default: 0.9]" in sections["Remask stage"] and "[default: auto]" in sections["Output"]


@pytest.mark.parametrize("kw,message", [
    (dict(precision="fp7"), "--precision fp7: expected one of fp32, fp16, bf16, fp8, int8, int4-awq, nvfp4"),
    (dict(backend="trt"), "--backend trt: expected one of onnxruntime, tensorrt, auto"),
    (dict(batch_sizes="1,x"), "--batch-sizes 1,x: expected comma-separated positive integers"),
    (dict(batch_sizes=(0, 4)), "--batch-sizes 0,4: expected comma-separated positive integers"),
    (dict(max_context=1), "--max-context 1: expected an integer >= 2"),
    (dict(block_length="x"), "--block-length x: expected an integer >= 2"),
    (dict(precision="fp8", keep_first_layers=-1), "--keep-first-layers -1: expected an integer >= 0"),
    (dict(precision="fp8", kv_cache="int8"), "--kv-cache int8: expected one of model, fp8"),
    (dict(precision="fp8", calib_device="tpu"), "--calib-device tpu: expected one of auto, cpu, cuda"),
    (dict(remask="cuda"), "--remask cuda: expected one of none, onnx, plugin"),
    (dict(remask_threshold="x"), "--remask-threshold x: expected a number in [0, 1] or 'topk'"),
    (dict(remask_threshold=1.5), "--remask-threshold 1.5: expected a number in [0, 1] or 'topk'"),
    (dict(backend="tensorrt", gpus="h100"), "--gpus 'h100': expected a compute capability like sm90"),
    (dict(workspace_mb=0), "--workspace-mb 0: expected an integer >= 1"),
    (dict(hardware_compatibility="ANY"), "--hardware-compatibility ANY: expected one of NONE, AMPERE_PLUS"),
    (dict(with_logits="yes"), "--with-logits: expected true or false, got 'yes'"),
    (dict(validate=0), "validate (--no-validate): expected true or false, got 0"),
    (dict(calib="p.jsonl"), "--calib p.jsonl: calibration applies to fp8, int8 and int4-awq builds only"),
    (dict(calib_device="cpu"), "--calib-device cpu: calibration applies to fp8, int8 and int4-awq builds only"),
    (dict(keep_last_layers=1), "--keep-first-layers/--keep-last-layers apply to quantized builds, not fp32"),
    (dict(kv_cache="fp8"), "--kv-cache fp8: an fp8 KV cache is calibrated with the weights"),
    (dict(backend="onnxruntime", gpus="sm89"), "--gpus: only TensorRT engines are per GPU; add --backend tensorrt"),
    (dict(gpu="sm89"), "unknown build option 'gpu'"),
])
def test_bad_values_are_one_line_naming_the_flag(kw, message):
    with pytest.raises(InvalidArgument) as e:
        BuildConfig.of(**kw)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_auto_is_checked_once_chosen():
    c = BuildConfig.of(gpus="sm89", remask="plugin")          # auto may become tensorrt: fine until chosen
    assert c.for_backend("tensorrt").backend == "tensorrt"
    with pytest.raises(InvalidArgument, match="--gpus: only TensorRT engines are per GPU"):
        c.for_backend("onnxruntime")


def test_normalized_values_and_json_round_trip():
    c = BuildConfig.of(source="ckpt", precision="int8", calib="p.jsonl", keep_first_layers="1", kv_cache="fp8",
                       calib_device="cpu", batch_sizes=" 1, 8", max_context="4096", block_length=32,
                       remask="onnx", remask_threshold="topk", backend="tensorrt", gpus="sm_89,8.6,sm89",
                       workspace_mb=512, hardware_compatibility="AMPERE_PLUS", output="engines/x", validate=False)
    assert c.shapes.batch_sizes == (1, 8) and c.shapes.max_context == 4096 and c.quantization.keep_first_layers == 1
    assert c.tensorrt.gpus == ("sm89", "sm86") and c.remask.threshold is None
    d = json.loads(json.dumps(c.to_json()))
    assert d["remask"] == {"stage": "onnx", "threshold": "topk"} and d["tensorrt"]["gpus"] == ["sm89", "sm86"]
    assert BuildConfig.from_json(d) == c
    assert BuildConfig.from_json({}) == BuildConfig()
    assert BuildConfig.of(**c.flat()) == c
    with pytest.raises(InvalidArgument, match=r"^m: unknown key 'shapes.batch' \(expected one of batch_sizes"):
        BuildConfig.from_json({"shapes": {"batch": [1]}}, where="m")


def test_differences_name_what_changed():
    a = BuildConfig.of(backend="tensorrt", gpus="sm89", output="a")
    b = BuildConfig.of(backend="tensorrt", gpus="sm86", output="b", validate=False, batch_sizes="1,8")
    assert b.differences(a) == ["shapes.batch_sizes [1, 4] -> [1, 8]"]
    assert a.differences(a.with_targets(("sm80",))) == []


TOML = """
precision = "fp16"
backend = "onnxruntime"

[shapes]
batch_sizes = [1, 8]
max_context = 256

[remask]
stage = "onnx"
threshold = "topk"
"""


def test_toml_and_command_line_override_order(tmp_path):
    f = tmp_path / "build.toml"
    f.write_text(TOML)
    c = BuildConfig.from_toml(f)
    assert (c.precision, c.backend, c.shapes.batch_sizes, c.shapes.max_context) == ("fp16", "onnxruntime", (1, 8), 256)
    assert c.remask == Remask("onnx", None) and c.tensorrt == TensorRT()      # left out: the defaults
    # flags given on the command line win, even when they name the default; flags left out do not
    r = cli_run("build", "--config", f, "--max-context", "512", "--precision", "fp32", "--print-config")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["shapes"] == {"batch_sizes": [1, 8], "max_context": 512, "block_length": None}
    assert d["precision"] == "fp32" and d["backend"] == "onnxruntime" and d["remask"]["threshold"] == "topk"
    assert BuildConfig.from_json(d) == BuildConfig.from_toml(f, {"max_context": 512, "precision": "fp32"})
    r = cli_run("build", "--config", f, "--size", "tiny", "--no-validate", "--print-config")
    assert json.loads(r.output)["validate"] is False and json.loads(r.output)["source"] == "tiny"


@pytest.mark.parametrize("text,message", [
    ("[shapes]\nbatch = [1]\n", "{f}: unknown key 'shapes.batch' (expected one of batch_sizes, max_context, "
                                "block_length in shapes)"),
    ("gpus = ['sm89']\n", "{f}: unknown key 'gpus' (expected one of source, precision, quantization"),
    ("[shapes]\nmax_context = 1\n", "{f}: shapes.max_context = 1: --max-context 1: expected an integer >= 2"),
    ("[tensorrt]\ngpus = 'h100'\n", "{f}: tensorrt.gpus = 'h100': --gpus 'h100': expected a compute capability"),
    ("remask = 'onnx'\n", "{f}: remask: expected a table of keys, got str"),
    ("precision = 'fp32'\n[quantization]\ncalib = 'p.txt'\n",
     "{f}: --calib p.txt: calibration applies to fp8, int8 and int4-awq builds only"),
    ("[shapes\n", "--config {f}: not valid TOML"),
])
def test_toml_errors_name_the_file_and_key(tmp_path, text, message):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    r = cli_run("build", "--config", f, "--output", tmp_path / "e")
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert r.output.startswith("error: " + message.format(f=f)), r.output
    assert not (tmp_path / "e").exists()


def test_missing_config_file_and_bad_flags_are_one_line(tmp_path):
    for args, needle in [(("--config", tmp_path / "none.toml"), f"--config {tmp_path / 'none.toml'}: file not found"),
                         (("--batch-sizes", "1,x"), "--batch-sizes 1,x: expected comma-separated"),
                         (("--precision", "fp7"), "--precision fp7: expected one of")]:
        r = cli_run("build", *args, "--output", tmp_path / "e")
        assert r.exit_code == 2 and r.output.startswith("error: ") and needle in r.output, r.output
        assert r.output.count("\n") == 1


# ---- --backend auto ----


@pytest.fixture
def detect(monkeypatch):
    """Set what choose_backend sees: the tensorrt module's version (None: not importable) and the GPU."""
    from nemodiff_compile import pipeline
    from nemodiff_compile.artifact.targets import DeviceInfo

    def set_(version, gpu):
        monkeypatch.setattr(pipeline, "_datacenter_tensorrt",
                            lambda: (version, "") if version else (None, "no usable tensorrt module is installed"))
        monkeypatch.setattr(pipeline, "_cuda_device", lambda: DeviceInfo("NVIDIA H200", (9, 0)) if gpu else None)
    return set_


def test_auto_chooses_tensorrt_only_with_the_module_and_a_gpu(detect):
    from nemodiff_compile.pipeline import choose_backend

    detect("10.13.0", True)
    assert choose_backend("auto") == {"asked": "auto", "chosen": "tensorrt",
                                      "reason": "tensorrt 10.13.0 and a CUDA GPU (NVIDIA H200, sm90) are present"}
    detect("10.13.0", False)
    c = choose_backend("auto")
    assert c["chosen"] == "onnxruntime" and c["reason"] == "tensorrt 10.13.0 is installed but no CUDA GPU is visible"
    detect(None, True)
    assert choose_backend("auto")["chosen"] == "onnxruntime"
    assert choose_backend("onnxruntime") == {"asked": "onnxruntime", "chosen": "onnxruntime",
                                             "reason": "--backend onnxruntime was asked for"}
    assert choose_backend("tensorrt")["chosen"] == "tensorrt"


def test_tensorrt_rtx_does_not_count_for_auto():
    import importlib.util

    from nemodiff_compile.pipeline import _datacenter_tensorrt

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("the datacenter tensorrt module is installed here")
    version, why = _datacenter_tensorrt()
    assert version is None and why.startswith("no usable tensorrt module is installed")
    if importlib.util.find_spec("tensorrt_rtx") is not None:
        assert "tensorrt_rtx is, but it builds ahead of time only" in why


def test_auto_without_tensorrt_refuses_gpus_before_building(detect, tmp_path):
    detect(None, False)
    r = cli_run("build", "--gpus", "sm89", "--output", tmp_path / "e")
    assert r.exit_code == 2 and "--gpus: only TensorRT engines are per GPU" in r.output
    assert not (tmp_path / "e").exists()


# ---- the manifest ----


def test_manifest_holds_the_config_verbatim(tiny_engine):
    from nemodiff_compile.artifact.manifest import read_manifest

    m = read_manifest(tiny_engine)
    asked = BuildConfig.of(source="tiny", output=tiny_engine, backend="onnxruntime", with_logits=True,
                           validate=False)
    assert m.build_config == asked.to_json() and BuildConfig.from_json(m.build_config) == asked
    assert m.backend_choice == {"asked": "onnxruntime", "chosen": "onnxruntime",
                                "reason": "--backend onnxruntime was asked for"}
    assert m.buckets == {"batch_sizes": [1, 4], "max_context": 1024, "block_length": m.model_config["block_size"]}
    r = cli_run("inspect", tiny_engine)
    assert "backend     asked onnxruntime, chose onnxruntime: --backend onnxruntime was asked for" in r.output


def test_older_manifest_without_build_config_still_reads(tmp_path):
    from nemodiff_compile.artifact.manifest import MANIFEST_NAME, Manifest, _checksum, read_manifest

    d = Manifest(backend="onnxruntime", precision="fp32", source="x", model_config={}, weights_sha256="0",
                 io_spec={}, buckets={}, artifacts={}, tool_versions={}).to_json()
    for k in ("build_config", "backend_choice", "checksum"):
        d.pop(k)
    d["checksum"] = _checksum(d)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(d))
    m = read_manifest(tmp_path)
    assert m.build_config is None and m.backend_choice is None and m.precision == "fp32"


def test_a_recipe_needs_a_quantized_precision(tmp_path):
    from nemodiff_compile.pipeline import build_engine
    from nemodiff_compile.quant import recipe_for

    with pytest.raises(InvalidArgument, match="^recipe fp8: recipes apply to quantized precisions, not fp32$"):
        build_engine(BuildConfig.of(backend="onnxruntime", output=tmp_path / "e"), recipe=recipe_for("fp8"))
    assert not (tmp_path / "e").exists()


def test_what_a_rebuild_compares():
    """pipeline._changes: [] reuses the directory's graph; anything else rebuilds it (and is printed)."""
    from nemodiff_compile.artifact.manifest import Manifest
    from nemodiff_compile.pipeline import _changes

    old = BuildConfig.of(backend="auto", gpus="sm89", precision="fp16", output="a")
    m = Manifest(backend="tensorrt", precision="fp16", source="tiny", model_config={}, weights_sha256="0",
                 io_spec={}, buckets={}, artifacts={}, tool_versions={}, build_config=old.to_json())
    trt = {"asked": "tensorrt", "chosen": "tensorrt", "reason": ""}
    same = BuildConfig.of(backend="tensorrt", gpus="sm86", precision="fp16", output="b", validate=False)
    assert _changes(m, same, trt, None) == []                 # auto chose tensorrt there: the same build
    assert _changes(m, BuildConfig.of(backend="tensorrt", gpus="sm86", precision="fp16", workspace_mb=64),
                    trt, None) == ["tensorrt.workspace_mb unset -> 64"]
    m.build_config = None
    assert _changes(m, same, trt, None) == ["its manifest has no build_config (an older nemodiff-compile built it)"]
    m.build_config = {"shapes": {"batch_sizes": "x"}}
    assert _changes(m, same, trt, None)[0].startswith("its build_config is unreadable here (its manifest's "
                                                      "build_config: shapes.batch_sizes = 'x'")
