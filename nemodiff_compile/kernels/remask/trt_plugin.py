"""`nemodiff::Remask` as a Python IPluginV3 (creator: IPluginCreatorV3One), for `tensorrt` and `tensorrt_rtx`.

Why a Python IPluginV3 and not a Python-defined plugin (`tensorrt.plugin`, with an AOT Triton/PTX
implementation that needs no Python at run time): `tensorrt_rtx.plugin` fails to import in the
tensorrt-rtx 1.7.1 wheel (it refers to a module the wheel lacks; measured here), so the one plugin
mechanism both flavors offer from Python is this one. Consequences, stated plainly:

  - build time (what the CPU tests exercise): shapes, types and formats below are all TensorRT asks
    for, and the ONNX parser resolves the custom node through this creator;
  - run time: `enqueue` runs in Python on TensorRT's stream (the Triton kernel where it is installed,
    the torch reference otherwise), so an engine containing this plugin needs this package imported
    (`register_plugins`) before deserialization and cannot run from C++. The C++/CUDA IPluginV3 in
    kernels/csrc/ (C++/CUDA, shipped with the package) is the no-Python runtime path; it registers the same id. Never executed
    here (no GPU): enqueue is written from the TensorRT Python plugin sample, not run.

I/O (spec.py): logits [B,L,V] float/half/bf16, canvas [B,L] int64, active [B] int32, quota [B] int64,
noise [B,L,V] float32 -> canvas_out [B,L] int64, token [B,L] int64, confidence [B,L] float32,
commit [B,L] int32. No BOOL at the boundary: `PluginTensorDesc::type` documents kBOOL (and kUINT8) as
unsupported for plugins (TensorRT 10.2-11.1; NVIDIA/TensorRT#3959 "could not find any supported
formats"), so the graph casts `active` to INT32 before the node and `commit` back after it.
Fields: mask_id (int), policy ("threshold" | "topk"), threshold, temperature.
"""

from __future__ import annotations

import functools
import sys
import traceback

import numpy as np

from .spec import POLICIES, REMASK

NUM_INPUTS, NUM_OUTPUTS = 5, 4


def _fields(fc) -> dict:
    out = {}
    for f in fc or []:
        data = f.data
        if f.type == _mod.PluginFieldType.CHAR:
            out[f.name] = bytes(np.asarray(data, dtype=np.int8).tobytes()).split(b"\0")[0].decode()
        else:
            arr = np.asarray(data).reshape(-1)
            out[f.name] = arr[0].item() if arr.size else None
    return out


_mod = None          # the TensorRT module the classes were made for


def _guarded(cls):
    """A Python exception inside a TensorRT callback ends the process ("terminate called without an
    active exception") with no message: print the traceback first, then re-raise."""
    for name, fn in list(vars(cls).items()):
        if callable(fn) and not name.startswith("__"):
            def wrap(fn=fn):
                @functools.wraps(fn)
                def inner(*a, **k):
                    try:
                        return fn(*a, **k)
                    except BaseException:
                        traceback.print_exc(file=sys.stderr)
                        raise
                return inner
            setattr(cls, name, wrap())
    return cls


def make_creator(trt_mod):
    """A fresh creator object for `trt_mod` (tensorrt or tensorrt_rtx); the caller keeps it alive."""
    global _mod
    _mod = trt = trt_mod

    @_guarded
    class RemaskPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, fields: dict | None = None):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            f = fields or {}
            self.mask_id = int(f.get("mask_id", 0))
            self.policy = str(f.get("policy", "threshold"))
            self.threshold = float(f.get("threshold", 0.9))
            self.temperature = float(f.get("temperature", 0.0))
            if self.policy not in POLICIES:
                raise ValueError(f"Remask: policy {self.policy!r}, expected one of {POLICIES}")
            self.num_outputs = NUM_OUTPUTS
            self.plugin_namespace = REMASK.namespace
            self.plugin_name = REMASK.name
            self.plugin_version = REMASK.version

        # ---- core / build ---------------------------------------------------------------------
        def get_capability_interface(self, type):
            return self

        def clone(self):
            c = RemaskPlugin()
            c.__dict__.update(self.__dict__)
            return c

        def get_output_data_types(self, input_types):
            return [trt.DataType.INT64, trt.DataType.INT64, trt.DataType.FLOAT, trt.DataType.INT32]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            canvas = trt.DimsExprs(inputs[1])          # [B, L]
            return [canvas, trt.DimsExprs(inputs[1]), trt.DimsExprs(inputs[1]), trt.DimsExprs(inputs[1])]

        def supports_format_combination(self, pos, in_out, num_inputs):
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            want = {0: (trt.DataType.FLOAT, trt.DataType.HALF, trt.DataType.BF16), 1: (trt.DataType.INT64,),
                    2: (trt.DataType.INT32,), 3: (trt.DataType.INT64,), 4: (trt.DataType.FLOAT,),
                    5: (trt.DataType.INT64,), 6: (trt.DataType.INT64,), 7: (trt.DataType.FLOAT,),
                    8: (trt.DataType.INT32,)}
            return desc.type in want[pos]

        def configure_plugin(self, inputs, outputs):
            pass

        def get_workspace_size(self, inputs, outputs):
            return 0

        def get_valid_tactics(self):
            return []

        def get_fields_to_serialize(self):
            # PluginField keeps a raw pointer to its array and the binding a pointer into the collection's
            # vector: both stay alive on self until the next call (TensorRT reads them right after this one)
            self._serialized = (np.array([self.mask_id], np.int32),
                                np.frombuffer(self.policy.encode() + b"\0", np.int8).copy(),
                                np.array([self.threshold], np.float32), np.array([self.temperature], np.float32))
            m, p, th, te = self._serialized
            self._field_collection = trt.PluginFieldCollection([
                trt.PluginField("mask_id", m, trt.PluginFieldType.INT32),
                trt.PluginField("policy", p, trt.PluginFieldType.CHAR),
                trt.PluginField("threshold", th, trt.PluginFieldType.FLOAT32),
                trt.PluginField("temperature", te, trt.PluginFieldType.FLOAT32),
            ])
            return self._field_collection

        # ---- runtime (Python, on TensorRT's stream; not executed here) -------------------------
        def on_shape_change(self, inputs, outputs):
            pass

        def set_tactic(self, tactic):
            pass

        def attach_to_context(self, context):
            return self.clone()

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            from .runtime_kernel import run_remask

            run_remask(self, input_desc, output_desc, inputs, outputs, stream)

    @_guarded
    class RemaskCreator(trt.IPluginCreatorV3One):
        def __init__(self):
            trt.IPluginCreatorV3One.__init__(self)
            self.name = REMASK.name
            self.plugin_namespace = REMASK.namespace
            self.plugin_version = REMASK.version
            self._empty = (np.array([], np.int32), np.array([], np.int8), np.array([], np.float32),
                           np.array([], np.float32))          # kept alive: PluginField holds pointers
            self.field_names = trt.PluginFieldCollection([
                trt.PluginField("mask_id", self._empty[0], trt.PluginFieldType.INT32),
                trt.PluginField("policy", self._empty[1], trt.PluginFieldType.CHAR),
                trt.PluginField("threshold", self._empty[2], trt.PluginFieldType.FLOAT32),
                trt.PluginField("temperature", self._empty[3], trt.PluginFieldType.FLOAT32),
            ])

        def create_plugin(self, name, fc, phase):
            # the bindings take ownership of the returned plugin (and catch its exceptions): no list of
            # every plugin ever made is kept here
            return RemaskPlugin(_fields(fc))

    return RemaskCreator()
