"""Incremental detokenization (session.TextStream): the pieces add up to the non-streamed text, a character
split over several byte-level tokens never comes out half, and a feed decodes a window, not the whole text."""

import random
from pathlib import Path
from types import SimpleNamespace

import pytest

from nemodiff_compile.session import TextStream

pytest.importorskip("transformers")
TINY = Path(__file__).resolve().parents[2] / "nemodiff_compile/assets/tiny"
TEXT = "Once upon a time, naïve café — 東京 🙂🙂 and 3 + 4 = 7.\nThe end."


def _session(tok, seen=None):
    def decode(ids):
        if seen is not None:
            seen.append(len(ids))
        return tok.decode(ids, skip_special_tokens=True)
    return SimpleNamespace(tokenizer=tok, decode=decode)


def _stream(session, ids, chunks):
    ts, pieces, i = TextStream(session), [], 0
    for n in chunks:
        if (p := ts.feed(ids[i : i + n])) is not None:
            pieces.append(p)
        i += n
    tail = ts.finish()
    return pieces, tail


def _chunks(rng, n, most):
    out = []
    while sum(out) < n:
        out.append(min(rng.randint(1, most), n - sum(out)))
    return out


@pytest.fixture(scope="module")
def tiny_tok():
    from nemodiff_compile.model.tokenizer import load_tokenizer

    return load_tokenizer(TINY)


@pytest.mark.parametrize("most", [1, 4, 16])
def test_pieces_add_up_to_the_decoded_text(tiny_tok, most):
    ids = tiny_tok.encode(TEXT, add_special_tokens=False)
    rng = random.Random(most)
    assert any(tiny_tok.decode(ids[i : i + 1]).count("\ufffd") for i in range(len(ids)))   # split characters
    pieces, tail = _stream(_session(tiny_tok), ids, _chunks(rng, len(ids), most))
    assert "".join(pieces) + (tail or "") == tiny_tok.decode(ids) == TEXT
    assert not any("\ufffd" in p for p in pieces)                 # never half a character
    assert len(pieces) > 1


def test_random_ids_and_special_tokens(tiny_tok):
    rng = random.Random(0)
    ids = [rng.randrange(tiny_tok.vocab_size) for _ in range(600)]
    ids[100:100] = [tiny_tok.eos_token_id] * 3
    pieces, tail = _stream(_session(tiny_tok), ids, _chunks(rng, len(ids), 16))
    assert "".join(pieces) + (tail or "") == tiny_tok.decode(ids, skip_special_tokens=True)


def test_a_feed_decodes_a_window_not_the_whole_text(tiny_tok):
    ids = tiny_tok.encode(TEXT * 40, add_special_tokens=False)                 # ~1,800 tokens, one at a time
    seen = []
    pieces, tail = _stream(_session(tiny_tok, seen), ids, [1] * len(ids))
    assert "".join(pieces) + (tail or "") == TEXT * 40
    assert max(seen[:-1]) <= 8 and seen[-1] == len(ids)                        # finish decodes everything once


def test_sentencepiece_style_tokenizer(tmp_path):
    """A Metaspace tokenizer (decoding drops the leading space of the first token) streams the same text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["▁Once", "▁upon", "▁a", "▁time", "▁the", "▁end", "▁3", "▁+", "▁4", "▁=", "▁7", "."]
    vocab = {w: i for i, w in enumerate(["<unk>"] + words)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    raw.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")
    ids = [vocab[w] for w in ["▁Once", "▁upon", "▁a", "▁time", "▁3", "▁+", "▁4", "▁=", "▁7", ".", "▁the", "▁end", "."]]
    for most in (1, 2, 5):
        pieces, tail = _stream(_session(tok), ids, _chunks(random.Random(most), len(ids), most))
        assert "".join(pieces) + (tail or "") == tok.decode(ids) == "Once upon a time 3 + 4 = 7. the end."


def test_without_a_tokenizer_the_ids_come_back():
    ts = TextStream(SimpleNamespace(tokenizer=None, decode=None))
    assert ts.feed([5, 6]) == [5, 6] and ts.feed([7]) == [7] and ts.finish() is None
