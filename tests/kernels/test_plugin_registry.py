"""Plugin ids in a graph, our Python IPluginV3 creator, and `doctor`."""

import pytest
from click.testing import CliRunner

from nemodiff_compile.cli import cli
from nemodiff_compile.kernels.registry import PluginRef, graph_plugin_ids
from nemodiff_compile.kernels.remask.spec import REMASK


def test_graph_plugin_ids(plugin_graph):
    path, spec = plugin_graph
    assert graph_plugin_ids(path) == [PluginRef(REMASK.name, REMASK.namespace, REMASK.version)]
    assert spec.extra["remask"] == {"variant": "plugin", "policy": "threshold", "threshold": 0.9,
                                    "mask_id": 100}


def test_python_creator_round_trips_its_fields(rtx):
    import numpy as np

    from nemodiff_compile.kernels.remask.trt_plugin import make_creator

    creator = make_creator(rtx)
    assert (creator.name, creator.plugin_namespace, creator.plugin_version) == ("Remask", "nemodiff", "1")
    keep = [np.array([7], np.int32), np.frombuffer(b"topk\0", np.int8).copy(), np.array([0.25], np.float32)]
    fc = rtx.PluginFieldCollection([rtx.PluginField("mask_id", keep[0], rtx.PluginFieldType.INT32),
                                    rtx.PluginField("policy", keep[1], rtx.PluginFieldType.CHAR),
                                    rtx.PluginField("threshold", keep[2], rtx.PluginFieldType.FLOAT32)])
    p = creator.create_plugin("remask", fc, rtx.TensorRTPhase.BUILD)
    assert (p.mask_id, p.policy, p.threshold, p.temperature) == (7, "topk", 0.25, 0.0)
    q = creator.create_plugin("remask", p.get_fields_to_serialize(), rtx.TensorRTPhase.RUNTIME)
    assert (q.mask_id, q.policy, q.threshold) == (7, "topk", 0.25)
    assert p.get_output_data_types([rtx.DataType.HALF] * 5) == [rtx.DataType.INT64, rtx.DataType.INT64,
                                                                 rtx.DataType.FLOAT, rtx.DataType.BOOL]


def test_doctor_lists_needed_vs_registered(rtx, plugin_graph, trt_fp32_dir):
    path, _ = plugin_graph
    r = CliRunner().invoke(cli, ["doctor", str(path)])
    assert "needs nemodiff::Remask/1" in r.output and "nemodiff::Remask/1       registered" in r.output
    assert r.exit_code == 2 and "cannot build" in r.output          # tensorrt_rtx: no plugin layers
    r = CliRunner().invoke(cli, ["doctor", str(trt_fp32_dir)])
    assert r.exit_code == 0 and "needs no plugins" in r.output


def test_doctor_unknown_plugin(tmp_path):
    pytest.importorskip("onnx")
    import onnx
    from onnx import TensorProto as T
    from onnx import helper

    n = helper.make_node("Mystery", ["x"], ["y"], domain="acme")
    g = helper.make_graph([n], "g", [helper.make_tensor_value_info("x", T.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("acme", 1)]),
              str(tmp_path / "m.onnx"))
    r = CliRunner().invoke(cli, ["doctor", str(tmp_path / "m.onnx")])
    assert r.exit_code == 2 and "acme::Mystery/1" in r.output and "MISSING" in r.output


def test_plugin_ref_parse():
    assert PluginRef.parse("nemodiff::Remask/1") == PluginRef("Remask", "nemodiff", "1")
    assert PluginRef.parse("ROIAlign_TRT/2") == PluginRef("ROIAlign_TRT", "", "2")
    assert PluginRef.parse(PluginRef("A", "b::c", "3").qualified_version) == PluginRef("A", "b::c", "3")
