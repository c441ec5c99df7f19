"""The vision tower + projector (model/vision.py) against transformers' own PixtralVisionModel and Mistral3
projector with the same weights (fp32, 1e-5), on image sizes that are not multiples of the patch grid, and
the tiny VLM checkpoint loading through the real loading code."""

import pytest
import torch

from nemodiff_compile.config import ModelConfig
from nemodiff_compile.errors import CheckpointError, ConfigError
from nemodiff_compile.model.vision import NemotronLabsDiffusionVLM, rope_2d
from nemodiff_compile.model.vision_config import VisionConfig

from conftest import TINY_VISION_CONFIG, tiny_vlm_config_dict

transformers = pytest.importorskip("transformers")

SIZES = [(75, 101), (44, 130)]          # patch 14: grids 5x7 and 3x9 (odd: the merger drops a row/column)


@pytest.fixture(scope="module")
def vlm():
    torch.manual_seed(1)
    m = NemotronLabsDiffusionVLM(ModelConfig.from_hf(tiny_vlm_config_dict())).eval()
    with torch.no_grad():                                   # non-trivial norms so a swapped norm shows
        for name, p in m.named_parameters():
            if "vision_tower" in name or "multi_modal_projector" in name:
                p.add_(torch.randn_like(p) * 0.1) if "norm" in name else p.normal_(0, 0.2)
    return m


def hf_oracle(vlm):
    from transformers import Mistral3Config, PixtralVisionConfig, PixtralVisionModel
    from transformers.models.mistral3.modeling_mistral3 import Mistral3MultiModalProjector

    vc = {k: v for k, v in TINY_VISION_CONFIG.items() if k not in ("model_type", "rope_theta")}
    vcfg = PixtralVisionConfig(**vc, rope_parameters={"rope_type": "axial", "rope_theta": 10000.0})
    vcfg._attn_implementation = "eager"
    cfg = Mistral3Config(vision_config=vcfg, text_config={"model_type": "ministral", "hidden_size": 192,
                                                          "rms_norm_eps": 1e-5},
                         spatial_merge_size=2, projector_hidden_act="gelu", multimodal_projector_bias=False)
    tower, proj = PixtralVisionModel(vcfg).eval(), Mistral3MultiModalProjector(cfg).eval()
    sd = vlm.state_dict()
    for mod, prefix in ((tower, "encoder.vision_tower."), (proj, "encoder.multi_modal_projector.")):
        mod.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, strict=True)
    return tower, proj


def test_tower_and_projector_equal_transformers(vlm):
    tower, proj = hf_oracle(vlm)
    torch.manual_seed(2)
    images = [torch.randn(3, h, w) for h, w in SIZES]
    # transformers packs both images into one padded batch (block-diagonal attention); ours runs each alone
    H, W = max(h for h, _ in SIZES), max(w for _, w in SIZES)
    pixels = torch.zeros(2, 3, H, W)
    for i, im in enumerate(images):
        pixels[i, :, : im.shape[1], : im.shape[2]] = im
    with torch.no_grad():
        hs = tower(pixels, image_sizes=torch.tensor(SIZES), output_hidden_states=True).hidden_states[-1]
        ref = proj(hs.squeeze(0), torch.tensor(SIZES))                              # [sum tokens, 192]
        ours = [vlm.image_features(im) for im in images]
    assert [o.shape[0] for o in ours] == [(h // 28) * (w // 28) for h, w in SIZES] == [6, 4]
    torch.testing.assert_close(torch.cat(ours), ref, rtol=1e-5, atol=1e-5)
    assert ref.abs().max() > 1e-2                                                   # not a vacuous zero


def test_rope_2d_rows_and_columns():
    cfg = VisionConfig.of(ModelConfig.from_hf(tiny_vlm_config_dict()))
    cos, sin = rope_2d(cfg, 2, 3)
    # patch (0, 0) has angle 0 everywhere; patch (1, 0) differs from (0, 0) only on the row quarter (and its copy)
    assert torch.equal(cos[0], torch.ones(16))
    q = cfg.head_dim // 4
    assert not torch.allclose(sin[3, :q], torch.zeros(q)) and torch.equal(sin[3, q: 2 * q], torch.zeros(q))
    assert torch.equal(sin[1, :q], torch.zeros(q)) and not torch.allclose(sin[1, q: 2 * q], torch.zeros(q))


def test_tiny_vlm_checkpoint_loads_through_the_real_code(tiny_vlm_dir):
    from nemodiff_compile import load_reference
    from nemodiff_compile.model.checkpoint import load_checkpoint

    m = load_reference(tiny_vlm_dir, dtype="float32")
    assert isinstance(m, NemotronLabsDiffusionVLM) and m.config.is_vlm
    assert any(k.startswith("encoder.vision_tower.transformer.layers.1.attention.q_proj") for k in m.state_dict())
    assert m.config.to_hf()["model_type"] == "nemotron_labs_diffusion_vlm"
    text = load_checkpoint(__import__("nemodiff_compile").TINY_ASSET, dtype="float32")
    torch.testing.assert_close(m.diffusion_head.weight, text.diffusion_head.weight)


def test_vlm_checkpoint_missing_a_vision_tensor_is_one_line(tiny_vlm_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from nemodiff_compile.model.checkpoint import load_checkpoint

    bad = tmp_path / "bad"
    bad.mkdir()
    for f in tiny_vlm_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    sd = load_file(bad / "model.safetensors")
    del sd["encoder.multi_modal_projector.linear_2.weight"]
    save_file(sd, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensor encoder.multi_modal_projector.linear_2.weight"):
        load_checkpoint(bad)


def test_vision_config_errors_name_the_field():
    raw = tiny_vlm_config_dict()
    del raw["vision_config"]
    with pytest.raises(ConfigError, match="vision_config"):
        VisionConfig.of(ModelConfig.from_hf(raw))
    raw = tiny_vlm_config_dict()
    raw["vision_feature_layer"] = -2
    with pytest.raises(ConfigError, match="vision_feature_layer"):
        VisionConfig.of(ModelConfig.from_hf(raw))
