"""The Python Remask plugin's enqueue: wrap TensorRT's device pointers as torch tensors (CUDA array
interface, no copy) and run the node's rule (`reference.remask_node`: the Triton pick where Triton imports,
then the per-row commit rule in torch ops) on TensorRT's stream, no host sync. Not executed here (no GPU);
a GPU-less machine never calls it.
"""

from __future__ import annotations

_TYPESTR = {"FLOAT": "<f4", "HALF": "<f2", "INT64": "<i8", "BOOL": "|b1", "INT32": "<i4"}


class _Dev:
    def __init__(self, ptr: int, shape, typestr: str):
        self.__cuda_array_interface__ = {"shape": tuple(int(d) for d in shape), "typestr": typestr,
                                         "data": (int(ptr), False), "version": 3, "strides": None,
                                         "stream": None}


def _tensor(ptr, desc):
    import torch

    name = desc.type.name
    if name == "BF16":   # no CUDA-array-interface typestr for bf16: view int16 bits as bfloat16
        return torch.as_tensor(_Dev(ptr, desc.dims, "<i2"), device="cuda").view(torch.bfloat16)
    return torch.as_tensor(_Dev(ptr, desc.dims, _TYPESTR[name]), device="cuda")


def run_remask(plugin, input_desc, output_desc, inputs, outputs, stream) -> None:
    import torch

    logits, canvas, active, quota, noise = (_tensor(p, d) for p, d in zip(inputs, input_desc))
    active = active != 0                                   # INT32 at the plugin boundary (no BOOL there)
    outs = [_tensor(p, d) for p, d in zip(outputs, output_desc)]
    with torch.cuda.stream(torch.cuda.ExternalStream(int(stream))):
        from . import pick
        from ...decoding.remask import pick as pick_noisy
        from .reference import stage_commit

        if plugin.temperature > 0:
            token, conf = pick_noisy(logits, plugin.temperature, noise)
        else:
            token, conf = pick(logits)                      # Triton where it imports, else the reference
        masked = (canvas == plugin.mask_id) & active[:, None]
        commit = stage_commit(conf, masked, quota, policy=plugin.policy, threshold=plugin.threshold)
        res = (torch.where(commit, token, canvas), token, conf, commit)
        for dst, src in zip(outs, res):
            dst.copy_(src.to(dst.dtype))                   # commit: bool -> INT32 0/1
