"""The instruct features outside the loops: the tiny chat template's thinking switch, the defaults in
generation_config.json, and the Session / CLI options that carry them."""

import json
import shutil

import pytest
from click.testing import CliRunner

from nemodiff_compile import TINY_ASSET
from nemodiff_compile.errors import CheckpointError, InvalidArgument
from nemodiff_compile.model.generation_config import GenerationDefaults, end_think_id, thinking_setup

pytestmark = pytest.mark.skipif(not (TINY_ASSET / "config.json").is_file(), reason="tiny assets not built")


@pytest.fixture(scope="module")
def tok():
    from nemodiff_compile.model.tokenizer import load_tokenizer

    return load_tokenizer(TINY_ASSET)


def test_thinking_switch_renders(tok):
    msgs = [{"role": "user", "content": "What is 3 + 4?"}]
    plain = "<s><|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == plain
    assert tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False, enable_thinking=False) == plain
    assert tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False,
                                   enable_thinking=True) == plain + "<think>\n"
    assert end_think_id(tok) == 13 and tok.convert_ids_to_tokens([12, 13]) == ["<think>", "</think>"]


def test_thinking_setup(tok):
    none = GenerationDefaults()
    assert thinking_setup(tok, none) == ({"enable_thinking": False}, None)
    kw, budget = thinking_setup(tok, none, True, 7)
    assert kw == {"enable_thinking": True} and (budget.max_tokens, budget.end_id) == (7, 13)
    kw, budget = thinking_setup(tok, GenerationDefaults(True, 9))            # the checkpoint's defaults
    assert kw == {"enable_thinking": True} and budget.max_tokens == 9
    assert thinking_setup(tok, GenerationDefaults(True, 9), False) == ({"enable_thinking": False}, None)
    with pytest.raises(InvalidArgument, match="thinking is off"):
        thinking_setup(tok, none, None, 5)
    with pytest.raises(InvalidArgument, match="tokenizer"):
        thinking_setup(None, none, True, 5)


def test_defaults_from_generation_config(tmp_path):
    assert GenerationDefaults.read(TINY_ASSET) == GenerationDefaults()      # the file, without such keys
    (tmp_path / "generation_config.json").write_text(json.dumps({"enable_thinking": True, "max_thinking_tokens": 3}))
    assert GenerationDefaults.read(tmp_path) == GenerationDefaults(True, 3)
    (tmp_path / "generation_config.json").write_text(json.dumps({"max_thinking_tokens": -1}))
    with pytest.raises(CheckpointError, match="max_thinking_tokens"):
        GenerationDefaults.read(tmp_path)


@pytest.fixture(scope="module")
def thinking_checkpoint(tmp_path_factory):
    """The tiny checkpoint with thinking on and a budget of 3 in its generation_config.json."""
    folder = tmp_path_factory.mktemp("ckpt") / "tiny-thinking"
    shutil.copytree(TINY_ASSET, folder)
    cfg = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps(cfg | {"enable_thinking": True, "max_thinking_tokens": 3}))
    return folder


def test_session_and_cli_take_the_checkpoints_defaults(thinking_checkpoint, tok):
    from nemodiff_compile.cli import cli
    from nemodiff_compile.session import Session

    with Session.from_model(thinking_checkpoint, max_len=128) as s:
        r = s.generate("What is 3 + 4?", mode="ar", max_new_tokens=12)
        assert r.completions[0].tokens[3] == 13 and 13 not in r.completions[0].tokens[:3]
        r = s.generate("What is 3 + 4?", mode="ar", max_new_tokens=12, max_thinking_tokens=1)
        assert r.completions[0].tokens[1] == 13
        r = s.generate("What is 3 + 4?", mode="ar", max_new_tokens=12, enable_thinking=False)
        assert 13 not in r.completions[0].tokens
    run = lambda *a: CliRunner().invoke(cli, ["generate", "--model", str(thinking_checkpoint), "--mode", "dlm",
                                              "--prompt", "What is 3 + 4?", "--max-new-tokens", "16", "--json", *a])
    d = json.loads(run().output)
    assert d["enable_thinking"] is True and d["max_thinking_tokens"] == 3
    prompt = d["results"][0]["prompt_ids"]
    assert prompt[-2] == 12 and tok.decode(prompt[-1:]) == "\n"          # the template opened <think>
    assert d["results"][0]["tokens"][3] == 13
    d = json.loads(run("--no-thinking").output)
    assert d["enable_thinking"] is False and d["max_thinking_tokens"] is None
    assert 12 not in d["results"][0]["prompt_ids"]
    r = run("--no-thinking", "--max-thinking-tokens", "4")
    assert r.exit_code == 2 and "thinking is off" in r.output
