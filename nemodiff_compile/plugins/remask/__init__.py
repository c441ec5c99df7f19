"""`nemodiff::Remask`: one refinement pass's sampling and commit rule, fused over the vocabulary.

    spec.py           the op's id (name, version, namespace) and I/O, shared by exporter/builder/runtime
    reference.py      the torch reference, composed from sampling.remask (the truth)
    triton_kernel.py  the Triton implementation (CUDA, or the CPU interpreter with TRITON_INTERPRET=1)
"""

from .spec import REMASK

__all__ = ["REMASK"]
