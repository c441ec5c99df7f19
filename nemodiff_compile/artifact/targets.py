"""GPU targets (`sm90`, `sm89`, ...), the device description, and picking the engine for this GPU.

Stdlib only except `current_device`, which asks torch late; everything else takes a `DeviceInfo`,
so the selection is testable on CPU with a fake device. Rules (TensorRT engine compatibility docs):
a plan runs on the compute capability it was built for, under the exact TensorRT it was built with,
unless it was built version-compatible (then any later runtime, a later major included: TensorRT 11
runs version-compatible plans of 10) or with a hardware compatibility level (AMPERE_PLUS: any sm >= 80;
SAME_COMPUTE_CAPABILITY: the same sm). A default plan also runs on another GPU model of its compute
capability (H100 -> H200): allowed here; `backends.trt.select_plan` warns that its tactics were timed
elsewhere.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

from ..errors import InvalidArgument, NemodiffError

_TARGET = re.compile(r"^sm_?(\d)(\d+)$")


@dataclass(frozen=True)
class DeviceInfo:
    name: str                          # "NVIDIA H100 80GB HBM3"
    compute_capability: tuple[int, int]
    driver: str = "unknown"

    @property
    def target(self) -> str:
        return target_name(self.compute_capability)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def target_name(cc: tuple[int, int]) -> str:
    return f"sm{cc[0]}{cc[1]}"


def parse_target(text: str) -> tuple[int, int]:
    """'sm90' / 'sm_89' / '8.9' -> (major, minor)."""
    t = text.strip().lower()
    m = _TARGET.match(t)
    if m:
        return int(m.group(1)), int(m.group(2))
    m = re.match(r"^(\d+)\.(\d+)$", t)
    if m:
        return int(m.group(1)), int(m.group(2))
    raise InvalidArgument(f"--gpus {text!r}: expected a compute capability like sm90, sm89 or 8.6")


def parse_targets(text: str) -> tuple[str, ...]:
    out = []
    for part in text.split(","):
        if part.strip():
            name = target_name(parse_target(part))
            if name not in out:
                out.append(name)
    if not out:
        raise InvalidArgument(f"--gpus {text!r}: no target given")
    return tuple(out)


def current_device(index: int = 0) -> DeviceInfo | None:
    """This machine's GPU, or None without one (asks torch; no TensorRT needed)."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(index)
    return DeviceInfo(props.name, (props.major, props.minor), _driver_version())


def _driver_version() -> str:
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return "unknown"
    m = re.search(r"Kernel Module\s+(?:for \S+\s+)?([\d.]+)", text)
    return m.group(1) if m else "unknown"


def engine_file_name(target: str, flavor: str, version: str) -> str:
    """One file per (target, TensorRT) in the engine directory: engine.sm89.tensorrt_rtx-1.7.1.plan."""
    return f"engine.{target}.{flavor}-{'.'.join(version.split('.')[:3])}.plan"


def _major(v: str) -> int:
    return int(v.split(".")[0]) if v.split(".")[0].isdigit() else -1


def _vt(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", v)[:3])


def runs_on(entry: dict[str, Any], device: DeviceInfo, flavor: str, version: str) -> str | None:
    """None if `entry` (a manifest engine entry) runs here; else the reason in a few words."""
    if entry["trt_module"] != flavor:
        return f"built with {entry['trt_module']}, this runtime is {flavor}"
    if entry["trt_version"] != version:
        if not (entry.get("version_compatible") and _major(entry["trt_version"]) >= 10
                and _vt(version) >= _vt(entry["trt_version"])):
            return f"built with {flavor} {entry['trt_version']}, this is {version}"
    built = parse_target(entry["target"])
    level = entry.get("hardware_compatibility", "NONE")
    if level == "AMPERE_PLUS":
        return None if device.compute_capability >= (8, 0) else f"AMPERE_PLUS needs sm80+, this is {device.target}"
    if built != device.compute_capability:
        return f"built for {entry['target']}, this GPU is {device.target}"
    return None


def select_engine(entries: Iterable[dict[str, Any]], device: DeviceInfo | None, flavor: str, version: str,
                  engine_dir: str | Path = "the engine directory") -> dict[str, Any]:
    """The engine entry for this GPU and TensorRT, or a NemodiffError naming what to build."""
    entries = list(entries)
    if device is None:
        raise NemodiffError(f"{engine_dir}: no CUDA GPU visible, TensorRT engines need one "
                            "(use the onnxruntime backend on CPU)")
    exact = [e for e in entries if runs_on(e, device, flavor, version) is None]
    if exact:   # prefer an engine built for exactly this sm and TensorRT over a compatible one
        exact.sort(key=lambda e: (parse_target(e["target"]) != device.compute_capability,
                                  e["trt_version"] != version))
        return exact[0]
    have = ", ".join(f"{e['target']} ({e['trt_module']} {e['trt_version']})" for e in entries) or "none"
    raise NemodiffError(
        f"{engine_dir}: no TensorRT engine for this GPU ({device.name}, {device.target}, {flavor} {version}); "
        f"it has: {have}. Build one on this machine with `nemodiff-compile build --backend tensorrt "
        f"--gpus {device.target} --output {engine_dir}` (adds the target to the directory)")
