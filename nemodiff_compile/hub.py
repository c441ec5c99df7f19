"""Where a model comes from: the published checkpoints by size, any Hugging Face id, a local folder,
the embedded tiny model, or seeded random weights at a published geometry (timing builds).

    ref = model_ref(size="14b")            # no network, no weights: just what was asked for
    cfg, real = ref.config()               # its config.json (cached, or fetched alone), else the preset's
    source = ref.fetch()                   # a checkpoint folder (downloaded when needed) or a preset name

Hugging Face ids resolve through huggingface_hub: the local cache first (`HF_HUB_CACHE`), then a
download (config, weights, tokenizer and chat template, and the instruct repos' `linear_spec_lora/`
draft adapter; not the remote code, which nothing here runs). Offline (`HF_HUB_OFFLINE=1`, or the Hub
unreachable) a missing checkpoint is one line naming the download command. A checkpoint fetched by
`--size` must have that size's geometry. Stdlib at import (huggingface_hub inside the functions,
no torch: `info` uses this).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .config import PRESETS, ModelConfig
from .errors import CheckpointError, NemodiffError

# --size -> the published checkpoint (Hugging Face collection nvidia/nemotron-labs-diffusion)
PUBLISHED = {
    "3b": "nvidia/Nemotron-Labs-Diffusion-3B",
    "8b": "nvidia/Nemotron-Labs-Diffusion-8B",
    "14b": "nvidia/Nemotron-Labs-Diffusion-14B",
    "3b-base": "nvidia/Nemotron-Labs-Diffusion-3B-Base",
    "8b-base": "nvidia/Nemotron-Labs-Diffusion-8B-Base",
    "14b-base": "nvidia/Nemotron-Labs-Diffusion-14B-Base",
}
SIZES = ("tiny", *PUBLISHED)
# What a build reads from a repository (the draft LoRA's files match *.json / *.safetensors too).
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "linear_spec_lora/*"]
# config.json fields that make a checkpoint "the 8B" (the Base checkpoints may differ elsewhere:
# context length, YaRN factor, EOS; see docs/config_sources.md)
GEOMETRY = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim")
CONFIG_NAME, WEIGHTS_NAME, INDEX_NAME = "config.json", "model.safetensors", "model.safetensors.index.json"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelRef:
    """A model as asked for on the command line; `kind`: tiny | random | folder | hub."""

    kind: str
    name: str                         # engine directory names and logs
    flag: str                         # what the user typed, for error messages ("--size 14b")
    size: str | None = None           # the --size it came from (its geometry is checked)
    repo_id: str | None = None
    folder: Path | None = None

    @property
    def preset(self) -> ModelConfig | None:
        """The published geometry this source must have (None for --model)."""
        return PRESETS[self.size.removesuffix("-base")] if self.size else None

    def config(self) -> tuple[ModelConfig, bool]:
        """(config, True) read from the checkpoint itself, or (the preset, False) when the
        checkpoint is not at hand yet (a published size not downloaded, offline)."""
        if self.kind == "tiny":
            from . import TINY_ASSET

            if (TINY_ASSET / "config.json").is_file():
                return read_config(TINY_ASSET), True
            return PRESETS["tiny"], False
        if self.kind == "random":
            return self.preset, True
        if self.kind == "folder":
            return read_config(self.folder), True
        path = _cached_file(self.repo_id, "config.json")
        if path is None and not offline():
            path = _fetch_config(self.repo_id)
        if path is None:
            if self.preset is None:
                raise self.missing()
            return self.preset, False
        cfg = read_config(path.parent)
        self.check(cfg, path.parent)
        return cfg, True

    def cached(self) -> bool:
        """Whether fetch() has nothing to download."""
        return self.kind != "hub" or _cached_snapshot(self.repo_id) is not None

    def fetch(self, echo=None) -> str | Path:
        """What `load_reference` and `build_engine` take: a checkpoint folder, or the preset name
        ("tiny": the embedded model; "3b"/"8b"/"14b" with kind random: seeded random weights).
        Downloads a Hugging Face checkpoint that is not cached (progress on stderr)."""
        if self.kind in ("tiny", "random"):
            return self.size or "tiny"
        if self.kind == "folder":
            return self.folder
        folder = _cached_snapshot(self.repo_id)
        if folder is None:
            if offline():
                raise self.missing()
            folder = _download(self, echo)
        self.check(read_config(folder), folder)
        return folder

    def check(self, cfg: ModelConfig, where: Path) -> None:
        """Refuse a checkpoint fetched by --size whose geometry is not that size's."""
        want = self.preset
        if want is None:
            return
        diffs = [f"{f} {getattr(cfg, f)} (expected {getattr(want, f)})" for f in GEOMETRY
                 if getattr(cfg, f) != getattr(want, f)]
        if cfg.rope.rope_theta != want.rope.rope_theta:
            diffs.append(f"rope_theta {cfg.rope.rope_theta:g} (expected {want.rope.rope_theta:g})")
        if diffs:
            raise CheckpointError(f"{self.flag}: {where / 'config.json'} is not the {self.size} model: "
                                  + ", ".join(diffs))

    def download_command(self) -> str:
        return f"{hf_cli()} download {self.repo_id}"

    def missing(self, why: str | None = None) -> NemodiffError:
        """The one-line error for a checkpoint that is neither cached nor downloadable now."""
        why = why or ("the Hub cannot be reached (HF_HUB_OFFLINE is set)" if offline()
                      else "the Hub cannot be reached")
        size = ""
        if self.preset is not None:
            size = f" (about {self.preset.num_parameters() * 2 / 2**30:.0f} GiB)"
        alt = ", or --random-weights for a timing build" if self.size else ""
        return NemodiffError(f"{self.flag}: {self.repo_id} is not in the Hugging Face cache ({cache_dir()}) and "
                             f"{why}: download it with `{self.download_command()}`{size}, or pass --model DIR{alt}")


