"""Hugging Face checkpoint folders: read and write config.json + safetensors weights (+ draft LoRA).

Layout (the real one): config.json, model.safetensors or model-0000i-of-0000n.safetensors with
model.safetensors.index.json, tokenizer files, optional linear_spec_lora/ (PEFT adapter on o_proj).

Memory: `load_checkpoint` builds the model on the `meta` device (no storage at all), memory-maps
the safetensors files with `safe_open` and materializes one tensor at a time, then hands the
finished tensors to `load_state_dict(assign=True)`, which adopts them without copying. A tensor
already in the target dtype (on the CPU) stays a copy-on-write view of the mapped file: no copy at
all, pages come in from the page cache on first use and in-place edits never reach the file. A
tensor in another dtype (or for another device) is converted right after it is mapped and the
mapped source dropped. So at no point are two full copies of the weights in memory: the peak is
the weights in the target dtype plus one tensor in flight (plus reclaimable page cache). Do not
rewrite a loaded checkpoint's files in place while the model lives (truncating a mapped file makes
later reads fault); `save_checkpoint` writes a new folder and renames it, which is safe even onto
the folder the model came from. Every header (names, shapes, dtypes) is checked before the first
tensor byte is read, so a bad checkpoint fails in milliseconds with one line naming the file and
the tensor.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError, NemodiffError
from ..fsutil import atomic_dir
from .model import NemotronLabsDiffusion
from .vision import NemotronLabsDiffusionVLM

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
LORA_DIR = "linear_spec_lora"
LORA_CONFIG_NAME = "adapter_config.json"
LORA_WEIGHTS_NAME = "adapter_model.safetensors"
LORA_MODES = ("toggle", "merge", "off")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
# safetensors header dtype codes accepted for weights (anything else, ints and fp8, is refused)
_STORED_FLOATS = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """"bfloat16" / "float16" / "float32" (or the torch dtype itself) -> torch dtype."""
    if isinstance(name, torch.dtype):
        if name not in _DTYPE_NAMES:
            raise ConfigError(f"dtype: expected bfloat16, float16 or float32, got {name}")
        return name
    if name not in _DTYPES:
        raise ConfigError(f"dtype: expected bfloat16, float16 or float32, got {name!r}")
    return _DTYPES[name]


def dtype_name(dtype: str | torch.dtype) -> str:
    return _DTYPE_NAMES[torch_dtype(dtype)]


# =================================================================================================
# load
# =================================================================================================

def load_checkpoint(path: str | Path, *, dtype: str | torch.dtype | None = None,
                    device: str | torch.device = "cpu", lora: str | None = None) -> NemotronLabsDiffusion:
    """Load a checkpoint folder into a `NemotronLabsDiffusion` in eval mode.

    dtype: the weights' dtype in memory (bfloat16/float16/float32; default the config's); the stored
    dtype may be any of the three. lora: what to do with `linear_spec_lora/`: "toggle" attaches it
    for `draft_lora=True` passes (default when the folder has one), "merge" folds it into o_proj
    for good, "off" ignores it (default when there is none). The returned model's `config` is the
    file's (its `dtype` names the stored dtype, not necessarily the in-memory one).
    Raises CheckpointError / ConfigError with one line naming the file (and tensor) at fault.
    """
    folder = _checkpoint_folder(path)
    lora = _lora_mode(folder, lora)
    cfg = read_config(folder)
    target = torch_dtype(dtype or cfg.dtype)
    model = meta_model(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with contextlib.ExitStack() as stack:
        files, listing = _open_weights(folder, stack)
        _check_names(files, listing, expected)
        _check_headers(files, expected)
        state = _read_tensors(files, target, device)
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    if lora != "off":
        load_draft_lora(model, folder / LORA_DIR)
        if lora == "merge":
            model.merge_draft_lora()
    return model


def read_config(folder: str | Path) -> ModelConfig:
    """config.json of a checkpoint folder -> ModelConfig (ConfigError / CheckpointError on failure)."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (every checkpoint folder needs a config.json)")
    try:
        return ModelConfig.from_file(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None


def meta_model(cfg: ModelConfig) -> NemotronLabsDiffusion:
    """The model with every parameter on the `meta` device: shapes only, no storage, no init cost.
    A vision-language config (model_type nemotron_labs_diffusion_vlm) gives the model with its vision
    tower and projector (model/vision.py)."""
    with torch.device("meta"):
        return (NemotronLabsDiffusionVLM if cfg.is_vlm else NemotronLabsDiffusion)(cfg)


def _checkpoint_folder(path: str | Path) -> Path:
    folder = Path(path)
    if not folder.exists():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: expected a checkpoint folder (config.json + *.safetensors), "
                              "found a file")
    return folder


