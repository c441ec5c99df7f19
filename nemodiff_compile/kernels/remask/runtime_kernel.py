"""The Python Remask plugin's enqueue: wrap TensorRT's device pointers as torch tensors (CUDA array
interface, no copy) and run the Triton kernel (where Triton imports) or the torch reference on
TensorRT's stream (`plugins.remask.remask`). Not executed here (no GPU); a GPU-less machine never calls it.
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
    outs = [_tensor(p, d) for p, d in zip(outputs, output_desc)]
    threshold = plugin.threshold if plugin.policy == "threshold" else None
    with torch.cuda.stream(torch.cuda.ExternalStream(int(stream))):
        from . import remask as fn                          # Triton where it imports, else the reference
        res = fn(logits, canvas, active, quota, mask_id=plugin.mask_id, threshold=threshold,
                 temperature=plugin.temperature, noise=noise)
        for dst, src in zip(outs, res):
            dst.copy_(src.to(dst.dtype))