def model_ref(size: str | None = None, model: str | Path | None = None, random_weights: bool = False) -> ModelRef:
    """--size / --model ID_OR_DIR / --random-weights -> ModelRef (default: the embedded tiny model).
    Raises NemodiffError (one line) for unknown names, missing folders and bad combinations."""
    if size is not None and model is not None:
        raise NemodiffError("give either --size or --model (alias --checkpoint), not both")
    if model is not None:
        if random_weights:
            raise NemodiffError("--random-weights goes with --size 3b|8b|14b, not --model")
        text = str(model)
        path = Path(text).expanduser()
        if path.exists():
            if not path.is_dir():
                raise CheckpointError(f"--model {text}: a file, expected a checkpoint folder "
                                      "(config.json + *.safetensors) or a Hugging Face id")
            return ModelRef("folder", path.resolve().name, f"--model {text}", folder=path)
        if _REPO_ID.match(text) and not text.startswith(("./", "../")):
            return ModelRef("hub", text.split("/")[1], f"--model {text}", repo_id=text)
        raise CheckpointError(f"--model {text}: no such folder, and not a Hugging Face model id (org/name)")
    key = (size or "tiny").lower()
    if key not in SIZES:
        raise NemodiffError(f"--size: unknown size {size!r}, expected one of {', '.join(SIZES)}")
    if random_weights:
        if key not in ("3b", "8b", "14b"):
            raise NemodiffError(f"--random-weights: the published geometries are 3b, 8b and 14b, not {key!r}")
        return ModelRef("random", f"{key}-random", f"--size {key} --random-weights", size=key)
    if key == "tiny":
        return ModelRef("tiny", "tiny", "--size tiny")
    return ModelRef("hub", PUBLISHED[key].split("/")[1], f"--size {key}", size=key, repo_id=PUBLISHED[key])


