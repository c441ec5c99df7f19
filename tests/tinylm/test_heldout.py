"""The held-out prompt generator: deterministic, in the corpus's style, disjoint from every prompt set
the package or the repository uses, and the committed file is what it generates."""

import re
from pathlib import Path

from nemodiff_compile.prompts import prompt_texts, read_prompt_file
from nemodiff_compile.quant.calib import CORPUS_PROMPTS_FILE, builtin_texts
from tinylm import corpus
from tinylm.heldout import HELDOUT_SEED, heldout_prompts, shipped_prompts, write_prompt_file

ROOT = Path(__file__).resolve().parents[2]
HELDOUT_FILE = ROOT / "docs" / "prompts" / "tiny-heldout-200.txt"


def lines(path):
    return [item["text"] for item in read_prompt_file(path, "test")]


def test_committed_file_is_the_generators_output():
    assert lines(HELDOUT_FILE) == heldout_prompts(200)


def test_committed_calibration_and_validation_sets_are_the_generators_output():
    """The built-in calibration prompts (after the 12 general ones) and validation prompts (after the
    4 original ones) are drawn with their own seeds, each excluding the sets drawn before it."""
    held = set(heldout_prompts(200))
    calib = heldout_prompts(64, seed=777, exclude=shipped_prompts() | held)
    assert lines(CORPUS_PROMPTS_FILE) == calib and list(builtin_texts()[12:]) == calib
    val = heldout_prompts(60, seed=72026, exclude=shipped_prompts() | held | set(calib))
    assert list(prompt_texts()[4:]) == val


def test_deterministic_distinct_and_seeded():
    a = heldout_prompts(120)
    assert a == heldout_prompts(120) and len(set(a)) == 120
    assert heldout_prompts(40) == a[:40]                          # a subset is a prefix
    other = heldout_prompts(120, seed=HELDOUT_SEED + 1)
    assert len(set(a) & set(other)) < 60                          # another seed draws mostly other prompts
    assert all("\n" not in p and p.strip() == p and p for p in a)


def shape(text: str) -> str:
    """The template behind a prompt: numbers and the corpus's slot words (names, animals, ...) blanked."""
    words = sorted(corpus.GIRLS + corpus.BOYS + corpus.ANIMALS + corpus.COLORS + corpus.OBJECTS + corpus.FOODS
                   + corpus.PLACES + corpus.DAYS + corpus.MONTHS, key=len, reverse=True)
    text = re.sub(r"\d+", "N", text)
    return re.sub("|".join(rf"\b{re.escape(w)}s?\b" for w in words), "W", text)


def test_alternates_chat_messages_and_raw_openings():
    """Even prompts (wrapped in the chat template by encode_prompts) are user messages of the shapes
    the corpus's chat documents ask; odd ones open raw documents of the corpus's kinds."""
    docs = corpus.make_corpus(3000, seed=5)
    asks = {shape(d.split("user\n", 1)[1].split(corpus.IM_END, 1)[0]) for d in docs if d.startswith(corpus.IM_START)}
    prompts = heldout_prompts(200)
    chat, raw = prompts[0::2], prompts[1::2]
    assert all(shape(p) in asks for p in chat), [p for p in chat if shape(p) not in asks]
    assert sum(shape(p) in asks for p in raw) < 0.2 * len(raw) and all(len(p.split()) >= 4 for p in raw)
    kinds = {"story": ("had", "went", "wanted", "woke", "Once", "Here"), "count": ("Count",), "qa": ("Q:",),
             "echo": ("Say it twice",), "arith": ("+", " - ")}
    for name, marks in kinds.items():
        assert any(any(m in p for m in marks) for p in raw), name


def test_disjoint_from_calibration_validation_and_hand_written_prompts():
    """Nothing a recipe or a bound was chosen on: the calibration prompts, the built-in validation
    prompts (pairwise disjoint, all three), the hand-written held-out file. (docs/prompts/tiny-tasks.jsonl, the bench's task prompts,
    shares 4 of its short requests such as "Count from 9." with it: both draw from the same templates.)"""
    held, calib, val = set(heldout_prompts(200)), set(builtin_texts()), set(prompt_texts())
    assert not held & calib and not held & val and not calib & val
    assert not held & shipped_prompts()
    assert not held & set(lines(ROOT / "docs" / "prompts" / "tiny-heldout.txt"))


def test_write_prompt_file_round_trips(tmp_path):
    out = write_prompt_file(tmp_path / "p.txt", heldout_prompts(10))
    assert lines(out) == heldout_prompts(10) and not list(tmp_path.glob("*.tmp"))
