"""The compiled VLM path under ONNX Runtime (issue 20 step 5): the engine directory holds the step graph (taking
the prefill's input embeddings) and the vision graph (encoder + projector, dynamic image size within a bound),
both in the manifest; the engine equals the reference token for token (fp32) for image prompts in dlm / ar /
linear-spec, batch 1 and 2 with different image sizes; `validate` covers image prompts."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from nemodiff_compile import load_reference
from nemodiff_compile.backends.eager import TorchDenoiser
from nemodiff_compile.errors import InvalidArgument
from nemodiff_compile.model.tokenizer import load_tokenizer
from nemodiff_compile.session import Session

pytest.importorskip("onnxruntime")
Image = pytest.importorskip("PIL.Image")
pytestmark = pytest.mark.slow          # one engine build (~40-70 s on 2 cores), shared by the module


@pytest.fixture(scope="module")
def vlm_engine(tiny_vlm_dir, tmp_path_factory):
    from nemodiff_compile.build_config import BuildConfig
    from nemodiff_compile.pipeline import build_engine

    out = tmp_path_factory.mktemp("vlm-engine") / "tiny-vlm-fp32"
    return build_engine(BuildConfig.of(source=str(tiny_vlm_dir), output=out, backend="onnxruntime", validate=False,
                                       batch_sizes=(1, 2), max_context=256))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("vlm-images")
    rng = np.random.default_rng(1)
    paths = []
    for i, (h, w) in enumerate([(50, 70), (30, 100)]):        # -> 56x84 (2x3 tokens), 56x112 (2x4)
        p = d / f"im{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def pair(vlm_engine, tiny_vlm_dir):
    ref = Session(TorchDenoiser(load_reference(tiny_vlm_dir, dtype="float32"), max_len=256),
                  load_tokenizer(tiny_vlm_dir))
    eng = Session.open(vlm_engine)
    yield ref, eng
    ref.close()
    eng.close()


def test_engine_directory_holds_both_graphs(vlm_engine):
    from nemodiff_compile.artifact.manifest import read_manifest

    m = read_manifest(vlm_engine)
    assert {"model.onnx", "vision.onnx", "vision.onnx.data"} <= set(m.artifacts)
    vision = m.io_spec["extra"]["vision"]
    assert vision["file"] == "vision.onnx" and vision["merge_patch"] == 28 and vision["max_side"] == 112
    names = [t["name"] for t in m.io_spec["inputs"]]
    assert names[-2:] == ["embed_mask", "embeds"]


@pytest.mark.parametrize("mode", ["dlm", "ar", "linear-spec"])
def test_engine_equals_reference_for_image_prompts(pair, images, mode):
    ref, eng = pair
    for prompts, imgs in ((["Describe it."], [[images[0]]]),
                          (["Describe it.", "What is this?"], [[images[0]], [images[1]]])):
        a = ref.generate(prompts, images=imgs, mode=mode, max_new_tokens=12)
        b = eng.generate(prompts, images=imgs, mode=mode, max_new_tokens=12)
        assert [c.tokens for c in b.completions] == [c.tokens for c in a.completions]
        assert all(c.tokens for c in a.completions)


def test_vision_graph_equals_reference_and_keeps_its_bound(pair):
    ref, eng = pair
    torch.manual_seed(0)
    for H, W in ((56, 84), (112, 28)):
        x = torch.randn(3, H, W)
        torch.testing.assert_close(eng.denoiser.encode_image(x), ref.denoiser.encode_image(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(InvalidArgument, match="multiples of 28 up to 112"):
        eng.denoiser.encode_image(torch.zeros(3, 30, 28))
    with pytest.raises(InvalidArgument, match="multiples of 28 up to 112"):
        eng.denoiser.encode_image(torch.zeros(3, 140, 28))


def test_bidirectional_image_prefill_is_the_reference_only(vlm_engine, images):
    with Session.open(vlm_engine, image_prefill="bidirectional") as s:
        with pytest.raises(InvalidArgument, match="image_prefill 'bidirectional': the reference only"):
            s.generate("Hi", images=[images[0]], max_new_tokens=4)


def test_validate_covers_image_prompts(vlm_engine):
    from nemodiff_compile.artifact.manifest import read_manifest
    from nemodiff_compile.validate.engine import validate_engine

    report = validate_engine(vlm_engine, quick=True, modes=("dlm",), max_new_tokens=8)
    assert report.passed and report.vision["passed"] and report.vision["images"] == 2
    assert report.settings["prompts"] == 4                     # 2 text + 2 image prompts
    assert report.vision["features_max_abs_diff"] < 1e-4
    assert read_manifest(vlm_engine).validation["vision"]["images"] == 2


def test_remask_stage_is_refused_for_a_vlm(tiny_vlm_dir, tmp_path):
    from nemodiff_compile.build_config import BuildConfig
    from nemodiff_compile.pipeline import build_engine

    with pytest.raises(InvalidArgument, match="--remask onnx: not supported yet for vision-language"):
        build_engine(BuildConfig.of(source=str(tiny_vlm_dir), output=tmp_path / "e", backend="onnxruntime",
                                    remask="onnx", validate=False))


def _fake_trt_directory(vlm_engine, tmp_path):
    """The VLM engine as a TensorRT directory of fake plans (fake_trt.py): the step plan and, under its entry,
    the vision plan, each computed by ONNX Runtime from the directory's graphs over the pointers bound."""
    from fake_trt import make_plan

    from nemodiff_compile.artifact.manifest import read_manifest
    from nemodiff_compile.artifact.profiles import make_profiles, vision_profile
    from nemodiff_compile.artifact.targets import DeviceInfo

    gpu = DeviceInfo("NVIDIA L40S", (8, 9), "580.65")
    m = read_manifest(vlm_engine)
    profiles = make_profiles(m.io_spec, m.buckets)
    (tmp_path / "engine.sm89.plan").write_bytes(make_plan(vlm_engine / "model.onnx", m.io_spec, profiles))
    vision = m.io_spec["extra"]["vision"]
    vprofile = vision_profile(vision)
    (tmp_path / "vision.sm89.plan").write_bytes(make_plan(vlm_engine / "vision.onnx", vision, [vprofile]))
    m.backend = "tensorrt"
    m.engines = [{"target": "sm89", "file": "engine.sm89.plan", "trt_module": "tensorrt", "trt_version": "10.13.0",
                  "gpu_name": gpu.name, "plugins": [], "profiles": [p.to_json() for p in profiles],
                  "version_compatible": False,
                  "vision": {"file": "vision.sm89.plan", "precision": "fp32", "profiles": [vprofile.to_json()]}}]
    return m, gpu