def read_config(folder: Path) -> ModelConfig:
    """config.json of a checkpoint folder (model.checkpoint.read_config without importing torch)."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (every checkpoint folder needs a config.json)")
    return ModelConfig.from_file(path)


# ---- huggingface_hub -------------------------------------------------------------------------------

def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE), read now rather than at import."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if env is not None:
        return env.strip().upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE)


def cache_dir() -> str:
    """The hub cache in use: HF_HUB_CACHE, else HF_HOME/hub, else huggingface_hub's default."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def hf_cli() -> str:
    """The download command the installed huggingface_hub ships: `hf` (0.34 and later), else
    `huggingface-cli`."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        parts = version("huggingface_hub").split(".")[:2]
        newer = tuple(int(re.sub(r"\D.*", "", p) or 0) for p in parts) >= (0, 34)
    except (PackageNotFoundError, ValueError):
        newer = True
    return "hf" if newer else "huggingface-cli"


def _cached_file(repo_id: str, filename: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir())
    return Path(found) if isinstance(found, str) else None


def _cached_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot of refs/main, when it holds the config and every weight file."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS, local_files_only=True,
                                        cache_dir=cache_dir()))
    except (LocalEntryNotFoundError, IncompleteSnapshotError, FileNotFoundError):
        return None
    return folder if _complete(folder) else None


def _complete(folder: Path) -> bool:
    if not (folder / CONFIG_NAME).is_file():
        return False
    if (folder / WEIGHTS_NAME).is_file():
        return True
    index = folder / INDEX_NAME
    if not index.is_file():
        return False
    import json

    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError):
        return True              # a broken index: let the checkpoint loader say what is wrong
    return all((folder / s).is_file() for s in shards)


def _fetch_config(repo_id: str) -> Path | None:
    """config.json alone (a few KiB) so a build can plan before the weights come; None when the Hub
    cannot be reached. One API call first: it fails at once without a network, where a file
    download retries with backoff for ~20 s."""
    from huggingface_hub import HfApi, hf_hub_download

    try:
        sha = HfApi().model_info(repo_id, timeout=10).sha
        return Path(hf_hub_download(repo_id, "config.json", revision=sha, cache_dir=cache_dir()))
    except Exception as e:      # unreachable Hub, unknown repo, no access
        err = _hub_error(e)
        if err is None:
            return None
        raise NemodiffError(f"{repo_id}: {err}") from None


def _hub_error(e: Exception) -> NemodiffError | None:
    """A one-line error for a repository that exists nowhere or cannot be read; None for a network
    failure (the caller falls back to the cache or the offline message)."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    first = (str(e).strip().splitlines() or [""])[0]
    if isinstance(e, GatedRepoError):
        return NemodiffError(f"{getattr(e, 'repo_id', 'the repository')}: gated on the Hub; accept its licence "
                             f"on huggingface.co and log in (`{hf_cli()} auth login`)")
    if isinstance(e, (RepositoryNotFoundError, RevisionNotFoundError)):
        return NemodiffError(f"not a Hugging Face model repository you can read ({first})")
    if isinstance(e, HfHubHTTPError) and getattr(getattr(e, "response", None), "status_code", 0) in (401, 403, 404):
        return NemodiffError(f"the Hub refused the request ({first})")
    return None


def _download(ref: ModelRef, echo) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    from . import progress

    say = echo or (lambda msg: None)
    plain = progress.style() != "bar"
    say(f"downloading {ref.repo_id} into {cache_dir()}")
    if plain:                               # huggingface_hub's own tqdm bars on a terminal only
        disable_progress_bars()
    try:
        folder = Path(snapshot_download(ref.repo_id, allow_patterns=ALLOW_PATTERNS, cache_dir=cache_dir()))
    except Exception as e:
        err = _hub_error(e)
        if err is not None:
            raise NemodiffError(f"{ref.flag}: {err}") from None
        first = (str(e).strip().splitlines() or [""])[0]
        raise ref.missing(f"the download failed ({type(e).__name__}: {first[:160]})") from None
    finally:
        if plain:
            enable_progress_bars()
    if not _complete(folder):
        raise CheckpointError(f"{ref.flag}: {ref.repo_id} has no config.json and *.safetensors weights "
                              f"(downloaded to {folder})")
    say(f"downloaded {ref.repo_id} to {folder}")
    return folder
