"""Model sources by name (nemodiff_compile/hub.py) against a real Hugging Face cache layout made in a
temporary folder (HF_HUB_CACHE, HF_HUB_OFFLINE=1): ids resolve to their snapshot and build, a published
size that is not cached is one line with the download command, a wrong geometry is refused."""

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from nemodiff_compile import TINY_ASSET
from nemodiff_compile.cli import cli
from nemodiff_compile.hub import ALLOW_PATTERNS, PUBLISHED, model_ref

TRAINED = (TINY_ASSET / "config.json").is_file()
needs_tiny = pytest.mark.skipif(not TRAINED, reason="the trained tiny checkpoint is not in this build of the package")


def put_in_cache(cache: Path, repo_id: str, folder: Path) -> Path:
    """Store `folder` as the refs/main snapshot of `repo_id` the way huggingface_hub does:
    models--org--name/blobs/<hash> (content-addressed), snapshots/<commit>/<file> -> ../../blobs/<hash>,
    refs/main holding the commit. Returns the snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snap = repo / "snapshots" / commit
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / f.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snap


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(r, *needles):
    assert r.exit_code == 2, r.output
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in r.output, r.output
    for n in needles:
        assert n in last, (n, last)
    return last


def test_published_ids_and_patterns():
    from huggingface_hub.utils import filter_repo_objects

    assert PUBLISHED["14b"] == "nvidia/Nemotron-Labs-Diffusion-14B"
    assert PUBLISHED["3b-base"] == "nvidia/Nemotron-Labs-Diffusion-3B-Base"
    files = ["config.json", "generation_config.json", "model-00001-of-00004.safetensors", "tokenizer.json",
             "chat_template.jinja", "linear_spec_lora/adapter_config.json",
             "linear_spec_lora/adapter_model.safetensors", "modeling_nemotron_labs_diffusion.py", "README.md"]
    kept = set(filter_repo_objects(files, allow_patterns=ALLOW_PATTERNS))
    assert kept == set(files) - {"modeling_nemotron_labs_diffusion.py", "README.md"}   # the draft LoRA comes along


@needs_tiny
def test_cache_layout_is_huggingface_hubs(hf_cache):
    from huggingface_hub import scan_cache_dir, snapshot_download

    snap = put_in_cache(hf_cache, "nvidia-test/tiny-nld", TINY_ASSET)
    repos = {r.repo_id: r for r in scan_cache_dir(hf_cache).repos}
    (rev,) = repos["nvidia-test/tiny-nld"].revisions
    assert rev.commit_hash == snap.name and "main" in rev.refs and "model.safetensors" in {f.file_name for f in rev.files}
    assert Path(snapshot_download("nvidia-test/tiny-nld", local_files_only=True, cache_dir=hf_cache)) == snap
    ref = model_ref(model="nvidia-test/tiny-nld")
    assert (ref.kind, ref.name, ref.cached()) == ("hub", "tiny-nld", True)
    cfg, real = ref.config()
    assert real and cfg.hidden_size == 192
    assert ref.fetch() == snap


@needs_tiny
def test_model_id_resolves_to_its_snapshot_and_builds(hf_cache, tmp_path):
    pytest.importorskip("onnxruntime")
    from nemodiff_compile.pipeline import _weights_hash

    snap = put_in_cache(hf_cache, "nvidia-test/tiny-nld", TINY_ASSET)
    out = tmp_path / "engine"
    r = run("build", "--model", "nvidia-test/tiny-nld", "--no-validate", "--output", out)
    assert r.exit_code == 0, r.output
    assert "plan: fits this machine" in r.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["source"] == str(snap)
    assert m["weights_sha256"] == _weights_hash(TINY_ASSET, "tiny")          # the same bytes, read via the cache
    assert (out / "tokenizer.json").is_file() and (out / "model.onnx.data").is_file()
    # --checkpoint stays an alias of --model, for ids and folders alike
    r = run("info", "--checkpoint", "nvidia-test/tiny-nld", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["source"] == "nvidia-test/tiny-nld"


def _cli(env_extra: dict, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, "-m", "nemodiff_compile", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=120)


def test_published_size_not_cached_offline_is_one_line(hf_cache):
    """`build --size 14b --precision fp8` (and generate, validate --fast) with an empty cache and no
    network: one line naming the download command, exit 2, no traceback; build states its plan first,
    within seconds (a real process)."""
    for args in (("generate", "--size", "8b"), ("validate", "--fast", "--size", "8b"), ("build", "--size", "8b")):
        one_line_error(run(*args), "--size 8b: nvidia/Nemotron-Labs-Diffusion-8B is not in the Hugging Face cache",
                       "`hf download nvidia/Nemotron-Labs-Diffusion-8B`", "--random-weights")
    env = {"HF_HUB_CACHE": str(hf_cache), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    r = _cli(env, "build", "--size", "14b", "--precision", "fp8")
    seconds = time.perf_counter() - start
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: --size 14b: nvidia/Nemotron-Labs-Diffusion-14B is not in the Hugging Face cache")
    assert "`hf download nvidia/Nemotron-Labs-Diffusion-14B`" in lines[-1]
    plan = "\n".join(lines[:-1])
    assert "plan: 13.51 B parameters, checkpoint 25.2 GiB" in plan and "host RAM" in plan and "GPU memory" in plan
    assert seconds < 30, seconds                   # no download attempt, no retries
    # no HF_HUB_OFFLINE, but no Hub either (nothing listens there): the download fails at once, same line
    env = {"HF_HUB_CACHE": str(hf_cache), "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": ""}
    r = _cli(env, "generate", "--size", "8b")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --size 8b:") and "the download failed" in last and "`hf download" in last


@needs_tiny
def test_checkpoint_with_another_geometry_is_refused(hf_cache):
    put_in_cache(hf_cache, PUBLISHED["8b"], TINY_ASSET)          # the tiny model stored under the 8B's id
    for cmd in ("info", "generate", "build"):
        last = one_line_error(run(cmd, "--size", "8b"), "--size 8b:", "is not the 8b model",
                              "hidden_size 192 (expected 4096)", "num_hidden_layers 6 (expected 34)")
        assert "vocab_size 1024 (expected 131072)" in last


def test_random_weights_is_the_published_geometry():
    from nemodiff_compile.config import PRESETS

    r = run("info", "--size", "3b", "--random-weights", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["config"]["hidden_size"] == PRESETS["3b"].hidden_size and d["cached"] and d["download_command"] is None
    plan = d["build_plans"]["fp8"]
    ckpt = PRESETS["3b"].num_parameters() * 2                     # bf16 as published
    assert plan["checkpoint_bytes"] == ckpt and plan["download_bytes"] == 0
    assert ckpt < plan["host_build_bytes"] < 1.25 * ckpt           # the weights once + libraries + working set


def test_random_weights_builds(monkeypatch, tmp_path):
    """`--size 3b --random-weights` builds the seeded random-weight model through the real pipeline;
    the 3B geometry is swapped for the tiny one here so that it takes seconds."""
    pytest.importorskip("onnxruntime")
    from nemodiff_compile.config import PRESETS

    monkeypatch.setitem(PRESETS, "3b", PRESETS["tiny"])
    out = tmp_path / "rand"
    r = run("build", "--size", "3b", "--random-weights", "--no-validate", "--output", out)
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["source"] == "3b" and m["weights_sha256"] == "random-weights:3b:seed0"
    assert m["model_config"]["hidden_size"] == PRESETS["tiny"].hidden_size
    assert not (out / "tokenizer.json").exists()


def test_bad_model_sources_are_one_line(tmp_path):
    cases = [
        (("info", "--size", "3b", "--model", "org/x"), "not both"),
        (("info", "--size", "tiny", "--random-weights"), "--random-weights"),
        (("info", "--model", "org/x", "--random-weights"), "--random-weights"),
        (("info", "--size", "7b"), "unknown size"),
        (("info", "--model", tmp_path / "nowhere"), "no such folder"),
        (("info", "--model", tmp_path), "config.json"),
    ]
    for args, needle in cases:
        one_line_error(run(*args), needle)
