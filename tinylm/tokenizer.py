"""Byte-level BPE tokenizer for the embedded tiny model, laid out like the real (Tekken) vocabulary.

ids 0..127 are reserved control tokens, as in the real 131072-entry vocabulary:
  0 <unk> (also the pad token)   1 <s> (BOS)   2 </s>
  10 <|im_start|>   11 <|im_end|> (EOS of the instruct model)   100 <|mask|> (the diffusion mask token)
  12 <think>   13 </think> (the instruct model's thinking tags: the chat template's enable_thinking
  switch and the thinking budget; the tiny model was not trained on them)
  every other id below 128: <SPECIAL_k>
ids 128..383 are the 256 byte-level symbols, the rest are BPE merges learnt from the tiny corpus, for
a vocabulary of exactly `vocab_size` (1024 for PRESETS["tiny"]).

`save_tokenizer` writes tokenizer.json, tokenizer_config.json (special tokens + a ChatML-like
`chat_template`) and special_tokens_map.json, loadable offline with
`transformers.AutoTokenizer.from_pretrained(folder)` or `tokenizers.Tokenizer.from_file`.
Encoding plain text prepends BOS (like Mistral's `add_bos_token`); the chat template writes the BOS
itself, and `apply_chat_template(..., tokenize=True)` does not add a second one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tinylm.corpus import IM_END, IM_START

N_RESERVED = 128
UNK, BOS, EOS_BASE, IM_START_ID, IM_END_ID, THINK_ID, END_THINK_ID, MASK_ID = 0, 1, 2, 10, 11, 12, 13, 100
MASK, THINK, END_THINK = "<|mask|>", "<think>", "</think>"
_NAMED = {UNK: "<unk>", BOS: "<s>", EOS_BASE: "</s>", IM_START_ID: IM_START, IM_END_ID: IM_END,
          THINK_ID: THINK, END_THINK_ID: END_THINK, MASK_ID: MASK}
SPECIAL_TOKENS = [_NAMED.get(i, f"<SPECIAL_{i}>") for i in range(N_RESERVED)]

# Same structure as the NLD instruct template (without its system turn, and with thinking off
# without the empty <think></think> the real one writes, so the prompts the tiny model was trained
# on render unchanged):
#   <s><|im_start|>user\n{msg}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>
# enable_thinking=True opens the assistant turn with "<think>\n".
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' }}"
    "{%- if not loop.last or add_generation_prompt %}{{- '\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking %}{{- '<think>\\n' }}{%- endif %}"
    "{%- endif %}"
)


def build_tokenizer(texts: Iterable[str], vocab_size: int = 1024):
    """Train the byte-level BPE on `texts` (chat markers are stripped first: they are whole tokens)."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS[UNK]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    plain = (t.replace(IM_START, "\n").replace(IM_END, "\n") for t in texts)
    tok.train_from_iterator(plain, trainer)
    got = tok.get_vocab_size()
    if got != vocab_size:
        raise ValueError(f"BPE vocabulary came out at {got} entries, expected {vocab_size}: "
                         "the corpus has too few distinct merges")
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL_TOKENS[BOS]} $A", pair=f"{SPECIAL_TOKENS[BOS]} $A $B:1",
        special_tokens=[(SPECIAL_TOKENS[BOS], BOS)],
    )
    return tok


def save_tokenizer(tok, out_dir: str | Path, model_max_length: int = 2048) -> dict[str, Path]:
    """Write the three tokenizer files into `out_dir`; returns {file name: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"tokenizer.json": out / "tokenizer.json",
             "tokenizer_config.json": out / "tokenizer_config.json",
             "special_tokens_map.json": out / "special_tokens_map.json"}
    tok.save(str(files["tokenizer.json"]))
    special_map = {"bos_token": SPECIAL_TOKENS[BOS], "eos_token": IM_END, "pad_token": SPECIAL_TOKENS[UNK],
                   "unk_token": SPECIAL_TOKENS[UNK], "mask_token": MASK}
    added = {str(i): {"content": s, "lstrip": False, "rstrip": False, "normalized": False,
                      "single_word": False, "special": True} for i, s in enumerate(SPECIAL_TOKENS)}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "padding_side": "left",
        **special_map,
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
    }
    files["tokenizer_config.json"].write_text(json.dumps(config, indent=2) + "\n")
    files["special_tokens_map.json"].write_text(json.dumps(special_map, indent=2) + "\n")
    return files
