#!/usr/bin/env python
"""Can TensorRT take per-token dynamic activation scales from a standard ONNX graph?

Builds one small graph per (scale kind, format) and asks TensorRT (the `tensorrt` module where it
imports, else `tensorrt_rtx`, which builds ahead of time on a CPU machine) to parse and build it:

    x [16, 64] -> QuantizeLinear(x, s, zero point) -> DequantizeLinear -> MatMul(DQ(W codes), per channel)
    static     s: a constant scalar (what the recipes write)
    per-token  s = ReduceMax(|x|, axis 1) / qmax, computed in the graph, QuantizeLinear axis 0

and prints, per case, whether it parsed and built and the parser's first error. A build says nothing
about the kernels TensorRT picks (that needs a GPU to inspect); a parse error settles it.

    python scripts/trt_dynamic_quant_probe.py
"""

from __future__ import annotations

import numpy as np


def graph(kind: str, fmt: str):
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h

    K, N, rows = 64, 32, 16
    qmax = 448.0 if fmt == "fp8" else 127.0
    ztype, np_type = (T.FLOAT8E4M3FN, np.uint8) if fmt == "fp8" else (T.INT8, np.int8)
    inits = [h.make_tensor("w", ztype, [K, N], np.zeros(K * N, np_type).tobytes(), raw=True),
             h.make_tensor("ws", T.FLOAT, [N], [0.01] * N),
             h.make_tensor("zp", ztype, [], np.zeros(1, np_type).tobytes(), raw=True)]
    nodes, axis = [], {}
    if kind == "static":
        inits.append(h.make_tensor("s", T.FLOAT, [], [0.01]))
    else:
        inits += [h.make_tensor("qmax", T.FLOAT, [], [qmax]), h.make_tensor("axes", T.INT64, [1], [1])]
        nodes += [h.make_node("Abs", ["x"], ["ax"]), h.make_node("ReduceMax", ["ax", "axes"], ["am"], keepdims=0),
                  h.make_node("Div", ["am", "qmax"], ["s"])]                    # s [rows]
        axis = {"axis": 0}
    nodes += [h.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], **axis),
              h.make_node("DequantizeLinear", ["q", "s", "zp"], ["dq"], **axis),
              h.make_node("DequantizeLinear", ["w", "ws"], ["wd"], axis=1),
              h.make_node("MatMul", ["dq", "wd"], ["y"])]
    g = h.make_graph(nodes, f"{kind}-{fmt}", [h.make_tensor_value_info("x", T.FLOAT, [rows, K])],
                     [h.make_tensor_value_info("y", T.FLOAT, [rows, N])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 21)])
    onnx.checker.check_model(m)
    return m


def main() -> None:
    try:
        import tensorrt as trt
    except ImportError:
        import tensorrt_rtx as trt
    print(f"{trt.__name__} {trt.__version__}")
    for kind in ("static", "per-token"):
        for fmt in ("fp8", "int8"):
            logger = trt.Logger(trt.Logger.ERROR)
            builder = trt.Builder(logger)
            net = builder.create_network(0)
            parser = trt.OnnxParser(net, logger)
            ok = parser.parse(graph(kind, fmt).SerializeToString())
            errors = [str(parser.get_error(i)).strip().splitlines()[-1] for i in range(parser.num_errors)]
            built = bool(ok and builder.build_serialized_network(net, builder.create_builder_config()))
            print(f"{kind:9s} {fmt:4s} parsed={ok} built={built}" + (f"  error: {errors[0]}" if errors else ""))


if __name__ == "__main__":
    main()
