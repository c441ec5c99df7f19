"""Tokenizer wrapper: loads a local HF tokenizer folder, applies the chat template, one-line errors."""

import json

import pytest
import torch

from nemodiff_compile.errors import CheckpointError
from nemodiff_compile.model.tokenizer import decode, encode_prompt, load_tokenizer

SPECIAL = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
WORDS = ["hello", "world", "user", "assistant"]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|im_start|> {{ m.role }} {{ m.content }} <|im_end|>"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant{% endif %}")


def _write_tokenizer(folder, chat=True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="removed")
    tk.decoder = decoders.WordPiece(prefix="##")   # joins words with spaces
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    if chat:
        fast.chat_template = TEMPLATE
    fast.save_pretrained(folder)
    # a checkpoint folder also holds config.json with a model_type transformers does not know
    (folder / "config.json").write_text(json.dumps({"model_type": "nemotron_labs_diffusion"}))
    return folder


def test_load_encode_decode(tmp_path):
    from transformers import PreTrainedTokenizerFast

    tok = load_tokenizer(_write_tokenizer(tmp_path))
    assert isinstance(tok, PreTrainedTokenizerFast)
    plain = encode_prompt(tok, "hello world", chat=False)
    assert plain == [1, 5, 6]                                       # BOS hello world
    assert decode(tok, plain) == "hello world"
    assert decode(tok, torch.tensor(plain)) == "hello world"
    assert "<s>" in decode(tok, plain, skip_special_tokens=False)


def test_chat_template(tmp_path):
    tok = load_tokenizer(_write_tokenizer(tmp_path))
    ids = encode_prompt(tok, "hello", chat=True)
    # <s> <|im_start|> user hello <|im_end|> <|im_start|> assistant: one BOS (the template's)
    assert ids == [1, 3, 7, 5, 4, 3, 8]


def test_no_template_falls_back_to_plain(tmp_path):
    tok = load_tokenizer(_write_tokenizer(tmp_path, chat=False))
    assert encode_prompt(tok, "hello", chat=True) == encode_prompt(tok, "hello", chat=False) == [1, 5]


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer folder not found"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        load_tokenizer(tmp_path)


def test_broken_tokenizer_json(tmp_path):
    folder = _write_tokenizer(tmp_path)
    (folder / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(CheckpointError) as info:
        load_tokenizer(folder)
    msg = str(info.value)
    assert "\n" not in msg and str(folder) in msg and "cannot load the tokenizer" in msg