def _lora_mode(folder: Path, lora: str | None) -> str:
    has = (folder / LORA_DIR).is_dir()
    if lora is None:
        return "toggle" if has else "off"
    if lora not in LORA_MODES:
        raise NemodiffError(f"lora: expected one of {', '.join(LORA_MODES)}, got {lora!r}")
    if lora != "off" and not has:
        raise CheckpointError(f"{folder / LORA_DIR}: not found (lora={lora!r} needs the draft adapter folder)")
    return lora


class _File:
    """One open, memory-mapped safetensors file and the tensor names it holds."""

    def __init__(self, path: Path, handle: Any):
        self.path, self.handle = path, handle
        self.keys = set(handle.keys())


def _open_safetensors(path: Path, stack: contextlib.ExitStack) -> _File:
    from safetensors import SafetensorError, safe_open

    try:
        handle = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a valid safetensors file, truncated or corrupt ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    return _File(path, handle)


def _open_weights(folder: Path, stack: contextlib.ExitStack) -> tuple[dict[str, _File], Path]:
    """{tensor name: open file holding it} and the file that lists the tensors (weights or index)."""
    single = folder / WEIGHTS_NAME
    if single.is_file():
        f = _open_safetensors(single, stack)
        return {k: f for k in f.keys}, single
    index_path = folder / INDEX_NAME
    if not index_path.is_file():
        bins = sorted(p.name for p in folder.glob("*.bin"))
        hint = f" (found {bins[0]}: PyTorch .bin checkpoints are not supported, convert to safetensors)" if bins else ""
        raise CheckpointError(f"{folder}: no {WEIGHTS_NAME} or {INDEX_NAME}{hint}")
    weight_map = _read_index(index_path)
    shards: dict[str, _File] = {}
    for name, shard in weight_map.items():
        if shard not in shards:
            shard_path = folder / shard
            if not shard_path.is_file():
                raise CheckpointError(f"{index_path}: shard {shard} (holding tensor {name}) not found in {folder}")
            shards[shard] = _open_safetensors(shard_path, stack)
    files = {}
    for name, shard in weight_map.items():
        f = shards[shard]
        if name not in f.keys:
            raise CheckpointError(f"{f.path}: tensor {name} missing (the index {INDEX_NAME} says this shard holds it)")
        files[name] = f
    for f in shards.values():
        stray = sorted(f.keys - weight_map.keys())
        if stray:
            raise CheckpointError(f"{f.path}: tensor {stray[0]} is not listed in {INDEX_NAME}"
                                  + _more(len(stray)))
    return files, index_path


def _read_index(path: Path) -> dict[str, str]:
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{path}: expected an object with a \"weight_map\" of tensor name -> shard file")
    for name, shard in weight_map.items():
        if Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise CheckpointError(f"{path}: shard {shard!r} of tensor {name} must be a file inside the folder")
    return weight_map


def _more(n: int) -> str:
    return f" (and {n - 1} more)" if n > 1 else ""


def _check_names(files: dict[str, _File], listing: Path, expected: dict[str, tuple[int, ...]]) -> None:
    missing = [k for k in expected if k not in files]
    extra = sorted(k for k in files if k not in expected)
    if missing:
        # both at once usually means other names (a plain Ministral checkpoint: model.* not encoder.*)
        found = f"; found unexpected tensor {extra[0]}{_more(len(extra))} instead" if extra else ""
        raise CheckpointError(f"{listing}: missing tensor {missing[0]}{_more(len(missing))}, "
                              f"expected by config.json{found}")
    if extra:
        raise CheckpointError(f"{files[extra[0]].path}: unexpected tensor {extra[0]}{_more(len(extra))}, "
                              f"not part of the model config.json describes")


