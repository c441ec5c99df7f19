import os

import pytest
import torch

from nemodiff_compile.config import PRESETS

# Triton's CPU interpreter runs the kernel tests where there is no GPU. Triton reads TRITON_INTERPRET once,
# when first imported, and any test module may import it first (transformers does), so it is set here,
# before the test modules are collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_cfg():
    return PRESETS["tiny"]


@pytest.fixture(scope="session")
def quantized_linears(tiny_cfg):
    """precision -> how many of the tiny model's Linear layers its recipe quantizes: the decoder
    projections outside the recipe's kept first/last layers, never the diffusion head. Tests count Q/DQ
    nodes and float MatMuls against this rather than a number that changes with the recipe."""
    from nemodiff_compile.model import NemotronLabsDiffusion
    from nemodiff_compile.quant import recipe_for
    from nemodiff_compile.quant.ptq import linear_names

    names = linear_names(NemotronLabsDiffusion(tiny_cfg))
    n = tiny_cfg.num_hidden_layers
    return lambda precision, **kw: sum(not recipe_for(precision, **kw).high_precision(nm, n) for nm in names)


@pytest.fixture(scope="session")
def random_tiny(tiny_cfg):
    """The tiny geometry with seeded random weights (std 0.05: peaked enough to exercise the rules)."""
    from nemodiff_compile.model import NemotronLabsDiffusion

    torch.manual_seed(0)
    m = NemotronLabsDiffusion(tiny_cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.05)
    return m


@pytest.fixture(scope="session")
def tiny_engine(tmp_path_factory):
    """The embedded tiny model built into an engine directory (with logits, not validated)."""
    pytest.importorskip("onnxruntime")
    from nemodiff_compile.build_config import BuildConfig
    from nemodiff_compile.pipeline import build_engine

    out = tmp_path_factory.mktemp("engines") / "tiny-fp32"
    return build_engine(BuildConfig.of(source="tiny", output=out, backend="onnxruntime", with_logits=True,
                                       validate=False))


# ---- TensorRT (tensorrt_rtx ahead-of-time builds on CPU): one build per precision per session ----

RTX_REASON = "needs tensorrt_rtx (pip install tensorrt-rtx): CPU ahead-of-time TensorRT builds"


@pytest.fixture(scope="session")
def rtx():
    return pytest.importorskip("tensorrt_rtx", reason=RTX_REASON)


def _trt_build(tmp_path_factory, name, **kw):
    from nemodiff_compile.build_config import BuildConfig
    from nemodiff_compile.pipeline import build_engine

    out = tmp_path_factory.mktemp("trt") / name
    return build_engine(BuildConfig.of(source="tiny", output=out, backend="tensorrt", gpus=("sm89",), validate=False,
                                       batch_sizes=(1, 2), max_context=128, **kw))


@pytest.fixture(scope="session")
def trt_fp32_dir(rtx, tmp_path_factory):
    """fp32 graph with the remask stage in standard ops, built for sm89."""
    return _trt_build(tmp_path_factory, "tiny-fp32-trt", precision="fp32", remask="onnx")


@pytest.fixture(scope="session")
def trt_fp16_dir(rtx, tmp_path_factory):
    """fp16 graph with the top-k remask stage in standard ops, built for sm89."""
    return _trt_build(tmp_path_factory, "tiny-fp16-trt", precision="fp16", remask="onnx", remask_threshold=None)


@pytest.fixture(scope="session")
def fp8_remask_dir(tmp_path_factory):
    """fp8 Q/DQ graph with the remask stage in standard ops (ONNX Runtime directory, short calibration)."""
    return _quant_remask_engine(tmp_path_factory, "fp8", "onnx")


def _quant_remask_engine(tmp_path_factory, precision: str, remask: str):
    """A tiny ONNX Runtime engine of `precision` with a remask stage, calibrated briefly (dlm, 8 new tokens)."""
    pytest.importorskip("modelopt", reason="needs nvidia-modelopt (pip install -e '.[quant]')")
    from nemodiff_compile.build_config import BuildConfig
    from nemodiff_compile.pipeline import build_engine
    from nemodiff_compile.quant import recipe_for

    recipe = recipe_for(precision).with_(calib_modes=("dlm",), calib_max_new_tokens=8)
    out = tmp_path_factory.mktemp("quant-remask") / f"tiny-{precision}-remask-{remask}"
    return build_engine(BuildConfig.of(source="tiny", output=out, backend="onnxruntime", precision=precision,
                                       remask=remask, validate=False, batch_sizes=(1, 2), max_context=128),
                        recipe=recipe)


@pytest.fixture(scope="session")
def plugin_graph(tmp_path_factory):
    """The fp32 step graph with the nemodiff::Remask node (export only)."""
    pytest.importorskip("onnx")
    from nemodiff_compile import load_reference
    from nemodiff_compile.export.onnx import export_step, remask_options

    model = load_reference("tiny", dtype="float32")
    out = tmp_path_factory.mktemp("plugin-graph")
    spec = export_step(model, out, remask=remask_options("plugin", mask_id=model.config.mask_token_id))
    return out / "model.onnx", spec


