"""Image prompts through the eager reference (issue 20 step 4): the image span layout, the prefill's input
embeddings against an independent route (a hook that overwrites the token embeddings), Session.generate(prompt,
images=...) in dlm / ar / linear-spec, the image-prefill switch, bad images, and `generate --image`."""

import json

import pytest
import torch
from click.testing import CliRunner

from nemodiff_compile import load_reference
from nemodiff_compile.backends.eager import TorchDenoiser
from nemodiff_compile.cli import cli
from nemodiff_compile.decoding import loops
from nemodiff_compile.errors import InvalidArgument
from nemodiff_compile.model.image_prompt import expand
from nemodiff_compile.model.tokenizer import load_tokenizer
from nemodiff_compile.model.vision_config import ImageTokenIds
from nemodiff_compile.session import Session

Image = pytest.importorskip("PIL.Image")
MODES = ("dlm", "ar", "linear-spec")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two PNGs of different sizes (not multiples of 28): 50x70 -> 56x84 (2x3 tokens), 30x100 -> 56x112 (2x4)."""
    import numpy as np

    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(50, 70), (30, 100)]):
        p = d / f"im{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def session(tiny_vlm_dir):
    model = load_reference(tiny_vlm_dir, dtype="float32")
    s = Session(TorchDenoiser(model, max_len=512), load_tokenizer(tiny_vlm_dir))
    yield s
    s.close()


def test_image_token_ids_come_from_the_tokenizer(tiny_vlm_dir, session):
    ids = ImageTokenIds.of(session.config, session.tokenizer)
    assert (ids.start, ids.pad, ids.brk, ids.end) == (18, 19, 20, 21)
    cfg = session.config.replace(extra={**session.config.extra, "image_token_id": 7})
    assert ImageTokenIds.of(cfg, session.tokenizer).pad == 7            # config.json's id wins


def test_expand_lays_out_rows_breaks_and_end():
    tok = ImageTokenIds(start=18, pad=19, brk=20, end=21)
    out, pads, spans = expand([1, 18, 5, 18, 6], [(2, 3), (1, 2)], tok, bidirectional=True)
    assert out == [1, 18, 19, 19, 19, 20, 19, 19, 19, 21, 5, 18, 19, 19, 21, 6]
    assert pads.tolist() == [2, 3, 4, 6, 7, 8, 12, 13]
    assert spans.tolist() == [0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 2, 2, 2, 2, 0]
    with pytest.raises(InvalidArgument, match="1 image start token"):
        expand([1, 18], [(1, 1), (1, 1)], tok)


def hooked(model, positions, features, length):
    """A forward hook on the token embedding that puts `features` at `positions` of any pass of `length`
    tokens (the prefill): an independent route to the same input embeddings."""
    def hook(_mod, _inp, out):
        if out.shape[1] == length:
            out = out.clone()
            out[0, positions] = features.to(out.dtype)
        return out
    return model.encoder.embed_tokens.register_forward_hook(hook)


@pytest.mark.parametrize("mode", MODES)
def test_generate_with_an_image_equals_the_hooked_text_path(session, images, mode):
    ids, pi = session.prepare("What is in the picture?", [images[0]])
    assert ids.count(19) == 6 and pi.features.shape == (6, session.config.hidden_size)
    got = session.generate("What is in the picture?", images=[images[0]], mode=mode, max_new_tokens=12)
    model = session.denoiser.model
    handle = hooked(model, pi.positions, pi.features, len(ids))
    try:
        ref = loops.generate(TorchDenoiser(model, max_len=512), [ids], mode, max_new_tokens=12)
    finally:
        handle.remove()
    assert got.completions[0].tokens == ref.tokens[0] and len(ref.tokens[0]) > 0
    plain = loops.generate(TorchDenoiser(model, max_len=512), [ids], mode, max_new_tokens=12, trace=True)
    with_img = session.generate("What is in the picture?", images=[images[0]], mode=mode, max_new_tokens=12,
                                trace=True)
    # the features, not the pad tokens' embeddings, reach the model: the prefill logits differ
    assert plain.trace[0].phase == with_img.generation.trace[0].phase == "prefill"
    assert not torch.allclose(plain.trace[0].conf, with_img.generation.trace[0].conf)


def test_batch_of_two_images_of_different_sizes_equals_each_alone(session, images):
    prompts = ["Describe it.", "And this one?"]
    both = session.generate(prompts, images=[[images[0]], [images[1]]], mode="dlm", max_new_tokens=12)
    for p, im, c in zip(prompts, images, both.completions):
        alone = session.generate(p, images=[im], mode="dlm", max_new_tokens=12)
        assert c.tokens == alone.completions[0].tokens


def test_image_prefill_switch(tiny_vlm_dir, images):
    model = load_reference(tiny_vlm_dir, dtype="float32")
    tok = load_tokenizer(tiny_vlm_dir)
    out = {}
    for how in ("causal", "bidirectional"):
        with Session(TorchDenoiser(model, max_len=512), tok, image_prefill=how) as s:
            g = s.generate("Hi", images=[images[0]], mode="ar", max_new_tokens=4, trace=True).generation
            out[how] = g.trace[0].conf[0]                                      # prefill confidences [L]
    ids, _ = Session(TorchDenoiser(model, max_len=512), tok).prepare("Hi", [images[0]])
    first, last = ids.index(18), ids.index(21)
    # before the image span nothing changes; inside it (start included), earlier image tokens see later ones
    torch.testing.assert_close(out["causal"][:first], out["bidirectional"][:first])
    assert not torch.allclose(out["causal"][first: last], out["bidirectional"][first: last])
    with pytest.raises(InvalidArgument, match="image_prefill"):
        Session(TorchDenoiser(model, max_len=64), tok, image_prefill="sideways").image_prompter()


def test_bad_images_and_text_models(session, tmp_path):
    bad = tmp_path / "cat.jpg"
    bad.write_text("meow")
    with pytest.raises(InvalidArgument, match=r"cat\.jpg: not a readable image"):
        session.generate("x", images=[bad], max_new_tokens=4)
    with pytest.raises(InvalidArgument, match="2 <\\|image_start\\|> marker"):
        session.generate("<|image_start|>a<|image_start|>", images=[bad], max_new_tokens=4)
    text = Session(TorchDenoiser(load_reference("tiny", dtype="float32"), max_len=64))
    with pytest.raises(InvalidArgument, match="takes no images"):
        text.generate([1, 2, 3], images=[bad], max_new_tokens=4)
    text.close()


def test_cli_generate_image(tiny_vlm_dir, images, tmp_path):
    r = CliRunner().invoke(cli, ["generate", "--model", str(tiny_vlm_dir), "--prompt", "What is it?", "--image",
                                 str(images[1]), "--mode", "ar", "--max-new-tokens", "6", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output.strip().splitlines()[-1])
    assert report["images"] == [str(images[1])] and report["image_prefill"] == "causal"
    ids = report["results"][0]["prompt_ids"]
    assert ids.count(19) == 8 and ids.count(20) == 1 and ids.count(21) == 1
    with Session(TorchDenoiser(load_reference(tiny_vlm_dir, dtype="float32"), max_len=512),
                 load_tokenizer(tiny_vlm_dir)) as s:
        want = s.generate("What is it?", images=[images[1]], mode="ar", max_new_tokens=6).completions[0].tokens
    assert report["results"][0]["tokens"] == want
    r = CliRunner().invoke(cli, ["generate", "--model", str(tiny_vlm_dir), "--prompt", "x", "--image",
                                 str(tmp_path / "nope.png")])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("error: ") and "nope.png: cannot read the image" in last


def test_agenerate_stream_and_traced_runs_take_images(session, images):
    import asyncio

    want = session.generate("Hi", images=[images[1]], mode="ar", max_new_tokens=6)
    got = asyncio.run(session.agenerate("Hi", images=[images[1]], mode="ar", max_new_tokens=6))
    assert got.completions[0].tokens == want.completions[0].tokens
    assert "".join(session.stream("Hi", images=[images[1]], mode="ar", max_new_tokens=6)) == want.text
    traced = session.generate("Hi", images=[images[1]], mode="ar", max_new_tokens=6, trace=True)   # whole-batch loops
    assert traced.completions[0].tokens == want.completions[0].tokens


def test_image_rows_join_a_running_batch(session, images):
    """The scheduler prefills an image prompt's row while another row decodes text (AR): both get their solo
    tokens."""
    import threading

    solo_text = session.generate("Count: 1, 2, 3,", mode="ar", max_new_tokens=32, chat=False).completions[0].tokens
    assert len(solo_text) > 4                      # enough passes left for the image row to join
    solo_img = session.generate("Describe it.", images=[images[0]], mode="dlm", max_new_tokens=12).completions[0].tokens
    started, queued = threading.Event(), threading.Event()

    def hold(ids):              # on the scheduler's thread, between passes: wait until the image row is queued
        started.set()
        queued.wait(30)

    text_req = session.submit("Count: 1, 2, 3,", mode="ar", max_new_tokens=32, chat=False, on_tokens=hold)
    started.wait(30)
    img_req = session.submit("Describe it.", images=[images[0]], mode="dlm", max_new_tokens=12)
    queued.set()
    assert text_req.result().tokens[0] == solo_text and img_req.result().tokens[0] == solo_img
    # the image row's prefill ran while the text row was in the batch (riding along idle, no features)
    assert img_req.passes[0][1] == "prefill" and img_req.passes[0][0] < text_req.passes[-1][0]