def _check_headers(files: dict[str, _File], expected: dict[str, tuple[int, ...]]) -> None:
    """Shapes and dtypes from the headers alone (no tensor data is read)."""
    for name, shape in expected.items():
        f = files[name]
        sl = f.handle.get_slice(name)
        code, found = sl.get_dtype(), tuple(sl.get_shape())
        if code not in _STORED_FLOATS:
            raise CheckpointError(f"{f.path}: tensor {name} is stored as {code}, "
                                  f"expected a float tensor (BF16, F16 or F32)")
        if found != shape:
            raise CheckpointError(f"{f.path}: tensor {name} has the wrong shape: "
                                  f"expected {list(shape)}, found {list(found)}")


def _read_tensors(files: dict[str, _File], dtype: torch.dtype,
                  device: str | torch.device) -> dict[str, torch.Tensor]:
    """Materialize one tensor at a time in `dtype` on `device` (the mmap'd source is not kept)."""
    from safetensors import SafetensorError

    out: dict[str, torch.Tensor] = {}
    for name, f in files.items():
        try:
            t = f.handle.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{f.path}: cannot read tensor {name} ({e})") from None
        out[name] = t.to(device=device, dtype=dtype)
        del t
    return out


# =================================================================================================
# random weights (timing and tests, when no checkpoint is at hand)
# =================================================================================================

def random_model(cfg: ModelConfig, *, dtype: str | torch.dtype | None = None,
                 device: str | torch.device = "cpu", seed: int = 0, std: float = 0.02) -> NemotronLabsDiffusion:
    """The model with seeded N(0, std) weights and unit norm weights, allocated directly in `dtype`
    on `device` (no fp32 staging copy; a 14B bf16 model needs ~27 GB, not 54)."""
    target = torch_dtype(dtype or cfg.dtype)
    model = meta_model(cfg)
    gen = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, p in model.state_dict().items():
        t = torch.empty(p.shape, dtype=target, device=device)
        state[name] = t.fill_(1.0) if name.endswith("norm.weight") else t.normal_(0.0, std, generator=gen)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


# =================================================================================================
# save
# =================================================================================================

def save_checkpoint(model: torch.nn.Module, out_dir: str | Path, *, dtype: str | None = None,
                    max_shard_bytes: int | None = None, extra_files: dict[str, str | Path] | None = None) -> Path:
    """Write `model` (a NemotronLabsDiffusion) as a HF checkpoint folder, atomically.

    dtype: stored dtype ("bfloat16", "float16", "float32"); default the config's. max_shard_bytes:
    split into model-0000i-of-0000n.safetensors + index when the weights exceed it. extra_files:
    {name in folder: source path} copied along (tokenizer.json, chat_template.jinja, ...). A draft
    LoRA attached with `set_draft_lora` is written to linear_spec_lora/ (PEFT layout).
    """
    from safetensors.torch import save_file

    cfg: ModelConfig = model.config
    dtype = dtype_name(dtype or cfg.dtype)
    cfg = cfg.replace(dtype=dtype)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        sd = {k: v.detach().to(device="cpu", dtype=torch_dtype(dtype)).contiguous()
              for k, v in model.state_dict().items()}
        shards = _split(sd, max_shard_bytes)
        if len(shards) == 1:
            save_file(shards[0], tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        else:
            weight_map, total = {}, 0
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / name, metadata={"format": "pt"})
                for k, v in shard.items():
                    weight_map[k] = name
                    total += v.numel() * v.element_size()
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        del sd, shards
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg.to_hf(), indent=2) + "\n")
        for name, src in (extra_files or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tmp / name)
        if getattr(model, "has_draft_lora", False):
            a, b, scale = _attached_lora(model)
            save_draft_lora(tmp / LORA_DIR, [x.to(torch_dtype(dtype)) for x in a],
                            [x.to(torch_dtype(dtype)) for x in b], alpha=scale * a[0].shape[0])
    return out_dir


