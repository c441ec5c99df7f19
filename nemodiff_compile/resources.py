"""The resource plan of a build: host RAM, disk and GPU memory, stated and checked before any work.
Stdlib only (the GPU is read from `nvidia-smi`, so `info` needs no torch).

The host-RAM model follows the measured build (README "Memory", scripts/quant_memory.py): the
libraries' baseline (~0.6 GiB: torch, ModelOpt, onnx, onnxscript imported), the weights once (a
checkpoint memory-mapped in its stored dtype for a quantized build, or converted to the graph dtype
for a float one; random weights allocated in bf16), and a fixed working set (the traced graph,
quantizer state, one 16 MiB write chunk or one layer's codes) plus the calibration logits
(batch 4 x tokens x vocab, a few float32 copies). Measured above the baseline at 1.19-1.45x the
checkpoint on 0.5B and 0.16B models; the fixed part matters less as models grow.
The validation step at the end of a build is an estimate, not a measurement: the float32 reference
(a quantized build loads a fresh one), ONNX Runtime's copy of the weights (plus its pre-packed
MatMul weights), and both KV caches at the largest batch bucket x --max-context.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .config import ModelConfig

GIB = 2 ** 30
LIBRARIES = int(0.6 * GIB)           # measured: 580 MiB with torch + ModelOpt + onnx + onnxscript imported
WORKING_SET = int(0.25 * GIB)        # measured 0.1-0.2 GiB above the weights (README memory table)
CUDA_CONTEXT = int(1.0 * GIB)        # a CUDA context + allocator slack, on the device
TRT_WORKSPACE = int(1.0 * GIB)       # a TensorRT build's scratch beyond the weights (estimate)
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
PRECISION_DTYPE = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# bytes per quantized weight (int4 AWQ: 4 bits + a fp16 scale per group of 128; nvfp4: + an fp8 per 16)
WEIGHT_BYTES = {"fp8": 1.0, "int8": 1.0, "int4-awq": 0.5 + 2 / 128, "nvfp4": 0.5 + 1 / 16}
CALIB_BATCH, CALIB_TOKENS = 4, 96    # the calibration loop: 4 rows of up to ~64 prompt + 32 new tokens


@dataclass
class Machine:
    """What this machine has free now."""

    ram_available: int                       # bytes (MemAvailable)
    ram_total: int
    disk_free: dict[str, int] = field(default_factory=dict)   # path -> free bytes
    gpu_name: str | None = None
    gpu_free: int | None = None              # bytes free on GPU 0, None without a GPU
    gpu_total: int | None = None

    def describe(self) -> str:
        gpu = (f"{self.gpu_name} {_gib(self.gpu_free)} free of {_gib(self.gpu_total)}" if self.gpu_name
               else "no GPU")
        disks = ", ".join(f"{_gib(v)} free at {k}" for k, v in self.disk_free.items())
        return f"RAM {_gib(self.ram_available)} available of {_gib(self.ram_total)}; disk {disks}; {gpu}"


@dataclass
class Plan:
    """What one build needs. Bytes throughout; `notes` say where each figure comes from."""

    params: int
    checkpoint: int                  # the weights as stored (what is downloaded / memory-mapped)
    host_build: int                  # peak host RAM from loading to the last weight written
    host_validate: int               # peak host RAM of the validation at the end (0: --no-validate)
    gpu: int                         # device memory (0: nothing runs on a GPU)
    engine_disk: int                 # the engine directory: ONNX + external data (+ TensorRT plans)
    download: int                    # into the Hugging Face cache (0: cached, local or random)
    output: Path
    cache: str | None
    calib_device: str | None
    notes: list[str] = field(default_factory=list)

    @property
    def host(self) -> int:
        return max(self.host_build, self.host_validate)

    def lines(self) -> list[str]:
        out = [f"plan: {self.params / 1e9:.2f} B parameters, checkpoint {_gib(self.checkpoint)}",
               f"plan: host RAM {_gib(self.host_build)} to build"
               + (f", {_gib(self.host_validate)} to validate" if self.host_validate else ""),
               f"plan: disk {_gib(self.engine_disk)} for {self.output}"
               + (f" + {_gib(self.download)} download into {self.cache}" if self.download else ""),
               f"plan: GPU memory {_gib(self.gpu) if self.gpu else 'none'}"
               + (f" (calibration on {self.calib_device})" if self.calib_device else "")]
        return out + [f"plan: {n}" for n in self.notes]

    def to_json(self) -> dict:
        return {"parameters": self.params, "checkpoint_bytes": self.checkpoint, "host_build_bytes": self.host_build,
                "host_validate_bytes": self.host_validate, "gpu_bytes": self.gpu,
                "engine_disk_bytes": self.engine_disk, "download_bytes": self.download,
                "calib_device": self.calib_device, "notes": list(self.notes)}


def plan_build(cfg: ModelConfig, *, precision: str, backend: str = "onnxruntime", calib_device: str = "cpu",
               batch_sizes: tuple[int, ...] = (1, 4), max_context: int = 1024, validate: bool = True,
               random_weights: bool = False, download: bool = False, output: Path = Path("engines"),
               cache: str | None = None, recipe=None, gpu_targets: int = 1, tensorrt_on_gpu: bool = False) -> Plan:
    """The plan of `build` for this model, precision and device. recipe: the quantized precision's
    (keep_first_layers / keep_last_layers / float_dtype), None for float precisions."""
    n = cfg.num_parameters()
    stored = DTYPE_BYTES.get(cfg.dtype, 2)
    checkpoint = n * stored
    quantized = recipe is not None
    notes = []
    # ---- the engine's weights on disk
    h, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    per_layer_linear = h * cfg.q_width * 2 + h * cfg.kv_width * 2 + 3 * h * cfg.intermediate_size
    if quantized:
        fbytes = DTYPE_BYTES[recipe.float_dtype]
        kept = min(L, recipe.keep_first_layers + recipe.keep_last_layers) * per_layer_linear
        low = (L * per_layer_linear - kept) * WEIGHT_BYTES.get(precision, 1.0)
        onnx = int(low + (n - L * per_layer_linear + kept) * fbytes)
        notes.append(f"{precision} weights for {L} decoder layers, embedding/head/norms"
                     f"{' and kept layers' if kept else ''} in {recipe.float_dtype}")
    else:
        onnx = n * DTYPE_BYTES[PRECISION_DTYPE[precision]]
    plans = gpu_targets * onnx if backend == "tensorrt" else 0
    # ---- host RAM while building
    logits = CALIB_BATCH * CALIB_TOKENS * V * 4 * 3 if quantized else 0
    if quantized and calib_device == "cuda":
        host_model = 0                    # mapped one tensor at a time on its way to the device
        gpu = checkpoint + logits + CUDA_CONTEXT
        logits = 0                        # ... and the calibration activations live there too
        notes.append("calibration on the GPU: the weights live there, the host streams them")
    else:
        host_model = checkpoint if quantized else n * DTYPE_BYTES[PRECISION_DTYPE[precision]]
        gpu = 0
    host_build = LIBRARIES + WORKING_SET + host_model + logits
    if random_weights:
        notes.append("random weights are allocated in memory (not memory-mapped)")
    elif quantized and calib_device != "cuda":
        notes.append("the checkpoint memory-mapped once in its stored dtype")
    if backend == "tensorrt":
        host_build = max(host_build, LIBRARIES + WORKING_SET + onnx)        # the parsed network holds the weights
        if tensorrt_on_gpu:
            gpu = max(gpu, onnx + TRT_WORKSPACE + CUDA_CONTEXT)
    # ---- validation at the end (ONNX Runtime builds only)
    host_validate = 0
    if validate and backend != "tensorrt":
        kv = cfg.kv_cache_bytes(max(batch_sizes), max_context, 4)
        # a float build validates against the model it exported (in memory already); a quantized one
        # loads a fresh float32 reference
        reference = n * 4 if quantized else host_model
        host_validate = LIBRARIES + reference + int(onnx * 1.5) + 2 * kv
        notes.append(f"validation (estimate): reference {_gib(reference)} + ONNX Runtime weights "
                     f"{_gib(onnx)} (x1.5) + KV caches {_gib(2 * kv)} at batch {max(batch_sizes)} x {max_context}")
    return Plan(n, checkpoint, host_build, host_validate, gpu, onnx + plans, checkpoint if download else 0,
                Path(output), cache, calib_device if quantized else None, notes)


def refusal(plan: Plan, machine: Machine, *, cfg: ModelConfig, batch_sizes: tuple[int, ...] = (1, 4),
            max_context: int = 1024, validate: bool = True, quantized: bool = False) -> str | None:
    """None when `machine` can hold `plan`, else one sentence saying what does not fit and the
    option that would."""
    if plan.host > machine.ram_available:
        need, have = plan.host, machine.ram_available
        fixes = []
        if plan.host_validate > have >= plan.host_build:
            fixes.append(f"--no-validate (building alone needs {_gib(plan.host_build)})")
            kv_one = cfg.kv_cache_bytes(max(batch_sizes), 1, 4) * 2
            room = have - (plan.host_validate - cfg.kv_cache_bytes(max(batch_sizes), max_context, 4) * 2)
            if kv_one and room > 0 and room // kv_one >= 64:
                fixes.append(f"a smaller --max-context (at most {room // kv_one})")
        if quantized and plan.calib_device == "cpu" and machine.gpu_free:
            gpu_need = plan.checkpoint + CALIB_BATCH * CALIB_TOKENS * cfg.vocab_size * 12 + CUDA_CONTEXT
            if gpu_need <= machine.gpu_free:
                fixes.append(f"--calib-device cuda (the GPU holds the weights: {_gib(gpu_need)} of "
                             f"{_gib(machine.gpu_free)} free)")
        if plan.host_validate > plan.host_build > have:
            fixes.append(f"a machine with at least {_gib(plan.host_build)} of free RAM and --no-validate "
                         f"({_gib(need)} to validate too)")
        else:
            fixes.append(f"a machine with at least {_gib(need)} of free RAM")
        return (f"resource plan: this build needs {_gib(need)} of host RAM and this machine has "
                f"{_gib(have)} available: use " + ", or ".join(fixes))
    if plan.gpu and (machine.gpu_free is None or plan.gpu > machine.gpu_free):
        where = f"{machine.gpu_name} has {_gib(machine.gpu_free)} free" if machine.gpu_name else "there is no GPU"
        fix = "--calib-device cpu, or a GPU with more memory" if plan.calib_device == "cuda" else "a GPU with more memory"
        return f"resource plan: this build needs {_gib(plan.gpu)} of GPU memory and {where}: use {fix}"
    for path, need in _disk_needs(plan).items():
        free = machine.disk_free.get(path)
        if free is not None and need > free:
            out = path == str(_existing(plan.output))
            cache = bool(plan.download and plan.cache) and path == str(_existing(Path(plan.cache)))
            fix = " or ".join(n for n, hit in (("--output", out), ("HF_HUB_CACHE", cache)) if hit) + \
                " on a disk with more room"
            return (f"resource plan: this build writes {_gib(need)} under {path} and only {_gib(free)} is "
                    f"free there: free space, or use {fix}")
    return None


def probe(output: Path, cache: str | None = None) -> Machine:
    """This machine's free RAM, disk (at the output folder and the HF cache) and GPU memory."""
    info = _meminfo()
    total = info.get("MemTotal", 0)
    available = info.get("MemAvailable", total)
    disks = {}
    for p in filter(None, (_existing(output), _existing(Path(cache)) if cache else None)):
        disks[str(p)] = shutil.disk_usage(p).free
    name, free, gtotal = _gpu()
    return Machine(available, total, disks, name, free, gtotal)


