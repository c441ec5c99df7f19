"""The C++/CUDA remask kernel (kernels/csrc/remask/remaskKernel.cu, the one the C++ IPluginV3 launches) called
from Python through its C entry point `nemodiffRemaskLaunch`, with the reference's signature, so the GPU
check can compare it with `reference.remask_reference` and the Triton kernel without TensorRT.

The shared library is compiled on first use with nvcc (`-shared`, CUDA runtime linked statically) into
~/.cache/nemodiff-compile/cuda/ (or $NEMODIFF_CUDA_CACHE), keyed by the source's hash and the arch.
The source ships inside the package (kernels/csrc/, package data), so this works from a wheel too.
Compiling is tested on CPU; calling needs a CUDA GPU and has not run on one from this module yet.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from ...errors import NemodiffError

SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "remask" / "remaskKernel.cu"
_DTYPES = {"float32": 0, "float16": 1, "bfloat16": 2}
_LIBS: dict[str, ctypes.CDLL] = {}


def library_path(arch: str, cache_dir: str | Path | None = None) -> Path:
    """Compile (once) and return libnemodiff_remask for `arch` ('sm_90', 'sm_89', ...)."""
    if not SOURCE.is_file():
        raise NemodiffError(f"{SOURCE}: the CUDA source is missing from this installation (package data of nemodiff_compile/kernels/csrc)")
    nvcc = shutil.which("nvcc")
    digest = hashlib.sha256(SOURCE.read_bytes() + (SOURCE.parent / "remaskKernel.h").read_bytes()).hexdigest()[:12]
    base = Path(cache_dir or os.environ.get("NEMODIFF_CUDA_CACHE")
                or Path.home() / ".cache" / "nemodiff-compile" / "cuda")
    out = base / f"libnemodiff_remask-{digest}-{arch}.so"
    if out.is_file():
        return out
    if nvcc is None:
        raise NemodiffError("nvcc not found: install the CUDA toolkit to build the CUDA remask kernel")
    base.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    cc = arch.replace("sm_", "")
    cmd = [nvcc, "-shared", "-Xcompiler", "-fPIC", "-std=c++17", "-O3", "-cudart", "static",
           f"-gencode=arch=compute_{cc},code=[sm_{cc},compute_{cc}]", str(SOURCE), "-o", str(tmp)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise NemodiffError(f"{SOURCE}: nvcc failed for {arch}: {r.stderr.strip().splitlines()[-1:]}")
    os.replace(tmp, out)
    return out


def load(arch: str | None = None) -> ctypes.CDLL:
    if arch is None:
        import torch

        major, minor = torch.cuda.get_device_capability()
        arch = f"sm_{major}{minor}"
    if arch not in _LIBS:
        lib = ctypes.CDLL(str(library_path(arch)))
        fn = lib.nemodiffRemaskLaunch
        fn.restype = ctypes.c_int
        fn.argtypes = ([ctypes.c_void_p, ctypes.c_int32] + [ctypes.c_void_p] * 8 + [ctypes.c_int32] * 3
                       + [ctypes.c_int64, ctypes.c_int32, ctypes.c_float, ctypes.c_float, ctypes.c_void_p])
        _LIBS[arch] = lib
    return _LIBS[arch]


def remask_cuda(logits, canvas, active, quota=None, *, mask_id: int, threshold: float | None,
                temperature: float = 0.0, noise=None):
    """Same contract as `reference.remask_reference`; CUDA tensors, logits float32/float16/bfloat16."""
    import torch

    B, L, V = logits.shape
    dev = logits.device
    logits, canvas = logits.contiguous(), canvas.to(torch.long).contiguous()
    active = active.to(torch.int32).contiguous()                 # no bool at the kernel's boundary
    if threshold is None and quota is None:
        raise ValueError("the top-k policy (threshold None) needs a quota per row")
    # the kernel's rule is per row (quota >= 0: top-k, < 0: threshold); this wrapper keeps the reference's
    # contract (threshold None: top-k for every row, else the threshold rule for every row)
    q = (quota.to(torch.long).contiguous() if threshold is None
         else torch.full((B,), -1, dtype=torch.long, device=dev))
    g = noise.to(torch.float32).contiguous() if (noise is not None and temperature > 0) else None
    outs = (torch.empty(B, L, dtype=torch.long, device=dev), torch.empty(B, L, dtype=torch.long, device=dev),
            torch.empty(B, L, dtype=torch.float32, device=dev), torch.empty(B, L, dtype=torch.int32, device=dev))
    err = load().nemodiffRemaskLaunch(
        logits.data_ptr(), _DTYPES[str(logits.dtype).replace("torch.", "")], canvas.data_ptr(), active.data_ptr(),
        q.data_ptr(), g.data_ptr() if g is not None else None, *(o.data_ptr() for o in outs), B, L, V, int(mask_id),
        1 if threshold is None else 0, 0.0 if threshold is None else float(threshold), float(temperature),
        torch.cuda.current_stream(dev).cuda_stream)
    if err != 0:
        raise RuntimeError(f"nemodiffRemaskLaunch failed with cudaError {err}")
    return outs[0], outs[1], outs[2], outs[3] != 0            # commit as bool, like the reference
