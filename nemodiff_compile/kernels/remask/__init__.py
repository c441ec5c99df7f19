"""`nemodiff::Remask`: one refinement pass's sampling and commit rule, fused over the vocabulary.

    spec.py           the op's id (name, version, namespace) and I/O, shared by exporter/builder/runtime
    reference.py      the torch reference, composed from decoding.remask (the truth)
    triton_kernel.py  the Triton implementation (CUDA, or the CPU interpreter with TRITON_INTERPRET=1)

`pick` and `remask` below dispatch: the Triton kernel for CUDA tensors where Triton imports, the
torch reference otherwise (same contract, same results).
"""

from __future__ import annotations

from .. import triton_usable
from .spec import REMASK

__all__ = ["REMASK", "pick", "remask"]


def pick(logits):
    """logits [B, L, V] -> token [B, L] int64, conf [B, L] float32 (greedy)."""
    if triton_usable(logits):
        from .triton_kernel import pick as fn
        return fn(logits)
    from ...decoding.remask import pick as fn
    return fn(logits)


def remask(logits, canvas, active, quota=None, **kw):
    """The whole op (see reference.remask_reference for the contract)."""
    if triton_usable(logits):
        from .triton_kernel import remask_triton as fn
    else:
        from .reference import remask_reference as fn
    return fn(logits, canvas, active, quota, **kw)
