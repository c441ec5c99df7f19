"""The embedded tiny model (nemodiff_compile/assets/tiny/): tokenizer layout, and that it generates."""

from pathlib import Path

import pytest

import nemodiff_compile
from tinylm.tokenizer import SPECIAL_TOKENS

ASSETS = Path(nemodiff_compile.__file__).parent / "assets" / "tiny"
pytestmark = pytest.mark.skipif(not (ASSETS / "model.safetensors").exists(), reason="tiny assets not built")


@pytest.fixture(scope="module")
def hf_tok():
    from transformers import AutoTokenizer

    # config.json carries the real auto_map (remote code not shipped): refuse it, or AutoTokenizer prompts
    return AutoTokenizer.from_pretrained(str(ASSETS), trust_remote_code=False)


@pytest.fixture(scope="module")
def tiny_model():
    from safetensors.torch import load_file

    from nemodiff_compile.config import ModelConfig
    from nemodiff_compile.model import NemotronLabsDiffusion

    m = NemotronLabsDiffusion(ModelConfig.from_file(ASSETS / "config.json"))
    m.load_state_dict(load_file(ASSETS / "model.safetensors"))
    return m.eval()


def test_special_token_layout(hf_tok):
    assert len(hf_tok) == 1024
    assert (hf_tok.unk_token_id, hf_tok.pad_token_id, hf_tok.bos_token_id) == (0, 0, 1)
    assert (hf_tok.eos_token_id, hf_tok.mask_token_id) == (11, 100)
    assert hf_tok.convert_ids_to_tokens([2, 10, 11, 100, 127]) == \
        ["</s>", "<|im_start|>", "<|im_end|>", "<|mask|>", "<SPECIAL_127>"]
    assert hf_tok.convert_ids_to_tokens(list(range(128))) == SPECIAL_TOKENS


def test_round_trip(hf_tok):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(ASSETS / "tokenizer.json"))
    for text in ["Once upon a time, Tom had a red ball.", "3 + 4 = 7.\nCount from 5: 5, 6, 7.",
                 "Unseen wörds & symbols: {x} 12345 — ok?"]:
        ids = hf_tok(text)["input_ids"]
        assert ids[0] == 1 and ids.count(1) == 1
        assert hf_tok.decode(ids, skip_special_tokens=True) == text
        assert raw.decode(raw.encode(text).ids) == text


def test_chat_template(hf_tok):
    msgs = [{"role": "user", "content": "What is 3 + 4?"}]
    text = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == "<s><|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n"
    ids = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert ids[:2] == [1, 10] and ids.count(1) == 1 and ids[-1] == hf_tok.convert_tokens_to_ids("\u010a")
    full = msgs + [{"role": "assistant", "content": "3 + 4 = 7."}]
    assert hf_tok.apply_chat_template(full, tokenize=False).endswith("assistant\n3 + 4 = 7.<|im_end|>")


def _chat(tok, msg):
    return tok.apply_chat_template([{"role": "user", "content": msg}], add_generation_prompt=True,
                                   tokenize=True)["input_ids"]


def test_generates_readable_text(tiny_model, hf_tok):
    from tinylm.evaluate import greedy_ar

    ids = hf_tok("The days of the week are")["input_ids"]
    out = hf_tok.decode(greedy_ar(tiny_model, ids, 24, 11))
    assert out == " Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday.<|im_end|>"
    assert hf_tok.decode(greedy_ar(tiny_model, _chat(hf_tok, "Hello!"), 16, 11)) == \
        "Hello! How can I help you today?<|im_end|>"
    story = hf_tok.decode(greedy_ar(tiny_model, hf_tok("Once upon a time, Tom")["input_ids"], 80, 11),
                          skip_special_tokens=True)
    assert story.startswith(" had a ") and story.endswith(".") and len(story.split()) > 30


def test_diffusion_commits_several_tokens_per_pass(tiny_model, hf_tok):
    from tinylm.evaluate import diffusion_decode

    st = diffusion_decode(tiny_model, _chat(hf_tok, "List the months of the year."), max_blocks=3,
                          block=16, mask_id=100, eos=11, threshold=0.9)
    assert hf_tok.decode(st.tokens, skip_special_tokens=True).startswith("January, February, March, April")
    assert st.tokens_per_denoise_pass >= 3 and st.tokens_per_forward > 1.5
