"""TensorRT builds through tensorrt_rtx on CPU (ahead of time): per-GPU plans in one engine directory,
the precision check, Q/DQ graphs, the plugin variant's limits on tensorrt_rtx."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nemodiff_compile.artifact.manifest import read_manifest
from nemodiff_compile.trt.precision import PrecisionError
from nemodiff_compile.errors import InvalidArgument

pytestmark = pytest.mark.slow


def test_fp32_engine_directory(trt_fp32_dir):
    m = read_manifest(trt_fp32_dir, deep=True)
    assert m.backend == "tensorrt" and m.precision == "fp32" and m.requires == {}
    (e,) = m.engines
    assert e["target"] == "sm89" and e["trt_module"] == "tensorrt_rtx"
    assert e["file"] in m.artifacts and (trt_fp32_dir / e["file"]).stat().st_size == e["bytes"] > 1_000_000
    pc = e["precision_check"]
    assert pc["passed"] and pc["source"] == "network" and pc["gemms"] == pc["in_precision"] > 0
    assert [p["batch"] for p in e["profiles"]] == [1, 2]
    assert e["plugins"] == [] and e["gpu_name"] is None          # built ahead of time, no GPU here
    assert m.io_spec["extra"]["remask"]["variant"] == "onnx"
    assert "tensorrt_rtx" in m.tool_versions


def test_fp16_engine_directory(trt_fp16_dir):
    m = read_manifest(trt_fp16_dir)
    (e,) = m.engines
    assert e["precision_check"]["passed"] and m.io_spec["extra"]["remask"]["policy"] == "topk"
    assert m.io_spec["inputs"][6]["dtype"] == "float16"


def test_gpus_adds_targets_keeping_the_others(trt_fp16_dir, tmp_path):
    import shutil

    from nemodiff_compile.build_config import BuildConfig
    from nemodiff_compile.pipeline import build_engine

    d = tmp_path / "multi"
    shutil.copytree(trt_fp16_dir, d)
    onnx_before = (d / "model.onnx").stat().st_mtime_ns
    build_engine(BuildConfig.of(source="tiny", output=d, backend="tensorrt", precision="fp16", gpus=("sm86",),
                                validate=False, remask="onnx", remask_threshold=None, batch_sizes=(1, 2),
                                max_context=128))
    m = read_manifest(d, deep=True)
    assert sorted(e["target"] for e in m.engines) == ["sm86", "sm89"]
    assert (d / "model.onnx").stat().st_mtime_ns == onnx_before          # the graph was reused, not re-exported
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_changed_configuration_rebuilds_instead_of_reusing(trt_fp16_dir, tmp_path):
    """The reuse case of issue 11: new shapes on an existing TensorRT directory with --gpus rebuild the
    whole directory with them (and say so), instead of adding a target to the old buckets."""
    import shutil

    from click.testing import CliRunner

    from nemodiff_compile.cli import cli

    d = tmp_path / "t"
    shutil.copytree(trt_fp16_dir, d)
    onnx_before = (d / "model.onnx").stat().st_mtime_ns
    r = CliRunner().invoke(cli, ["build", "--backend", "tensorrt", "--precision", "fp16", "--remask", "onnx",
                                 "--remask-threshold", "topk", "--gpus", "sm86", "--batch-sizes", "1,4",
                                 "--max-context", "64", "--output", str(d)])
    assert r.exit_code == 0, r.output
    assert (f"[build] rebuilding {d} with the new configuration (shapes.batch_sizes [1, 2] -> [1, 4]; "
            "shapes.max_context 128 -> 64); its other targets (sm89) are dropped") in r.output
    m = read_manifest(d, deep=True)
    assert [e["target"] for e in m.engines] == ["sm86"]                 # the sm89 plan had the old shapes
    assert m.buckets["batch_sizes"] == [1, 4] and m.buckets["max_context"] == 64
    assert [p["batch"] for p in m.engines[0]["profiles"]] == [1, 4]
    assert m.build_config["shapes"]["batch_sizes"] == [1, 4] and m.build_config["tensorrt"]["gpus"] == ["sm86"]
    assert (d / "model.onnx").stat().st_mtime_ns != onnx_before          # re-exported


def test_auto_adds_a_target_where_tensorrt_and_a_gpu_are_present(trt_fp16_dir, tmp_path, monkeypatch):
    """--backend auto with the datacenter module and a GPU (detection faked) is tensorrt: it compares as
    tensorrt, so the same configuration plus a target reuses the graph; the manifest says why."""
    import shutil

    from nemodiff_compile import pipeline
    from nemodiff_compile.artifact.targets import DeviceInfo
    from nemodiff_compile.build_config import BuildConfig

    monkeypatch.setattr(pipeline, "_datacenter_tensorrt", lambda: ("10.13.0", ""))
    monkeypatch.setattr(pipeline, "_cuda_device", lambda: DeviceInfo("NVIDIA L40S", (8, 9)))
    d = tmp_path / "t"
    shutil.copytree(trt_fp16_dir, d)
    onnx_before = (d / "model.onnx").stat().st_mtime_ns
    said = []
    pipeline.build_engine(BuildConfig.of(source="tiny", output=d, backend="auto", precision="fp16", gpus="sm86",
                                         validate=False, remask="onnx", remask_threshold="topk",
                                         batch_sizes=(1, 2), max_context=128), progress=said.append)
    assert f"adding sm86 to {d} (same configuration: its graph is reused)" in said
    m = read_manifest(d, deep=True)
    assert (d / "model.onnx").stat().st_mtime_ns == onnx_before
    assert m.backend_choice == {"asked": "auto", "chosen": "tensorrt",
                                "reason": "tensorrt 10.13.0 and a CUDA GPU (NVIDIA L40S, sm89) are present"}
    assert m.build_config["backend"] == "auto" and m.build_config["tensorrt"]["gpus"] == ["sm89", "sm86"]


def test_mislabeled_graph_fails_the_precision_check(trt_fp32_dir):
    from nemodiff_compile.trt.builder import build_plan

    m = read_manifest(trt_fp32_dir)
    with pytest.raises(PrecisionError, match=r"--precision fp16 requested but \d+ of \d+ matrix multiplies"):
        build_plan(trt_fp32_dir / "model.onnx", io_spec=m.io_spec, buckets=m.buckets, precision="fp16",
                   target="sm89")
    with pytest.raises(PrecisionError, match="not quantized"):
        build_plan(trt_fp32_dir / "model.onnx", io_spec=m.io_spec, buckets=m.buckets, precision="fp8",
                   target="sm89")


def test_rtx_cannot_target_sm90(trt_fp32_dir):
    from nemodiff_compile.trt.builder import build_plan

    m = read_manifest(trt_fp32_dir)
    with pytest.raises(InvalidArgument, match="--gpus sm90: tensorrt_rtx .* cannot target it"):
        build_plan(trt_fp32_dir / "model.onnx", io_spec=m.io_spec, buckets=m.buckets, precision="fp32",
                   target="sm90")


def _qdp_graph(path, qtype, transposed=False):
    """x [batch, 64] f32 -> Q/DQ (qtype) -> MatMul with a qtype weight behind DQ -> y [batch, 32]."""
    import numpy as np
    import onnx
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    if qtype == "fp8":
        elem = T.FLOAT8E4M3FN
        w = helper.make_tensor("w_q", elem, [64, 32], rng.standard_normal(64 * 32).astype(np.float32).tolist())
    else:
        elem = T.INT8
        w = numpy_helper.from_array(rng.integers(-100, 100, (64, 32)).astype(np.int8), "w_q")
    zp = helper.make_tensor("zp", elem, [], [0])
    inits = [w, zp, numpy_helper.from_array(np.array(0.05, np.float32), "sx"),
             numpy_helper.from_array(np.array(0.01, np.float32), "sw")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zp"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zp"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w_q", "sw", "zp"], ["wd"]),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    if transposed:      # the exporter's layout: W [out, in] dequantized, then transposed (a Shuffle in TensorRT)
        w.dims[:] = [32, 64]
        nodes[2:] = [helper.make_node("DequantizeLinear", ["w_q", "sw", "zp"], ["wt"]),
                     helper.make_node("Transpose", ["wt"], ["wd"], perm=[1, 0]),
                     helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    g = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", T.FLOAT, ["batch", 64])],
                          [helper.make_tensor_value_info("y", T.FLOAT, ["batch", 32])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), str(path))
    spec = {"inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 64]}],
            "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 32]}]}
    return spec


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("qtype", ["fp8", "int8"])
def test_qdq_graphs_build_and_pass_the_check(rtx, tmp_path, qtype, transposed):
    from nemodiff_compile.trt.builder import build_plan

    spec = _qdp_graph(tmp_path / "q.onnx", qtype, transposed)
    buckets = {"batch_sizes": [1, 8], "max_context": 16, "block_length": 4}
    plan, info = build_plan(tmp_path / "q.onnx", io_spec=spec, buckets=buckets, precision=qtype, target="sm89",
                            options=_opts(tmp_path))
    assert len(plan) > 0 and info.precision_check["passed"] and info.precision_check["in_precision"] == 1
    with pytest.raises(PrecisionError):
        build_plan(tmp_path / "q.onnx", io_spec=spec, buckets=buckets, precision="fp16", target="sm89")


def _opts(tmp_path):
    from nemodiff_compile.trt.builder import BuildOptions

    return BuildOptions(workspace_bytes=256 << 20, tactic_bytes=256 << 20, timing_cache_dir=tmp_path / "tc")


def test_compatibility_options_on_rtx(rtx, tmp_path):
    from nemodiff_compile.trt.builder import BuildOptions, build_plan

    spec = _qdp_graph(tmp_path / "q.onnx", "fp8")
    buckets = {"batch_sizes": [1], "max_context": 8, "block_length": 4}
    plan, _ = build_plan(tmp_path / "q.onnx", io_spec=spec, buckets=buckets, precision="fp8", target="sm89",
                         options=BuildOptions(hardware_compatibility="AMPERE_PLUS", optimization_level=2))
    assert len(plan) > 0
    with pytest.raises(InvalidArgument, match="--version-compatible: tensorrt_rtx"):
        build_plan(tmp_path / "q.onnx", io_spec=spec, buckets=buckets, precision="fp8", target="sm89",
                   options=BuildOptions(version_compatible=True))
    with pytest.raises(InvalidArgument, match="--hardware-compatibility ANY"):
        build_plan(tmp_path / "q.onnx", io_spec=spec, buckets=buckets, precision="fp8", target="sm89",
                   options=BuildOptions(hardware_compatibility="ANY"))


def test_plugin_graph_is_refused_on_rtx_with_a_sentence(rtx, plugin_graph, tmp_path):
    from nemodiff_compile.trt.builder import TrtBuildError, build_plan

    path, spec = plugin_graph
    with pytest.raises(TrtBuildError, match=r"needs plugin layer\(s\) nemodiff::Remask/1.*--remask onnx"):
        build_plan(path, io_spec=spec.to_json(), buckets={"batch_sizes": [1], "max_context": 64,
                                                          "block_length": 16}, precision="fp32", target="sm89")


def test_rtx_parser_resolves_our_registered_creator(rtx, plugin_graph):
    """The parser finds nemodiff::Remask through the creator registered from Python. tensorrt_rtx then
    ends the process (no plugin layers in its networks), hence the subprocess."""
    path, _ = plugin_graph
    code = (
        "import tensorrt_rtx as trt\n"
        "from nemodiff_compile.backends import trt_shim\n"
        "from nemodiff_compile.kernels.registry import register_plugins, graph_plugin_ids\n"
        "t = trt_shim.load(('tensorrt_rtx',))\n"
        f"register_plugins(t, graph_plugin_ids({str(path)!r}))\n"
        "log = trt.Logger(trt.Logger.INFO)\n"
        "b = trt.Builder(log)\n"
        "net = b.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))\n"
        f"ok = trt.OnnxParser(net, log).parse_from_file({str(path)!r})\n"
        "print('PARSED', ok, flush=True)\n")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root, env=env)
    log = r.stdout + r.stderr
    assert "Searching for plugin: Remask, plugin_version: 1, plugin_namespace: nemodiff" in log
    assert "Successfully created plugin: Remask" in log
    if "PARSED True" not in log:        # tensorrt_rtx 1.7.1: std::terminate right after (measured)
        assert r.returncode != 0


def test_manifest_entry_is_json(trt_fp32_dir):
    raw = json.loads((trt_fp32_dir / "manifest.json").read_text())
    assert raw["engines"][0]["timing_cache"]["note"] == "no-op in TensorRT-RTX"


def test_pipeline_plugin_variant_on_rtx_fails_atomically(rtx, tmp_path):
    from nemodiff_compile.build_config import BuildConfig
    from nemodiff_compile.pipeline import build_engine
    from nemodiff_compile.trt.builder import TrtBuildError

    with pytest.raises(TrtBuildError, match="nemodiff::Remask/1"):
        build_engine(BuildConfig.of(source="tiny", output=tmp_path / "p", backend="tensorrt", gpus=("sm89",),
                                    remask="plugin", validate=False, batch_sizes=(1,), max_context=64))
    assert list(tmp_path.iterdir()) == []


def test_inspect_lists_the_engines(trt_fp32_dir):
    from click.testing import CliRunner

    from nemodiff_compile.cli import cli

    r = CliRunner().invoke(cli, ["inspect", str(trt_fp32_dir)])
    assert r.exit_code == 0, r.output
    assert "engine      sm89   engine.sm89.tensorrt_rtx-1.7.1.plan" in r.output and "passed (network)" in r.output