def _split(sd: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    if not max_bytes:
        return [sd]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in sd.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    return shards


# =================================================================================================
# draft LoRA (linear self-speculation): PEFT adapter on every layer's o_proj
# =================================================================================================

def _lora_key(layer: int, which: str) -> str:
    return f"base_model.model.encoder.layers.{layer}.self_attn.o_proj.lora_{which}.weight"


def _attached_lora(model: NemotronLabsDiffusion) -> tuple[list[torch.Tensor], list[torch.Tensor], float]:
    attns = [layer.self_attn for layer in model.encoder.layers]
    return [m.lora_a for m in attns], [m.lora_b for m in attns], attns[0].lora_scale


def save_draft_lora(folder: str | Path, a_list: list[torch.Tensor], b_list: list[torch.Tensor],
                    alpha: float) -> Path:
    """Write per-layer factors A [r, q_width], B [hidden, r] as a PEFT adapter (scale = alpha / r)."""
    from safetensors.torch import save_file

    if not a_list or len(a_list) != len(b_list):
        raise ValueError(f"need one A and one B per layer, got {len(a_list)} A and {len(b_list)} B")
    r = a_list[0].shape[0]
    for i, (a, b) in enumerate(zip(a_list, b_list)):
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise ValueError(f"layer {i}: A {list(a.shape)} / B {list(b.shape)} are not rank-{r} factors")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i, (a, b) in enumerate(zip(a_list, b_list)):
        tensors[_lora_key(i, "A")] = a.detach().cpu().contiguous()     # [r, q_width]
        tensors[_lora_key(i, "B")] = b.detach().cpu().contiguous()     # [hidden, r]
    save_file(tensors, folder / LORA_WEIGHTS_NAME, metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None,
        "r": int(r), "lora_alpha": float(alpha), "lora_dropout": 0.0, "bias": "none",
        "target_modules": ["o_proj"], "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
    }
    (folder / LORA_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def read_draft_lora(folder: str | Path, cfg: ModelConfig, *, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu") -> tuple[list[torch.Tensor], list[torch.Tensor], float]:
    """A PEFT o_proj adapter folder -> (A [r, q_width] per layer, B [hidden, r] per layer, scale)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: draft LoRA folder not found")
    r, scale = _read_lora_config(folder / LORA_CONFIG_NAME)
    path = folder / LORA_WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (the draft LoRA weights)")
    expected = {}
    for i in range(cfg.num_hidden_layers):
        expected[_lora_key(i, "A")] = (r, cfg.q_width)
        expected[_lora_key(i, "B")] = (cfg.hidden_size, r)
    with contextlib.ExitStack() as stack:
        f = _open_safetensors(path, stack)
        files = {k: f for k in f.keys}
        _check_names(files, path, expected)
        _check_headers(files, expected)
        state = _read_tensors(files, dtype or torch.float32, device)
    n = cfg.num_hidden_layers
    return [state[_lora_key(i, "A")] for i in range(n)], [state[_lora_key(i, "B")] for i in range(n)], scale


def load_draft_lora(model: NemotronLabsDiffusion, folder: str | Path) -> float:
    """Attach the adapter in `folder` to `model` for `draft_lora=True` passes; returns its scale."""
    device = model.diffusion_head.weight.device
    a, b, scale = read_draft_lora(folder, model.config, dtype=model.dtype, device=device)
    model.set_draft_lora(a, b, scale)
    return scale


def _read_lora_config(path: Path) -> tuple[int, float]:
    """adapter_config.json -> (rank, scale); refuses adapter features the model does not implement."""
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (the draft LoRA config)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    r, alpha = raw.get("r"), raw.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise CheckpointError(f"{path}: r must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise CheckpointError(f"{path}: lora_alpha must be a number, got {alpha!r}")
    targets = raw.get("target_modules")
    targets = [targets] if isinstance(targets, str) else targets
    if not isinstance(targets, list) or set(targets) != {"o_proj"}:
        raise CheckpointError(f"{path}: target_modules is {raw.get('target_modules')!r}, expected [\"o_proj\"]")
    for key, ok in _UNSUPPORTED_LORA.items():
        if key in raw and not ok(raw[key]):
            raise CheckpointError(f"{path}: {key}={raw[key]!r} is not supported")
    scale = alpha / math.sqrt(r) if raw.get("use_rslora") else alpha / r
    return r, float(scale)


# adapter_config.json fields whose non-default values would change the math (value -> acceptable?)
_UNSUPPORTED_LORA = {
    "peft_type": lambda v: v in (None, "LORA"),
    "bias": lambda v: v in (None, "none"),
    "fan_in_fan_out": lambda v: not v,
    "use_dora": lambda v: not v,
    "rank_pattern": lambda v: not v,
    "alpha_pattern": lambda v: not v,
    "layers_to_transform": lambda v: v is None,
    "layers_pattern": lambda v: not v,
}

