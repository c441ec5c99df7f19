"""What a build is asked for, as data (stdlib only): one `BuildConfig` tree of frozen dataclasses.

    BuildConfig            source, precision, backend, output, with_logits, validate
      .quantization        calib, keep_first_layers, keep_last_layers, kv_cache, calib_device
      .shapes              batch_sizes, max_context, block_length
      .remask              stage (none | onnx | plugin), threshold (None: the top-k policy)
      .tensorrt            gpus, workspace_mb, tactic_mb, hardware_compatibility, version_compatible

Its defaults and checks live here, once: constructing a config normalizes and checks every field
(InvalidArgument naming the CLI flag and what was expected) and the rules between fields. Every
leaf field carries its CLI metadata (flag, help, group, kind), from which `nemodiff-compile build`
generates its options. `pipeline.build_engine` takes one; the manifest stores `to_json()` verbatim
(`build_config`); `from_json` reads it back, `from_toml` reads a `--config` file (the same nested
keys, `threshold = "topk"`, a key left out keeps its default).

Flat keys (`BuildConfig.of(batch_sizes=(1, 8), gpus="sm89")`, the CLI's parameters) are the leaf
names, except remask.stage -> `remask` and remask.threshold -> `remask_threshold`.

PRECISION_DTYPES: precision -> torch dtype name of the exported graph. Quantized precisions
(QUANTIZED, quant.RECIPES' names) keep the layers they do not quantize in their recipe's float_dtype.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterator

from .errors import InvalidArgument

PRECISION_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
QUANTIZED = ("fp8", "int8", "int4-awq", "nvfp4")          # quant.recipe.RECIPES (a test keeps them equal)
PRECISIONS = (*PRECISION_DTYPES, *QUANTIZED)
BACKENDS = ("onnxruntime", "tensorrt", "auto")
# KV-cache dtypes: "model" the graph's float dtype; "fp8" FLOAT8E4M3FN, per-layer static scales (quant/kv_cache.py)
KV_CACHE_DTYPES = ("model", "fp8")
CALIB_DEVICES = ("auto", "cpu", "cuda")
REMASK_STAGES = ("none", "onnx", "plugin")
HW_LEVELS = ("NONE", "AMPERE_PLUS", "SAME_COMPUTE_CAPABILITY")
GROUPS = ("Model", "Precision & quantization", "Shapes", "Remask stage", "TensorRT", "Output")
# fields that do not change what is built: left out when a rebuild compares configurations
NOT_COMPARED = ("output", "validate", "tensorrt.gpus")


def _leaf(default, flag: str, group: str, help: str, kind: str, *, key: str | None = None,
          metavar: str | None = None, choices: tuple = (), minimum: int | None = None, negate: bool = False):
    """A leaf field and its CLI metadata. kind: how a value is read and checked (`_coerce`)."""
    assert group in GROUPS, group
    return field(default=default, metadata=dict(
        flag=flag, group=group, help=help, kind=kind, key=key, metavar=metavar, choices=choices,
        minimum=minimum, negate=negate, nullable=default is None))


def _node(cls):
    return field(default_factory=cls, metadata={"node": True})


class _Node:
    """Normalizes and checks its leaf fields on construction, then `_check_rules` (rules between fields)."""

    def __post_init__(self):
        for f in fields(self):
            if f.metadata.get("node"):
                if not isinstance(getattr(self, f.name), f.default_factory):
                    raise InvalidArgument(f"build config: {f.name} must be a {f.default_factory.__name__}")
            else:
                object.__setattr__(self, f.name, _coerce(f.metadata, getattr(self, f.name)))
        self._check_rules()

    def _check_rules(self) -> None:
        pass

    def to_json(self) -> dict[str, Any]:
        """Nested plain JSON (the manifest's `build_config`): tuples as lists, threshold None as "topk"."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to_json() if f.metadata.get("node") else _to_json(f.metadata, v)
        return out


@dataclass(frozen=True)
class Quantization(_Node):
    calib: str | None = _leaf(
        None, "--calib", "Precision & quantization",
        "fp8/int8/int4-awq: calibration prompts, a .jsonl file ({\"text\": ...} or {\"ids\": [...]} per line) "
        "or a text file (one prompt per line). Default: the built-in set.", "path", metavar="FILE")
    keep_first_layers: int | None = _leaf(
        None, "--keep-first-layers", "Precision & quantization",
        "Quantized builds: decoder layers at the start kept in float (default: the recipe's).", "int",
        minimum=0, metavar="N")
    keep_last_layers: int | None = _leaf(
        None, "--keep-last-layers", "Precision & quantization",
        "Quantized builds: decoder layers at the end kept in float (default: the recipe's).", "int",
        minimum=0, metavar="N")
    kv_cache: str | None = _leaf(
        None, "--kv-cache", "Precision & quantization",
        "Quantized builds: KV-cache dtype, fp8 (FLOAT8E4M3FN, per-layer scales calibrated with the weights) "
        "or model (the graph's float dtype). Default: the recipe's (model).", "choice",
        choices=KV_CACHE_DTYPES, metavar="fp8|model")
    calib_device: str = _leaf(
        "auto", "--calib-device", "Precision & quantization",
        "Quantized builds: where the model is calibrated (auto: the GPU when there is one). The graph is "
        "written from it tensor by tensor either way.", "choice", choices=CALIB_DEVICES)


@dataclass(frozen=True)
class Shapes(_Node):
    """The shapes the runtime will bind: TensorRT profiles are made from these."""

    batch_sizes: tuple[int, ...] = _leaf((1, 4), "--batch-sizes", "Shapes", "Batch buckets the runtime binds.",
                                         "ints", metavar="N,...")
    max_context: int = _leaf(1024, "--max-context", "Shapes", "KV-cache positions per row (prompt + generation).",
                             "int", minimum=2, metavar="N")
    block_length: int | None = _leaf(None, "--block-length", "Shapes", "Default: the config's block_size.",
                                     "int", minimum=2, metavar="B")

    def _check_rules(self) -> None:
        if self.block_length is not None:
            check_context(self.max_context, self.block_length, given=True)

    def to_manifest(self, block_default: int) -> dict:
        """The manifest's `buckets` (block_length resolved against the model's block_size)."""
        return {"batch_sizes": list(self.batch_sizes), "max_context": self.max_context,
                "block_length": self.block_length or block_default}


@dataclass(frozen=True)
class Remask(_Node):
    stage: str = _leaf("none", "--remask", "Remask stage",
                       "Remask stage in the graph (the compiled refinement loop): none (host-side commit "
                       "rule), onnx (standard ops), plugin (the nemodiff::Remask plugin node: TensorRT, or "
                       "ONNX Runtime with onnxruntime-extensions).", "choice", key="remask",
                       choices=REMASK_STAGES)
    threshold: float | None = _leaf(0.9, "--remask-threshold", "Remask stage",
                                    "Commit threshold of the remask stage, or 'topk' for the fixed-steps policy.",
                                    "threshold", key="remask_threshold", metavar="T|topk")


@dataclass(frozen=True)
class TensorRT(_Node):
    gpus: tuple[str, ...] | None = _leaf(
        None, "--gpus", "TensorRT",
        "TensorRT targets, e.g. sm90,sm89 (default: this GPU). On an existing TensorRT engine directory built "
        "with the same configuration, adds these targets; with another, rebuilds it.", "targets",
        metavar="SM,...")
    workspace_mb: int | None = _leaf(None, "--workspace-mb", "TensorRT", "TensorRT workspace limit.", "int",
                                     minimum=1, metavar="MB")
    tactic_mb: int | None = _leaf(None, "--tactic-mb", "TensorRT", "TensorRT tactic memory limit.", "int",
                                  minimum=1, metavar="MB")
    hardware_compatibility: str = _leaf("NONE", "--hardware-compatibility", "TensorRT",
                                        "TensorRT hardware compatibility level.", "choice", choices=HW_LEVELS)
    version_compatible: bool = _leaf(False, "--version-compatible", "TensorRT",
                                     "TensorRT version-compatible engines.", "bool")


@dataclass(frozen=True)
class BuildConfig(_Node):
    source: str = _leaf("tiny", "--size/--model", "Model",
                        "Checkpoint folder, Hugging Face id, or preset (tiny; 3b, 8b, 14b: the published "
                        "geometry with random weights).", "source")
    precision: str = _leaf("fp32", "--precision", "Precision & quantization",
                           "Precision of the graph; fp8, int8, int4-awq and nvfp4 are quantized (calibrated).",
                           "choice", choices=PRECISIONS)
    quantization: Quantization = _node(Quantization)
    shapes: Shapes = _node(Shapes)
    remask: Remask = _node(Remask)
    tensorrt: TensorRT = _node(TensorRT)
    backend: str = _leaf("auto", "--backend", "Output",
                         "auto: TensorRT where the tensorrt module and a CUDA GPU are present, else ONNX Runtime.",
                         "choice", choices=BACKENDS)
    output: str | None = _leaf(None, "--output", "Output",
                               "Engine directory (default engines/<model>-<precision>-<backend>).", "path",
                               metavar="DIR")
    with_logits: bool = _leaf(False, "--with-logits", "Output", "Also output logits (validation builds).", "bool")
    validate: bool = _leaf(True, "--no-validate", "Output", "Skip the short validation at the end.", "bool",
                           key="validate", negate=True)

    def _check_rules(self) -> None:
        q = self.quantization
        if self.precision not in QUANTIZED:
            if q.calib is not None or q.calib_device != "auto":
                flag = f"--calib {q.calib}" if q.calib is not None else f"--calib-device {q.calib_device}"
                raise InvalidArgument(f"{flag}: calibration applies to fp8, int8 and int4-awq builds only")
            if q.keep_first_layers is not None or q.keep_last_layers is not None:
                raise InvalidArgument(f"--keep-first-layers/--keep-last-layers apply to quantized builds, "
                                      f"not {self.precision}")
            if q.kv_cache not in (None, "model"):
                raise InvalidArgument(f"--kv-cache {q.kv_cache}: an fp8 KV cache is calibrated with the weights, "
                                      f"so it applies to quantized builds (fp8, int8, int4-awq), not {self.precision}")
        if self.backend == "onnxruntime":        # "auto" is checked once chosen (for_backend)
            if self.tensorrt.gpus:
                raise InvalidArgument("--gpus: only TensorRT engines are per GPU; add --backend tensorrt")

    # ---- derived configurations ----

    def for_backend(self, chosen: str) -> "BuildConfig":
        """This configuration with `backend` resolved (auto -> chosen), checked again."""
        return replace(self, backend=chosen)

    def with_targets(self, gpus: tuple[str, ...] | None) -> "BuildConfig":
        return replace(self, tensorrt=replace(self.tensorrt, gpus=gpus))

    def differences(self, other: "BuildConfig", ignore: tuple[str, ...] = NOT_COMPARED) -> list[str]:
        """'key: other -> self' for every leaf that differs, leaving out `ignore` (dotted keys)."""
        mine, theirs = _flat_json(self.to_json()), _flat_json(other.to_json())
        return [f"{k} {_show(theirs.get(k))} -> {_show(v)}" for k, v in mine.items()
                if k not in ignore and theirs.get(k) != v]

    # ---- flat keys (CLI parameters, keyword form) ----

    @classmethod
    def of(cls, **flat: Any) -> "BuildConfig":
        """BuildConfig from flat keys (see the module docstring); a key left out keeps its default."""
        tree: dict[str, Any] = {}
        for path, value in _flat_pairs(flat):
            _put(tree, path, value)
        return _build(cls, tree)

    def flat(self) -> dict[str, Any]:
        return {leaf.key: leaf.get(self) for leaf in leaves()}

    # ---- files ----

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "build_config") -> "BuildConfig":
        """Inverse of to_json; a key left out keeps its default, an unknown one is an error naming `where`."""
        return _build(cls, _read_tree(cls, data, where, ()), where)

    @classmethod
    def from_toml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> "BuildConfig":
        """A `--config` file (the nested keys of to_json), then `overrides` (flat keys, e.g. the flags
        given on the command line) on top. Errors name the file and key, or the flag."""
        path = Path(path)
        try:
            data = _toml_loads(path.read_text())
        except FileNotFoundError:
            raise InvalidArgument(f"--config {path}: file not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidArgument(f"--config {path}: unreadable ({e})") from None
        except ValueError as e:             # tomllib.TOMLDecodeError
            raise InvalidArgument(f"--config {path}: not valid TOML ({e})") from None
        tree = _read_tree(cls, data, str(path), ())
        for keys, value in _flat_pairs(overrides or {}):
            _put(tree, keys, value)
        return _build(cls, tree, str(path))


def check_context(max_context: int, block_length: int, *, given: bool) -> None:
    """An engine serves a prompt only when its cache holds the prompt and one block: max_context >
    block_length (given: --block-length was given, else the model's block_size)."""
    if max_context <= block_length:
        block = f"--block-length {block_length}" if given else f"the model's block_size {block_length}"
        raise InvalidArgument(f"--max-context {max_context}: the cache must hold a prompt and one block "
                              f"({block}); expected --max-context >= {block_length + 1}, "
                              "or a smaller --block-length")


# ---- the leaves ----


@dataclass(frozen=True)
class Leaf:
    path: tuple[str, ...]          # ("shapes", "batch_sizes")
    meta: Any                      # the field's metadata (flag, help, group, kind, ...)
    default: Any

    @property
    def key(self) -> str:
        return self.meta["key"] or self.path[-1]

    @property
    def dotted(self) -> str:
        return ".".join(self.path)

    def get(self, config: BuildConfig) -> Any:
        v = config
        for name in self.path:
            v = getattr(v, name)
        return v

    def cli_text(self, value: Any) -> str | None:
        """A value as its flag would be written (help's defaults, messages)."""
        return _cli_text(self.meta, value)


@functools.lru_cache(maxsize=None)
def leaves(cls: type = BuildConfig, prefix: tuple[str, ...] = ()) -> tuple[Leaf, ...]:
    """Every leaf of the tree, in declaration order."""
    out: list[Leaf] = []
    for f in fields(cls):
        if f.metadata.get("node"):
            out.extend(leaves(f.default_factory, prefix + (f.name,)))
        else:
            out.append(Leaf(prefix + (f.name,), f.metadata, f.default))
    return tuple(out)


def _by_key() -> dict[str, Leaf]:
    return {leaf.key: leaf for leaf in leaves()}


def _coerce(meta, value: Any) -> Any:
    """One leaf's value from Python, JSON/TOML or CLI text -> its normalized form; InvalidArgument
    naming the flag otherwise."""
    flag, kind = meta["flag"], meta["kind"]
    if value is None and meta["nullable"]:
        return None
    if kind in ("path", "source"):
        if isinstance(value, Path):
            value = str(value)
        if not isinstance(value, str) or not value:
            raise InvalidArgument(f"{flag} {value!r}: expected a {'path' if kind == 'path' else 'folder or preset'}")
        return value
    if kind == "choice":
        if value not in meta["choices"]:
            raise InvalidArgument(f"{flag} {value}: expected one of {', '.join(meta['choices'])}")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            label = f"{meta['key']} ({flag})" if meta["negate"] else flag
            raise InvalidArgument(f"{label}: expected true or false, got {value!r}")
        return value
    if kind == "int":
        try:
            n = value if isinstance(value, int) and not isinstance(value, bool) else int(str(value).strip())
        except ValueError:
            n = None
        if n is None or n < meta["minimum"]:
            raise InvalidArgument(f"{flag} {value}: expected an integer >= {meta['minimum']}")
        return n
    if kind == "ints":
        try:
            parts = value.split(",") if isinstance(value, str) else list(value)
            vals = tuple(p if isinstance(p, int) and not isinstance(p, bool) else int(str(p).strip())
                         for p in parts if str(p).strip())
        except (TypeError, ValueError):
            vals = ()
        if not vals or min(vals) < 1:
            raise InvalidArgument(f"{flag} {_cli_text(meta, value)}: expected comma-separated positive integers")
        return vals
    if kind == "threshold":
        if value is None or (isinstance(value, str) and value.strip().lower() == "topk"):
            return None
        try:
            t = float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            t = None
        if t is None or not 0.0 <= t <= 1.0:
            raise InvalidArgument(f"{flag} {value}: expected a number in [0, 1] or 'topk'")
        return t
    if kind == "targets":
        from .artifact.targets import parse_targets

        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            value = ",".join(value)
        if not isinstance(value, str):
            raise InvalidArgument(f"--gpus {value!r}: expected a compute capability like sm90, sm89 or 8.6")
        return parse_targets(value)
    raise AssertionError(kind)  # pragma: no cover


def _to_json(meta, value: Any) -> Any:
    if meta["kind"] == "threshold" and value is None:
        return "topk"
    return list(value) if isinstance(value, tuple) else value


def _cli_text(meta, value: Any) -> str | None:
    if meta["kind"] == "threshold":
        return "topk" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _show(v: Any) -> str:
    return "unset" if v is None else str(v)


# ---- reading trees and flat keys ----


def _read_tree(cls: type, data: Any, where: str, prefix: tuple[str, ...]) -> dict[str, Any]:
    """JSON/TOML tables -> {field: value or subtree}, each leaf checked; errors name `where` and the key."""
    dotted = ".".join(prefix) or "the top level"
    if not isinstance(data, dict):
        raise InvalidArgument(f"{where}: {dotted}: expected a table of keys, got {type(data).__name__}")
    by_name = {f.name: f for f in fields(cls)}
    out: dict[str, Any] = {}
    for k, v in data.items():
        f = by_name.get(k)
        key = ".".join(prefix + (k,))
        if f is None:
            raise InvalidArgument(f"{where}: unknown key {key!r} (expected one of {', '.join(by_name)} "
                                  f"in {dotted})")
        if f.metadata.get("node"):
            out[k] = _read_tree(f.default_factory, v, where, prefix + (k,))
            continue
        try:
            out[k] = _coerce(f.metadata, v)
        except InvalidArgument as e:
            raise InvalidArgument(f"{where}: {key} = {v!r}: {e}") from None
    return out


def _flat_pairs(flat: dict[str, Any]) -> list[tuple[tuple[str, ...], Any]]:
    """Flat keys -> (path in the tree, checked value); errors name the flag."""
    by_key = _by_key()
    pairs = []
    for k, v in flat.items():
        leaf = by_key.get(k)
        if leaf is None:
            raise InvalidArgument(f"unknown build option {k!r} (expected one of {', '.join(by_key)})")
        pairs.append((leaf.path, _coerce(leaf.meta, v)))
    return pairs


def _put(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _build(cls: type, tree: dict[str, Any], where: str | None = None):
    """Construct `cls` from a checked tree; a broken rule between fields names `where` when given."""
    kw = {}
    for f in fields(cls):
        if f.name in tree:
            kw[f.name] = _build(f.default_factory, tree[f.name], where) if f.metadata.get("node") else tree[f.name]
    try:
        return cls(**kw)
    except InvalidArgument as e:
        if where is None or cls is not BuildConfig:
            raise
        raise InvalidArgument(f"{where}: {e}") from None


def _flat_json(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat_json(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _toml_loads(text: str) -> dict[str, Any]:
    try:
        import tomllib                      # Python 3.11+
    except ModuleNotFoundError:             # pragma: no cover  (3.10: the tomli package, a dependency there)
        import tomli as tomllib
    return tomllib.loads(text)


def iter_groups() -> Iterator[tuple[str, list[Leaf]]]:
    """(group, its leaves) in GROUPS order: the CLI's help sections."""
    for g in GROUPS:
        yield g, [leaf for leaf in leaves() if leaf.meta["group"] == g]


__all__ = ["BuildConfig", "Quantization", "Shapes", "Remask", "TensorRT", "Leaf", "leaves", "iter_groups",
           "PRECISION_DTYPES", "QUANTIZED", "PRECISIONS", "BACKENDS", "KV_CACHE_DTYPES", "CALIB_DEVICES",
           "REMASK_STAGES", "HW_LEVELS", "GROUPS", "check_context"]