def _disk_needs(plan: Plan) -> dict[str, int]:
    needs: dict[str, int] = {}
    needs[str(_existing(plan.output))] = plan.engine_disk
    if plan.download and plan.cache:
        key = str(_existing(Path(plan.cache)))
        needs[key] = needs.get(key, 0) + plan.download
    return needs


def _existing(p: Path) -> Path:
    p = Path(p).absolute()
    while not p.exists() and p.parent != p:
        p = p.parent
    return p


def _meminfo() -> dict[str, int]:
    try:
        out = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[key] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
        return out
    except OSError:                     # not Linux: total physical memory, all of it "available"
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total = 0
        return {"MemTotal": total, "MemAvailable": total}


def _gpu() -> tuple[str | None, int | None, int | None]:
    """(name, free bytes, total bytes) of GPU 0 from nvidia-smi; Nones without one."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1") or shutil.which("nvidia-smi") is None:
        return None, None, None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.free,memory.total",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
        name, free, total = (x.strip() for x in out.stdout.strip().splitlines()[0].split(","))
        return name, int(float(free)) * 2**20, int(float(total)) * 2**20
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None, None, None


def _gib(n: int | float | None) -> str:
    if n is None:
        return "?"
    return f"{n / GIB:.1f} GiB" if n >= GIB / 10 else f"{n / 2**20:.0f} MiB"
