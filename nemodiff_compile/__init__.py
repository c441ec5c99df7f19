"""nemodiff-compile: compile and run NVIDIA Nemotron-Labs-Diffusion language models fast.

`import nemodiff_compile` stays light (stdlib only): torch and friends load inside the functions
that need them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import PRESETS, ModelConfig, preset
from .errors import CheckpointError, ConfigError, NemodiffError

if TYPE_CHECKING:  # pragma: no cover
    from .model.model import NemotronLabsDiffusion

__version__ = "0.1.0"

# The trained tiny checkpoint shipped inside the package (tests and the demo).
TINY_ASSET = Path(__file__).parent / "assets" / "tiny"


def checkpoint_folder(path_or_preset: str | Path) -> Path | None:
    """The folder a source loads from: the folder itself, the embedded tiny checkpoint for "tiny",
    or None for the random-weight presets (same precedence as `load_reference`)."""
    if isinstance(path_or_preset, str) and path_or_preset.lower() in PRESETS:
        tiny = path_or_preset.lower() == "tiny" and (TINY_ASSET / "config.json").is_file()
        return TINY_ASSET if tiny else None
    return Path(path_or_preset)


def load_reference(path_or_preset: str | Path, dtype: Any = None, device: Any = "cpu", seed: int = 0,
                   *, lora: str | None = None) -> "NemotronLabsDiffusion":
    """The PyTorch reference model, in eval mode.

    path_or_preset: a checkpoint folder (loaded with `load_checkpoint`; `lora` as there), or a
    preset name: "3b" / "8b" / "14b" give the published geometry with seeded random weights
    (N(0, 0.02), norms 1; for timing, not for text), "tiny" the trained checkpoint shipped in
    nemodiff_compile/assets/tiny/ (seeded random weights when the package was built without it).
    A preset name wins over a folder of the same name: write ./3b to load such a folder.
    dtype: "bfloat16" / "float16" / "float32" or a torch dtype; default the config's.
    """
    from .model.checkpoint import load_checkpoint, random_model

    if isinstance(path_or_preset, str) and path_or_preset.lower() in PRESETS:
        name = path_or_preset.lower()
        if name == "tiny" and (TINY_ASSET / "config.json").is_file():
            return load_checkpoint(TINY_ASSET, dtype=dtype, device=device, lora=lora)
        return random_model(PRESETS[name], dtype=dtype, device=device, seed=seed)
    return load_checkpoint(path_or_preset, dtype=dtype, device=device, lora=lora)


__all__ = [
    "PRESETS", "ModelConfig", "preset", "load_reference", "checkpoint_folder", "NemodiffError", "ConfigError",
    "CheckpointError", "TINY_ASSET", "__version__",
]
