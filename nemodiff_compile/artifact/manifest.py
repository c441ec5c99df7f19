"""The engine directory's `manifest.json`: what was built, from what, with which tools. Stdlib only.

Loading checks it and refuses, with a sentence saying what to rebuild (the engine's own source,
precision and backend, where the manifest can be read), a manifest edited after the build (its own
checksum), a missing, truncated or altered artifact (size always; sha256 with `deep=True`), a format
this version cannot read, or a runtime older than the one that built it. A folder without a manifest
is not an engine directory (nothing suggests building over it).

Checking costs: the default (sizes) is a stat per file, microseconds; `deep=True` reads and hashes
every byte (sha256: about 1.5 GiB/s per core here, ~10 s for a 16 GB engine: README "Outputs, swaps
and checks").
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import NemodiffError
from ..fsutil import read_stable

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
# Oldest onnxruntime that runs our graphs (opset 21).
MIN_ONNXRUNTIME = "1.18"


class EngineError(NemodiffError):
    """An engine directory is missing, corrupted, or was built for something else."""


@dataclass
class Manifest:
    backend: str                              # "onnxruntime" (TensorRT engines are listed in `engines`)
    precision: str                            # fp32 | fp16 | bf16 | ...
    source: str                               # checkpoint folder or preset the engine was built from
    model_config: dict[str, Any]              # the checkpoint's config.json
    weights_sha256: str                       # of the source weights as loaded (see pipeline.py)
    io_spec: dict[str, Any]                   # export.spec.IOSpec.to_json()
    buckets: dict[str, Any]                   # batch_sizes, max_context, block_length
    artifacts: dict[str, dict[str, Any]]      # file name -> {"bytes": n, "sha256": hex}
    tool_versions: dict[str, str]
    requires: dict[str, str] = field(default_factory=lambda: {"onnxruntime": MIN_ONNXRUNTIME})
    engines: list[dict[str, Any]] = field(default_factory=list)     # per-GPU TensorRT engines
    validation: dict[str, Any] | None = None                          # last `validate` result
    # quantized builds: recipe, calibration set (source, count, sha256), excluded layers, Q/DQ
    # counts and the validate thresholds (quant.export.quantize_step); None for float builds
    quantization: dict[str, Any] | None = None
    # build_config.BuildConfig.to_json() as asked (tensorrt.gpus: every target the directory holds);
    # None in manifests written before it existed
    build_config: dict[str, Any] | None = None
    # {"asked": "auto" | backend, "chosen": backend, "reason": why}; None in older manifests
    backend_choice: dict[str, str] | None = None
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["checksum"] = _checksum(d)
        return d


def file_digest(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def write_manifest(engine_dir: Path, manifest: Manifest) -> Path:
    """Write manifest.json atomically (temp file + rename)."""
    engine_dir = Path(engine_dir)
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", dir=engine_dir)
    with os.fdopen(fd, "w") as f:
        json.dump(manifest.to_json(), f, indent=2)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, engine_dir / MANIFEST_NAME)
    return engine_dir / MANIFEST_NAME


def read_manifest(engine_dir: str | Path, *, deep: bool = False) -> Manifest:
    """Read and check an engine directory's manifest; deep=True also re-hashes every artifact.
    A directory swapped by a build while it is read is read again (fsutil.read_stable)."""
    return read_stable(engine_dir, lambda: _read_manifest(Path(engine_dir), deep))


def rebuild_hint(engine_dir: Path, raw: Any) -> str:
    """How to rebuild this engine directory: its own source, precision and backend where the manifest
    says them; otherwise a build into another folder (a build never replaces a folder it cannot read)."""
    from ..config import PRESETS

    if isinstance(raw, dict) and all(isinstance(raw.get(k), str) for k in ("source", "precision", "backend")):
        src = raw["source"]
        given = (f"--size {src.lower()}" + ("" if src.lower() == "tiny" else " --random-weights")
                 if src.lower() in PRESETS else f"--model {shlex.quote(src)}")
        return (f"rebuild it with `nemodiff-compile build {given} --precision {raw['precision']} "
                f"--backend {raw['backend']} --output {shlex.quote(str(engine_dir))}`")
    return ("build the engine again into another folder (`nemodiff-compile build --model SOURCE "
            "--precision P --output NEW_DIR`)")


def _read_manifest(engine_dir: Path, deep: bool) -> Manifest:
    path = engine_dir / MANIFEST_NAME
    if not engine_dir.is_dir():
        raise EngineError(f"{engine_dir}: engine directory not found")
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise EngineError(f"{path}: missing; {engine_dir} is not an engine directory (give a folder that "
                          "`nemodiff-compile build` wrote)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EngineError(f"{path}: unreadable ({e}); {rebuild_hint(engine_dir, None)}") from None
    rebuild = rebuild_hint(engine_dir, raw)
    if not isinstance(raw, dict) or raw.get("checksum") != _checksum(raw):
        raise EngineError(f"{path}: edited or corrupted after the build (checksum mismatch); {rebuild}")
    if raw.get("format_version") != FORMAT_VERSION:
        raise EngineError(f"{path}: format version {raw.get('format_version')}, this nemodiff-compile reads "
                          f"{FORMAT_VERSION}; {rebuild}")
    raw.pop("checksum")
    try:
        manifest = Manifest(**raw)
    except TypeError as e:
        raise EngineError(f"{path}: unexpected fields ({e}); {rebuild}") from None
    _check_tools(path, manifest, rebuild)
    for name, want in manifest.artifacts.items():
        f = engine_dir / name
        if not f.is_file():
            raise EngineError(f"{f}: missing; {rebuild}")
        size = f.stat().st_size
        if size != want["bytes"]:
            raise EngineError(f"{f}: {size} bytes, the build wrote {want['bytes']} (truncated or replaced); {rebuild}")
        if deep and file_digest(f)["sha256"] != want["sha256"]:
            raise EngineError(f"{f}: content differs from the build (sha256 mismatch); {rebuild}")
    return manifest


def _check_tools(path: Path, manifest: Manifest, rebuild: str) -> None:
    from importlib.metadata import PackageNotFoundError, version

    for package, minimum in manifest.requires.items():
        try:
            have = version(package)
        except PackageNotFoundError:
            raise EngineError(f"{path}: needs {package} >= {minimum}, which is not installed "
                              f"(pip install 'nemodiff-compile[onnx]')") from None
        if _version_tuple(have) < _version_tuple(minimum):
            raise EngineError(f"{path}: needs {package} >= {minimum}, found {have}: upgrade {package} "
                              f"or {rebuild} under this one")


def _version_tuple(v: str) -> tuple[int, int, int]:
    """"1.18.0rc1" -> (1, 18, 0); "1.18" -> (1, 18, 0), so it equals "1.18.0". Numbers, not strings:
    "1.9" < "1.18". (Pre-release tags are ignored: 1.18.0rc1 counts as 1.18.0.)"""
    out = []
    for part in (v.split(".") + ["0", "0"])[:3]:
        digits = re.match(r"\d*", part).group()                       # leading digits: "0rc1" -> 0
        out.append(int(digits or 0))
    return tuple(out)


def _checksum(d: dict[str, Any]) -> str:
    body = {k: v for k, v in d.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
