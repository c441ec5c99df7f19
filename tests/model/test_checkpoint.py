"""Checkpoint IO: save/load round trips, one-line errors for every broken-checkpoint case, the draft
LoRA (PEFT layout), random-weight presets and `load_reference`."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from nemodiff_compile import load_reference
from nemodiff_compile.config import PRESETS, PUBLISHED_PARAMS, ModelConfig
from nemodiff_compile.errors import CheckpointError, ConfigError, NemodiffError
from nemodiff_compile.model import NemotronLabsDiffusion
from nemodiff_compile.model.checkpoint import (
    INDEX_NAME, LORA_DIR, WEIGHTS_NAME, load_checkpoint, load_draft_lora, meta_model, random_model,
    read_draft_lora, save_checkpoint, save_draft_lora,
)

TINY = PRESETS["tiny"]
EMBED = "encoder.embed_tokens.weight"
O_PROJ = "encoder.layers.3.self_attn.o_proj.weight"


@pytest.fixture
def model():
    return random_model(TINY, seed=1, std=0.05)


@pytest.fixture
def ckpt(tmp_path, model):
    return save_checkpoint(model, tmp_path / "ckpt")


def _ids(n=20, seed=3):
    return torch.randint(0, TINY.vocab_size, (2, n), generator=torch.Generator().manual_seed(seed))


def _raises(exc, fn, *needles):
    """fn() raises `exc` with a one-line message containing every needle; returns the message."""
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert str(needle) in msg, msg
    return msg


def _rewrite(path, edit):
    """Apply `edit(dict of tensors)` to a safetensors file in place."""
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _lora_factors(cfg, r=4, seed=5):
    g = torch.Generator().manual_seed(seed)
    a = [torch.randn(r, cfg.q_width, generator=g) * 0.1 for _ in range(cfg.num_hidden_layers)]
    b = [torch.randn(cfg.hidden_size, r, generator=g) * 0.1 for _ in range(cfg.num_hidden_layers)]
    return a, b


# ---- round trips ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_round_trip(tmp_path, model, dtype):
    path = save_checkpoint(model, tmp_path / dtype, dtype=dtype)
    loaded = load_checkpoint(path)
    torch_dtype = getattr(torch, dtype)
    assert loaded.dtype == torch_dtype and loaded.config.dtype == dtype
    assert loaded.config == TINY.replace(dtype=dtype)
    assert not loaded.training
    got = loaded.state_dict()
    assert got.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert got[k].device.type == "cpu" and got[k].dtype == torch_dtype
        assert torch.equal(got[k], v.to(torch_dtype)), k


def test_load_converts_dtype(tmp_path, model):
    path = save_checkpoint(model, tmp_path / "bf16", dtype="bfloat16")
    loaded = load_checkpoint(path, dtype="float32")
    assert loaded.dtype == torch.float32
    assert torch.equal(loaded.encoder.embed_tokens.weight, model.encoder.embed_tokens.weight.bfloat16().float())
    assert load_checkpoint(path, dtype=torch.float16).dtype == torch.float16


def test_sharded_round_trip(tmp_path, model):
    path = save_checkpoint(model, tmp_path / "sharded", max_shard_bytes=300_000)
    shards = sorted(p.name for p in path.glob("model-*.safetensors"))
    assert len(shards) > 3 and not (path / WEIGHTS_NAME).exists()
    index = json.loads((path / INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    loaded = load_checkpoint(path)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with torch.no_grad():
        torch.testing.assert_close(loaded(_ids()), model(_ids()), rtol=0, atol=0)


def test_save_is_readable_and_replaces(tmp_path, model):
    path = save_checkpoint(model, tmp_path / "ckpt")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o777 & ~umask      # not mkdtemp's 0700
    (path / "stale.txt").write_text("old")
    save_checkpoint(model, path)
    assert not (path / "stale.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp folder left


def test_mapped_weights_are_private(ckpt, model):
    """Same-dtype loads are copy-on-write views of the file: edits stay in memory, and saving onto
    the source folder (new folder + rename) leaves the live model readable."""
    loaded = load_checkpoint(ckpt)
    with torch.no_grad():
        loaded.encoder.embed_tokens.weight.add_(1.0)
    on_disk = load_file(ckpt / WEIGHTS_NAME)[EMBED]
    assert torch.equal(on_disk, model.encoder.embed_tokens.weight)
    save_checkpoint(loaded, ckpt)
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(ckpt)(_ids()), loaded(_ids()), rtol=0, atol=0)


@pytest.mark.parametrize("size", ["3b", "8b", "14b"])
def test_meta_param_counts(size):
    cfg = PRESETS[size]
    with torch.device("meta"):
        m = NemotronLabsDiffusion(cfg)
    n = sum(p.numel() for p in m.parameters())
    assert n == cfg.num_parameters()
    assert abs(n / PUBLISHED_PARAMS[size] - 1) < 0.005
    assert sum(p.numel() for p in meta_model(cfg).parameters()) == n


# ---- broken checkpoints: one line naming the file (and tensor) ------------------------------------

def test_missing_folder(tmp_path):
    _raises(CheckpointError, lambda: load_checkpoint(tmp_path / "nope"), tmp_path / "nope", "not found")


def test_path_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    _raises(CheckpointError, lambda: load_checkpoint(tmp_path / "f"), tmp_path / "f", "folder")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    _raises(CheckpointError, lambda: load_checkpoint(ckpt), ckpt / "config.json", "not found")


def test_invalid_config_json(ckpt):
    (ckpt / "config.json").write_text('{"vocab_size": 1024,')
    _raises(ConfigError, lambda: load_checkpoint(ckpt), ckpt / "config.json", "not valid JSON")


def test_missing_weights(ckpt):
    (ckpt / WEIGHTS_NAME).unlink()
    _raises(CheckpointError, lambda: load_checkpoint(ckpt), ckpt, WEIGHTS_NAME, INDEX_NAME)


def test_bin_checkpoint_hint(ckpt):
    (ckpt / WEIGHTS_NAME).rename(ckpt / "pytorch_model.bin")
    _raises(CheckpointError, lambda: load_checkpoint(ckpt), "pytorch_model.bin", "not supported")


def test_index_names_missing_shard(tmp_path, model):
    path = save_checkpoint(model, tmp_path / "s", max_shard_bytes=300_000)
    shard = "model-00002-of-" + sorted(path.glob("model-*"))[0].name.split("-of-")[1]
    (path / shard).unlink()
    _raises(CheckpointError, lambda: load_checkpoint(path), path / INDEX_NAME, shard, "not found")


def test_broken_index_json(tmp_path, model):
    path = save_checkpoint(model, tmp_path / "s", max_shard_bytes=300_000)
    (path / INDEX_NAME).write_text('{"weight_map": {')
    _raises(CheckpointError, lambda: load_checkpoint(path), path / INDEX_NAME, "not valid JSON")
    (path / INDEX_NAME).write_text('{"weight_map": ["a"]}')
    _raises(CheckpointError, lambda: load_checkpoint(path), path / INDEX_NAME, "weight_map")
    (path / INDEX_NAME).write_text(json.dumps({"weight_map": {EMBED: "../elsewhere.safetensors"}}))
    _raises(CheckpointError, lambda: load_checkpoint(path), path / INDEX_NAME, EMBED, "inside the folder")


def test_index_and_shard_disagree(tmp_path, model):
    path = save_checkpoint(model, tmp_path / "s", max_shard_bytes=300_000)
    index = json.loads((path / INDEX_NAME).read_text())
    shard = index["weight_map"][O_PROJ]
    other = next(s for s in index["weight_map"].values() if s != shard)
    index["weight_map"][O_PROJ] = other             # index points at the wrong shard
    (path / INDEX_NAME).write_text(json.dumps(index))
    _raises(CheckpointError, lambda: load_checkpoint(path), path / other, O_PROJ, "missing")
    del index["weight_map"][O_PROJ]                 # shard holds a tensor the index does not list
    (path / INDEX_NAME).write_text(json.dumps(index))
    _raises(CheckpointError, lambda: load_checkpoint(path), path / shard, O_PROJ, "not listed")


def test_missing_tensor(ckpt):
    _rewrite(ckpt / WEIGHTS_NAME, lambda t: t.pop(O_PROJ))
    _raises(CheckpointError, lambda: load_checkpoint(ckpt), ckpt / WEIGHTS_NAME, "missing tensor", O_PROJ)


def test_missing_tensor_sharded(tmp_path, model):
    path = save_checkpoint(model, tmp_path / "s", max_shard_bytes=300_000)
    index = json.loads((path / INDEX_NAME).read_text())
    shard = index["weight_map"].pop(O_PROJ)
    (path / INDEX_NAME).write_text(json.dumps(index))
    _rewrite(path / shard, lambda t: t.pop(O_PROJ))
    _raises(CheckpointError, lambda: load_checkpoint(path), path / INDEX_NAME, "missing tensor", O_PROJ)


def test_renamed_tensors(ckpt):
    """A checkpoint with other names (transformers' Ministral: model.* instead of encoder.*)."""
    _rewrite(ckpt / WEIGHTS_NAME,
             lambda t: t.update({k.replace("encoder.", "model.", 1): t.pop(k) for k in list(t) if "encoder." in k}))
    _raises(CheckpointError, lambda: load_checkpoint(ckpt), ckpt / WEIGHTS_NAME, "missing tensor encoder.",
            "and 55 more", "unexpected tensor model.")


def test_unexpected_tensor(ckpt):
    extra = "encoder.layers.6.self_attn.q_proj.weight"      # a 7th layer in a 6-layer config
    _rewrite(ckpt / WEIGHTS_NAME, lambda t: t.update({extra: torch.zeros(256, 192)}))
    _raises(CheckpointError, lambda: load_checkpoint(ckpt), ckpt / WEIGHTS_NAME, "unexpected tensor", extra)


def test_wrong_shape(ckpt):
    _rewrite(ckpt / WEIGHTS_NAME, lambda t: t.update({EMBED: t[EMBED][:, :191].contiguous()}))
    _raises(CheckpointError, lambda: load_checkpoint(ckpt), ckpt / WEIGHTS_NAME, EMBED,
            "expected [1024, 192], found [1024, 191]")


@pytest.mark.parametrize("bad, code", [(torch.int64, "I64"), (torch.float8_e4m3fn, "F8_E4M3")])
def test_wrong_dtype(ckpt, bad, code):
    _rewrite(ckpt / WEIGHTS_NAME, lambda t: t.update({O_PROJ: t[O_PROJ].to(bad)}))
    _raises(CheckpointError, lambda: load_checkpoint(ckpt), ckpt / WEIGHTS_NAME, O_PROJ, code,
            "expected a float tensor")


def test_truncated_file(ckpt):
    data = (ckpt / WEIGHTS_NAME).read_bytes()
    (ckpt / WEIGHTS_NAME).write_bytes(data[: len(data) - 1000])
    _raises(CheckpointError, lambda: load_checkpoint(ckpt), ckpt / WEIGHTS_NAME, "truncated or corrupt")


@pytest.mark.parametrize("data", [b"junk", (64).to_bytes(8, "little") + b"{not json" + b" " * 55])
def test_corrupt_header(ckpt, data):
    (ckpt / WEIGHTS_NAME).write_bytes(data)
    _raises(CheckpointError, lambda: load_checkpoint(ckpt), ckpt / WEIGHTS_NAME, "truncated or corrupt")


# ---- config.json ----------------------------------------------------------------------------------

def _edit_config(ckpt, edit):
    raw = json.loads((ckpt / "config.json").read_text())
    edit(raw)
    (ckpt / "config.json").write_text(json.dumps(raw))


def test_config_missing_field(ckpt):
    _edit_config(ckpt, lambda c: c.pop("hidden_size"))
    _raises(ConfigError, lambda: load_checkpoint(ckpt), ckpt / "config.json", "hidden_size")


def test_config_inconsistent_heads(ckpt):
    _edit_config(ckpt, lambda c: c.update(num_key_value_heads=3))
    _raises(ConfigError, lambda: load_checkpoint(ckpt), ckpt / "config.json", "num_key_value_heads")


def test_config_disagrees_with_weights(ckpt):
    _edit_config(ckpt, lambda c: c.update(intermediate_size=500))
    _raises(CheckpointError, lambda: load_checkpoint(ckpt), ckpt / WEIGHTS_NAME, "mlp",
            "expected [500, 192], found [512, 192]")


def test_config_extra_fields_kept(tmp_path, ckpt):
    _edit_config(ckpt, lambda c: (c.update(my_training_flag={"a": [1, 2]}, transformers_version="5.0.0"),
                                  c["rope_parameters"].update(truncate=True)))
    loaded = load_checkpoint(ckpt)
    assert loaded.config.extra["my_training_flag"] == {"a": [1, 2]}
    out = save_checkpoint(loaded, tmp_path / "again")
    raw = json.loads((out / "config.json").read_text())
    assert raw["my_training_flag"] == {"a": [1, 2]} and raw["transformers_version"] == "5.0.0"
    assert raw["rope_parameters"]["truncate"] is True
    assert raw["auto_map"] == TINY.extra["auto_map"]
    assert ModelConfig.from_hf(raw) == TINY


# ---- draft LoRA -----------------------------------------------------------------------------------

def test_lora_files_round_trip(tmp_path):
    a, b = _lora_factors(TINY)
    folder = save_draft_lora(tmp_path / LORA_DIR, a, b, alpha=16)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 16 and cfg["target_modules"] == ["o_proj"]
    keys = load_file(folder / "adapter_model.safetensors").keys()
    assert "base_model.model.encoder.layers.5.self_attn.o_proj.lora_B.weight" in keys and len(keys) == 12
    a2, b2, scale = read_draft_lora(folder, TINY)
    assert scale == 4.0
    for x, y in zip(a + b, a2 + b2):
        assert torch.equal(x, y)


def test_lora_toggle_and_merge(ckpt, model):
    a, b = _lora_factors(TINY)
    save_draft_lora(ckpt / LORA_DIR, a, b, alpha=8)
    ids = _ids()
    with torch.no_grad():
        base = model(ids)
        toggled = load_checkpoint(ckpt)                    # default: toggle, since the folder exists
        assert toggled.has_draft_lora
        off = toggled(ids, draft_lora=False)
        on = toggled(ids, draft_lora=True)
        merged = load_checkpoint(ckpt, lora="merge")
        assert not merged.has_draft_lora
        merged_out = merged(ids, draft_lora=False)
        ignored = load_checkpoint(ckpt, lora="off")
        assert not ignored.has_draft_lora
    torch.testing.assert_close(off, base, rtol=0, atol=0)
    assert (on - base).abs().max() > 1e-3
    torch.testing.assert_close(merged_out, on, rtol=1e-4, atol=1e-5)


def test_lora_attached_is_saved(tmp_path, model):
    a, b = _lora_factors(TINY, r=2)
    model.set_draft_lora(a, b, scale=3.0)
    path = save_checkpoint(model, tmp_path / "with_lora")
    loaded = load_checkpoint(path)
    assert loaded.has_draft_lora and loaded.encoder.layers[0].self_attn.lora_scale == 3.0
    with torch.no_grad():
        torch.testing.assert_close(loaded(_ids(), draft_lora=True), model(_ids(), draft_lora=True),
                                   rtol=0, atol=0)


def test_lora_mode_errors(ckpt):
    _raises(CheckpointError, lambda: load_checkpoint(ckpt, lora="toggle"), ckpt / LORA_DIR, "not found")
    _raises(NemodiffError, lambda: load_checkpoint(ckpt, lora="on"), "lora", "toggle, merge, off")


def _bad_lora(ckpt, model, config_edit=None, weights_edit=None):
    a, b = _lora_factors(TINY)
    folder = save_draft_lora(ckpt / LORA_DIR, a, b, alpha=8)
    if config_edit:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        config_edit(cfg)
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
    if weights_edit:
        _rewrite(folder / "adapter_model.safetensors", weights_edit)
    return folder


def test_lora_wrong_shape(ckpt, model):
    key = "base_model.model.encoder.layers.2.self_attn.o_proj.lora_A.weight"
    folder = _bad_lora(ckpt, model, weights_edit=lambda t: t.update({key: torch.zeros(4, 192)}))
    _raises(CheckpointError, lambda: load_checkpoint(ckpt), folder / "adapter_model.safetensors", key,
            "expected [4, 256], found [4, 192]")
    _raises(CheckpointError, lambda: load_draft_lora(model, folder), key)


def test_lora_missing_tensor(ckpt, model):
    key = "base_model.model.encoder.layers.5.self_attn.o_proj.lora_B.weight"
    folder = _bad_lora(ckpt, model, weights_edit=lambda t: t.pop(key))
    _raises(CheckpointError, lambda: load_checkpoint(ckpt), folder / "adapter_model.safetensors", key, "missing")


@pytest.mark.parametrize("edit, needle", [
    (lambda c: c.update(target_modules=["q_proj", "o_proj"]), "target_modules"),
    (lambda c: c.update(r=0), "r must be"),
    (lambda c: c.update(use_dora=True), "use_dora"),
    (lambda c: c.update(layers_to_transform=[0, 1]), "layers_to_transform"),
])
def test_lora_bad_config(ckpt, model, edit, needle):
    folder = _bad_lora(ckpt, model, config_edit=edit)
    _raises(CheckpointError, lambda: load_checkpoint(ckpt), folder / "adapter_config.json", needle)


def test_lora_rslora_scale(ckpt, model):
    folder = _bad_lora(ckpt, model, config_edit=lambda c: c.update(use_rslora=True))
    assert load_draft_lora(model, folder) == 8 / 2


def test_lora_missing_files(ckpt, model):
    folder = _bad_lora(ckpt, model)
    (folder / "adapter_model.safetensors").unlink()
    _raises(CheckpointError, lambda: load_checkpoint(ckpt), folder / "adapter_model.safetensors", "not found")
    (folder / "adapter_config.json").write_text("{")
    _raises(CheckpointError, lambda: load_checkpoint(ckpt), folder / "adapter_config.json", "not valid JSON")


# ---- random presets, load_reference, import hygiene ----------------------------------------------

def test_random_model_seeded():
    m1 = random_model(TINY, seed=7)
    m2 = random_model(TINY, seed=7, dtype="bfloat16")
    m3 = random_model(TINY, seed=8)
    w1 = m1.encoder.layers[0].mlp.up_proj.weight
    assert torch.equal(w1, random_model(TINY, seed=7).encoder.layers[0].mlp.up_proj.weight)
    assert not torch.equal(w1, m3.encoder.layers[0].mlp.up_proj.weight)
    assert abs(w1.std().item() - 0.02) < 0.002
    assert m2.dtype == torch.bfloat16
    assert torch.equal(m1.encoder.norm.weight, torch.ones(TINY.hidden_size))
    assert all(p.device.type == "cpu" for p in m1.parameters())


def test_load_reference(ckpt, model):
    loaded = load_reference(str(ckpt), dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16
    assert torch.equal(loaded.diffusion_head.weight, model.diffusion_head.weight.bfloat16())
    tiny = load_reference("tiny")
    assert tiny.config.hidden_size == TINY.hidden_size and not tiny.training
    _raises(CheckpointError, lambda: load_reference("no-such-preset-or-folder"), "no-such-preset-or-folder")


def test_import_does_not_load_torch():
    code = "import nemodiff_compile, sys; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
