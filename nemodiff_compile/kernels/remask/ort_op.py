"""`nemodiff::Remask` under ONNX Runtime: a Python custom op (onnxruntime-extensions) and the session
loader for graphs that hold the node.

onnxruntime-extensions runs Python custom ops only in its own `ai.onnx.contrib` domain (a node in the
`nemodiff` domain is "not a registered function/op", measured with 0.15 on ORT 1.32), and our graphs
keep the TensorRT plugin's domain. So `plugin_session` loads the graph without its weights, renames the
node's domain (and the opset import) to `ai.onnx.contrib`, and creates the session from those bytes with
the external-data folder set (`session.model_external_initializers_file_folder_path`): the weights are
read from `model.onnx.data` where they lie, never copied or rewritten. The op computes
`reference.remask_node` on the CPU (numpy in, numpy out), same I/O as the TensorRT plugin (INT32
`active` / `commit`, no bool at the boundary). Python runs per pass: this is for validating the plugin
variant end to end on the CPU provider, not for speed (`bench` shows what it costs).

Why not a C++ custom-op library: neither the onnxruntime wheel nor onnxruntime-extensions ships ORT's C
API headers (checked: no onnxruntime_c_api.h under site-packages), and this package builds nothing that
needs a download at build time.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import NemodiffError
from .spec import REMASK

CONTRIB_DOMAIN = "ai.onnx.contrib"
EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"
_REGISTERED = False


def _register() -> None:
    """Register the Python op with onnxruntime-extensions (once per process)."""
    global _REGISTERED
    if _REGISTERED:
        return
    try:
        from onnxruntime_extensions import PyCustomOpDef, onnx_op
    except ImportError:
        raise NemodiffError("the graph holds the nemodiff::Remask plugin node: running it under ONNX Runtime needs "
                            "onnxruntime-extensions (pip install -e '.[ort-plugin]')") from None
    d = PyCustomOpDef

    @onnx_op(op_type=REMASK.name, domain=CONTRIB_DOMAIN,
             inputs=[d.dt_float, d.dt_int64, d.dt_int32, d.dt_int64, d.dt_float],
             outputs=[d.dt_int64, d.dt_int64, d.dt_float, d.dt_int32],
             attrs={"mask_id": d.dt_int64, "policy": d.dt_string, "threshold": d.dt_float,
                    "temperature": d.dt_float})
    def remask(logits, canvas, active, quota, noise, **attrs):
        return remask_numpy(logits, canvas, active, quota, noise, **attrs)

    _REGISTERED = True


def remask_numpy(logits, canvas, active, quota, noise, *, mask_id, policy, threshold, temperature):
    """The op on numpy arrays: logits [B, L, V] float32, canvas [B, L] int64, active [B] int32, quota [B]
    int64, noise [B, L, V] float32 -> canvas_out, token [B, L] int64, conf [B, L] float32, commit int32."""
    import numpy as np
    import torch

    from .reference import remask_node

    t = torch.from_numpy
    out, token, conf, commit = remask_node(
        t(np.ascontiguousarray(logits)), t(canvas), t(active), t(quota), t(np.ascontiguousarray(noise)),
        mask_id=int(mask_id), policy=str(policy), threshold=float(threshold), temperature=float(temperature))
    return out.numpy(), token.numpy(), conf.numpy(), commit.to(torch.int32).numpy()


def has_plugin_node(onnx_path: str | Path) -> bool:
    """Whether the graph holds a `nemodiff::Remask` node (reads the graph, not its weights)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return any(n.domain == REMASK.namespace and n.op_type == REMASK.name for n in model.graph.node)


def plugin_session(onnx_path: str | Path, options, providers: list):
    """An InferenceSession for a graph with `nemodiff::Remask` nodes, run by the Python op (see above).
    `options` (ort.SessionOptions) get the extensions library and the external-data folder."""
    import onnx
    import onnxruntime as ort
    from onnxruntime_extensions import get_library_path

    _register()
    path = Path(onnx_path)
    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        if node.domain == REMASK.namespace and node.op_type == REMASK.name:
            node.domain = CONTRIB_DOMAIN
    for opset in model.opset_import:
        if opset.domain == REMASK.namespace:
            opset.domain = CONTRIB_DOMAIN
    options.register_custom_ops_library(get_library_path())
    options.add_session_config_entry(EXTERNAL_FOLDER_KEY, str(path.resolve().parent))
    return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
