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
                                    "mask_id": 100, "eos_ids": [11], "io": 2}


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
                                                                 rtx.DataType.FLOAT, rtx.DataType.INT32]
    fc = p.get_fields_to_serialize()
    assert fc is p._field_collection                        # kept alive on the plugin (the binding points into it)
    assert not hasattr(creator, "_alive")                   # plugins are owned by the bindings, not kept forever


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


def test_no_bool_at_the_plugin_boundary(rtx, plugin_graph):
    """TensorRT documents kBOOL (and kUINT8) as unsupported for plugin I/O (PluginTensorDesc::type, 10.2-11.1;
    NVIDIA/TensorRT#3959: "could not find any supported formats"). Negotiate formats as a builder that never
    offers those types would: every tensor the exported node carries must find its type accepted by our
    Python plugin, and the C++ plugin must not name kBOOL [2]."""
    import onnx
    from onnx import TensorProto as T

    from nemodiff_compile.kernels.remask.trt_plugin import make_creator

    path, _ = plugin_graph
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.input,
                                                           *model.graph.output)}
    (node,) = [n for n in model.graph.node if n.op_type == "Remask"]
    to_trt = {T.FLOAT: rtx.DataType.FLOAT, T.INT64: rtx.DataType.INT64, T.INT32: rtx.DataType.INT32,
              T.BOOL: rtx.DataType.BOOL, T.FLOAT16: rtx.DataType.HALF}
    wanted = [to_trt[types[n]] for n in (*node.input, *node.output)]
    assert rtx.DataType.BOOL not in wanted                         # the graph casts around the node
    offered = [t for n, t in rtx.DataType.__members__.items() if n not in ("BOOL", "UINT8")]
    plugin = make_creator(rtx).create_plugin("remask", None, rtx.TensorRTPhase.BUILD)
    descs = [rtx.DynamicPluginTensorDesc() for _ in wanted]
    for d, t in zip(descs, wanted):
        d.desc.type, d.desc.format = t, rtx.TensorFormat.LINEAR
    for pos, want in enumerate(wanted):
        accepted = []
        for t in offered:
            descs[pos].desc.type = t
            if plugin.supports_format_combination(pos, descs, 5):
                accepted.append(t)
        descs[pos].desc.type = want
        assert want in accepted, (pos, want, accepted)
    assert plugin.get_output_data_types([w for w in wanted[:5]]) == wanted[5:]
    from pathlib import Path

    import nemodiff_compile

    cpp = Path(nemodiff_compile.__file__).parent / "kernels" / "csrc" / "remask" / "RemaskPlugin.cpp"
    assert "DataType::kBOOL" not in cpp.read_text()