def test_tensorrt_runtime_feeds_image_features(vlm_engine, pair, images, tmp_path):
    """backends/trt.py over the fake TensorRT (fake_trt.py: each pass computed by ONNX Runtime over the pointers
    the runtime bound) with the VLM's step graph as its plan and the vision plan encoding the images (what
    open_engine attaches): image prompts give the reference's tokens."""
    from fake_trt import FakeGraphPool, FakeTensorRT

    from nemodiff_compile.backends.open import _vision
    from nemodiff_compile.backends.trt import TrtDenoiser
    from nemodiff_compile.backends.trt_shim import Trt
    from nemodiff_compile.backends.trt_vision import TrtVision
    from nemodiff_compile.config import ModelConfig

    m, gpu = _fake_trt_directory(vlm_engine, tmp_path)
    fake = FakeTensorRT()
    den = TrtDenoiser(tmp_path, m, ModelConfig.from_hf(m.model_config), trt=Trt(fake, "tensorrt", "10.13.0"),
                      gpu=gpu, device="cpu", graphs=FakeGraphPool(fake, enabled=True), stream=object())
    den.graph_max_tokens = 16                  # blocks captured, the image prompts' prefills not
    den.encode_image = _vision(tmp_path, m, den, m.io_spec["extra"]["vision"], None, None)
    assert isinstance(den.encode_image, TrtVision)
    ref, _ = pair
    with Session(den, ref.tokenizer) as trt:
        for mode in ("dlm", "ar"):
            prompts, imgs = ["Describe it.", "What is this?"], [[images[0]], [images[1]]]
            want = ref.generate(prompts, images=imgs, mode=mode, max_new_tokens=12)
            got = trt.generate(prompts, images=imgs, mode=mode, max_new_tokens=12)
            assert [c.tokens for c in got.completions] == [c.tokens for c in want.completions]
            text = trt.generate("Once upon a time", mode=mode, max_new_tokens=8)       # text passes: no features
            assert text.completions[0].tokens == ref.generate("Once upon a time", mode=mode,
                                                              max_new_tokens=8).completions[0].tokens
    vision_ctx, = fake.engines[1].contexts                # the vision plan's own context ran every image
    assert fake.engines[1].plan["onnx"].endswith("vision.onnx") and vision_ctx.executions >= 2


def test_tensorrt_vision_plan_equals_the_reference(vlm_engine, pair, tmp_path):
    """The vision plan through backends/trt_vision.py over the fake TensorRT: the reference's (and ONNX Runtime's)
    features on two image sizes; an image outside the plan's profile is one line; a directory built before vision
    plans keeps ONNX Runtime's vision graph, with a warning."""
    from fake_trt import FakeTensorRT

    from nemodiff_compile.backends.open import _vision
    from nemodiff_compile.backends.ort_vision import OrtVision
    from nemodiff_compile.backends.trt_shim import Trt
    from nemodiff_compile.backends.trt_vision import TrtVision

    m, _ = _fake_trt_directory(vlm_engine, tmp_path)
    fake = FakeTensorRT()
    entry, vision = m.engines[0], m.io_spec["extra"]["vision"]
    enc = TrtVision(tmp_path, entry["vision"], vision, trt=Trt(fake, "tensorrt", "10.13.0"),
                    runtime=fake.Runtime(None), device="cpu")
    ort = OrtVision(vlm_engine, vision)
    ref, _ = pair
    torch.manual_seed(0)
    for H, W in ((56, 84), (112, 28)):
        x = torch.randn(3, H, W)
        got = enc(x)
        assert got.shape == ((H // 28) * (W // 28), m.model_config["hidden_size"])
        torch.testing.assert_close(got, ref.denoiser.encode_image(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, ort(x), rtol=1e-6, atol=1e-6)
    assert fake.ort_runs == 2 and enc.context.executions == 2
    for bad in ((3, 140, 28), (3, 28, 140), (3, 30, 28)):
        with pytest.raises(InvalidArgument) as e:
            enc(torch.zeros(bad))
        assert "vision plan takes multiples of 28 up to 112x112" in str(e.value) and "\n" not in str(e.value)
    assert fake.ort_runs == 2                              # refused before TensorRT was asked
    del entry["vision"]
    with pytest.warns(UserWarning, match="has no vision plan"):
        assert isinstance(_vision(vlm_engine, m, SimpleNamespace(entry=entry), vision, None, None), OrtVision)