# ---- ONNX Runtime engines with the remask stage (the compiled refinement loop): one build each per session ----

_REMASK_ENGINES: dict = {}


@pytest.fixture(scope="session")
def remask_engine(tmp_path_factory):
    """remask_engine(variant) -> the embedded tiny model built for ONNX Runtime (fp32) with the remask stage
    `variant` ("onnx" | "plugin"; threshold 0.9, which also serves every fixed-steps policy), buckets 1 and
    4; built once per session on first use. The "onnx" build validates itself, as `build` does by default;
    the "plugin" one is validated by the tests."""
    pytest.importorskip("onnxruntime")

    def get(variant: str):
        if variant == "plugin":
            pytest.importorskip("onnxruntime_extensions", reason="needs onnxruntime-extensions (.[ort-plugin])")
        if variant not in _REMASK_ENGINES:
            from nemodiff_compile.build_config import BuildConfig
            from nemodiff_compile.pipeline import build_engine

            out = tmp_path_factory.mktemp("remask") / f"tiny-{variant}"
            _REMASK_ENGINES[variant] = build_engine(BuildConfig.of(
                source="tiny", output=out, backend="onnxruntime", remask=variant, validate=variant == "onnx",
                batch_sizes=(1, 4), max_context=128))
        return _REMASK_ENGINES[variant]

    return get


@pytest.fixture(scope="session")
def int8_remask_dir(tmp_path_factory):
    """int8 (SmoothQuant) Q/DQ graph with the remask stage as the plugin node (ONNX Runtime directory, short
    calibration)."""
    pytest.importorskip("onnxruntime_extensions", reason="needs onnxruntime-extensions (.[ort-plugin])")
    return _quant_remask_engine(tmp_path_factory, "int8", "plugin")


# ---- the tiny vision-language checkpoint (issue 20): the trained tiny text model cut to its first 2 layers
# (exports in about half the time of all 6) + a small random vision tower and projector, in the real HF
# layout (flat text config + vision_config, encoder.vision_tower.* / encoder.multi_modal_projector.* tensors,
# the tokenizer with the four image tokens) ----

TINY_VLM_LAYERS = 2
TINY_VISION_CONFIG = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, head_dim=16, patch_size=14, image_size=112, num_channels=3,
                          rope_theta=10000.0, hidden_act="silu")
# the tiny tokenizer's unused special tokens 18-21 become the image tokens (research note's candidate ids)
TINY_IMAGE_TOKENS = {"<SPECIAL_18>": "<|image_start|>", "<SPECIAL_19>": "<|image_pad|>",
                     "<SPECIAL_20>": "<|image_break|>", "<SPECIAL_21>": "<|image_end|>"}


def tiny_vlm_config_dict() -> dict:
    import json

    from nemodiff_compile import TINY_ASSET

    raw = json.loads((TINY_ASSET / "config.json").read_text())
    raw.update(model_type="nemotron_labs_diffusion_vlm", architectures=["NemotronLabsDiffusionVLMModel"],
               num_hidden_layers=TINY_VLM_LAYERS,
               vision_config=dict(TINY_VISION_CONFIG), spatial_merge_size=2, projector_hidden_act="gelu",
               multimodal_projector_bias=False, vision_feature_layer=-1)
    return raw


def make_tiny_vlm(out, seed: int = 0):
    """Write the tiny VLM checkpoint folder `out` (config.json, model.safetensors, tokenizer files)."""
    import json
    import tempfile
    from pathlib import Path

    from nemodiff_compile import TINY_ASSET
    from nemodiff_compile.config import ModelConfig
    from nemodiff_compile.model.checkpoint import load_checkpoint, save_checkpoint
    from nemodiff_compile.model.vision import NemotronLabsDiffusionVLM

    cfg = ModelConfig.from_hf(tiny_vlm_config_dict())
    torch.manual_seed(seed)
    model = NemotronLabsDiffusionVLM(cfg).eval()
    ours = model.state_dict()
    text = {k: v for k, v in load_checkpoint(TINY_ASSET, dtype="float32").state_dict().items() if k in ours}
    missing, _ = model.load_state_dict(text, strict=False)
    assert all(k.startswith(("encoder.vision_tower.", "encoder.multi_modal_projector.")) for k in missing)
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            s = (TINY_ASSET / name).read_text()
            for old, new in TINY_IMAGE_TOKENS.items():
                s = s.replace(json.dumps(old), json.dumps(new))
            (Path(tmp) / name).write_text(s)
            files[name] = Path(tmp) / name
        return save_checkpoint(model, out, extra_files=files)


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory):
    return make_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny-vlm")
