"""The OpenAI server's image content parts (issue 20 step 6), on a real uvicorn with the official client over the
tiny VLM's eager reference: a data URL or a file under --allow-image-dir answers as Session.generate with that
image; a bad image, a path outside the allowed directories, a remote URL or a text-only model is HTTP 400."""

import base64

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="needs the serve extra (pip install -e '.[serve]')")
pytest.importorskip("uvicorn", reason="needs the serve extra (pip install -e '.[serve]')")
openai = pytest.importorskip("openai", reason="needs the openai client (pip install -e '.[test]')")
Image = pytest.importorskip("PIL.Image")

from nemodiff_compile import load_reference  # noqa: E402
from nemodiff_compile.backends.eager import TorchDenoiser  # noqa: E402
from nemodiff_compile.model.tokenizer import load_tokenizer  # noqa: E402
from nemodiff_compile.serve.server import create_app  # noqa: E402
from nemodiff_compile.session import Session  # noqa: E402
from live_server import serving  # noqa: E402  (tests/live_server.py)


@pytest.fixture(scope="module")
def setup(tiny_vlm_dir, tmp_path_factory):
    allowed = tmp_path_factory.mktemp("allowed")
    outside = tmp_path_factory.mktemp("outside")
    rng = np.random.default_rng(3)
    img = allowed / "pic.png"
    Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(img)
    (outside / "pic.png").write_bytes(img.read_bytes())
    (allowed / "fake.png").write_text("not a png")
    session = Session(TorchDenoiser(load_reference(tiny_vlm_dir, dtype="float32"), max_len=512),
                      load_tokenizer(tiny_vlm_dir))
    with serving(create_app(session, model_name="vlm", close_session=False, image_dirs=[allowed])) as base:
        yield session, openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120), allowed, outside
    session.close()


def chat(client, parts, **kw):
    return client.chat.completions.create(model="vlm", messages=[{"role": "user", "content": parts}],
                                          max_tokens=8, temperature=0, **kw)


def test_data_url_and_allowed_path_answer_as_session_generate(setup):
    session, client, allowed, _ = setup
    img = allowed / "pic.png"
    want = session.generate("What is this?", images=[img], max_new_tokens=8)
    url = "data:image/png;base64," + base64.b64encode(img.read_bytes()).decode()
    for image_url in (url, str(img), img.as_uri()):
        r = chat(client, [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": "What is this?"}])
        assert r.choices[0].message.content == want.text
        assert r.usage.prompt_tokens == len(session.prepare("What is this?", [img])[0])
    stream = chat(client, [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}],
                  stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want.text


@pytest.mark.parametrize("url, needle", [
    ("data:image/png;base64,bm90IGFuIGltYWdl", "messages[0].content[0].image_url: not a readable image"),
    ("data:image/png;base64,@@@", "not valid base64"),
    ("https://example.com/cat.png", "remote URLs are not fetched"),
    ("OUTSIDE", "not under an allowed image directory"),
    ("FAKE", "fake.png): not a readable image"),
    ("MISSING", "missing.png): cannot read the image"),
])
def test_bad_images_are_400(setup, url, needle):
    _, client, allowed, outside = setup
    url = {"OUTSIDE": str(outside / "pic.png"), "FAKE": str(allowed / "fake.png"),
           "MISSING": str(allowed / "missing.png")}.get(url, url)
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Hi"}])
    assert e.value.status_code == 400 and needle in str(e.value)


def test_text_only_engine_refuses_images(tmp_path):
    session = Session(TorchDenoiser(load_reference("tiny", dtype="float32"), max_len=256),
                      load_tokenizer(__import__("nemodiff_compile").TINY_ASSET))
    url = "data:image/png;base64," + base64.b64encode(b"x").decode()
    with serving(create_app(session, model_name="vlm", close_session=False)) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError, match="takes no images"):
            chat(client, [{"type": "image_url", "image_url": {"url": url}}])
    session.close()


def test_serve_allow_image_dir_must_be_a_directory(tmp_path):
    from click.testing import CliRunner

    from nemodiff_compile.cli import cli

    r = CliRunner().invoke(cli, ["serve", str(tmp_path), "--allow-image-dir", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1] == f"error: --allow-image-dir {tmp_path / 'nope'}: not a directory"
