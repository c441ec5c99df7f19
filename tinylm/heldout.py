"""Held-out prompts in the style of the tiny corpus, drawn with their own seed, for judging
quantized engines on text nobody tuned a recipe or a gate on.

    from tinylm.heldout import heldout_prompts, write_prompt_file
    prompts = heldout_prompts(200)                   # the same 200 strings on every machine
    write_prompt_file("docs/prompts/tiny-heldout-200.txt", prompts)   # what `validate --prompts` reads

Every prompt comes from the corpus's own templates (`corpus.py`) through a `random.Random(seed)`
that no training, calibration or validation set uses (HELDOUT_SEED), and none equals a prompt the
package already ships (the built-in calibration and validation prompts, docs/prompts/*). Prompt
files are read by `nemodiff_compile.prompts.encode_prompts`, which wraps even-numbered prompts (0, 2, ...) in the
chat template and gives odd-numbered ones as raw text, so the set alternates to match
(keep the order when taking a subset: `prompts[:n]`):

  even  a user message, as the corpus's chat documents ask them (tell a story, add, count, list,
        a fact question, repeat after me, a greeting)
  odd   the opening of a raw corpus document (story, arithmetic, counting, calendar, Q&A, echo) cut
        at a word boundary part way through, so the model has to continue it

Stdlib only (the exclusion list reads two constants of the installed package); one prompt per line,
no newlines inside a prompt. Not installed with the package: nothing there needs it at run time
(`validate --prompts docs/prompts/tiny-heldout-200.txt` reads the committed output).
"""

from __future__ import annotations

import random
from pathlib import Path

from . import corpus

HELDOUT_SEED = 16_2026          # used for nothing else: not training (0..), not calibration, not tests
REPO_PROMPT_FILES = ("docs/prompts/tiny-heldout.txt",)   # hand-written prompt files (not generated here)
RAW_KINDS = (corpus.story, corpus.arithmetic, corpus.counting, corpus.calendar, corpus.qa, corpus.echo)
RAW_WEIGHTS = (0.34, 0.12, 0.16, 0.12, 0.16, 0.10)     # the corpus's weights, chat left out, renormalised


def heldout_prompts(n: int, seed: int = HELDOUT_SEED, exclude: set[str] | None = None) -> list[str]:
    """`n` distinct prompts (alternately chat message / raw document opening), none in `exclude`
    (default: every prompt the package ships, `shipped_prompts()`)."""
    r = random.Random(seed)
    taken = set(shipped_prompts() if exclude is None else exclude)
    out: list[str] = []
    while len(out) < n:
        p = chat_message(r) if len(out) % 2 == 0 else raw_opening(r)
        if p not in taken:
            taken.add(p)
            out.append(p)
    return out


def chat_message(r: random.Random) -> str:
    """A user turn as the corpus's chat documents ask it (corpus.chat_turn's questions)."""
    for _ in range(100):
        user, _answer = corpus.chat_turn(r)
        if "\n" not in user:
            return user
    raise RuntimeError("corpus.chat_turn produced only multi-line messages")   # never: its asks are one line


def raw_opening(r: random.Random) -> str:
    """The first part of a raw corpus document, cut after 30-70% of its words (at least 4)."""
    kind = r.choices(RAW_KINDS, weights=RAW_WEIGHTS)[0]
    words = kind(r).split()
    keep = max(4, min(len(words) - 1, round(len(words) * r.uniform(0.3, 0.7))))
    return " ".join(words[:keep])


def shipped_prompts() -> set[str]:
    """The prompts the package and the repository already hold: the built-in calibration and
    validation prompts, and the hand-written prompt files (REPO_PROMPT_FILES, where the repository
    is present)."""
    from nemodiff_compile.prompts import TEXT_PROMPTS
    from nemodiff_compile.quant.calib import BUILTIN_PROMPTS

    out = set(BUILTIN_PROMPTS) | set(TEXT_PROMPTS)
    root = next((p for p in Path(__file__).resolve().parents if (p / "docs" / "prompts").is_dir()), None)
    for name in REPO_PROMPT_FILES if root is not None else ():
        f = root / name
        if f.is_file():
            out.update(line.strip() for line in f.read_text(encoding="utf-8").splitlines() if line.strip())
    return out


def write_prompt_file(path: str | Path, prompts: list[str]) -> Path:
    """One prompt per line (the text format `validate --prompts` and `--calib` read), atomically."""
    import os

    if any("\n" in p or not p.strip() for p in prompts):
        raise ValueError("a prompt file holds one non-empty, single-line prompt per line")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(p + "\n" for p in prompts), encoding="utf-8")
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> None:
    """python -m tinylm.heldout N OUT [--seed S] [--exclude FILE ...] (from the repository root)"""
    import argparse

    ap = argparse.ArgumentParser(description="Write N held-out tiny-corpus prompts to OUT.")
    ap.add_argument("n", type=int)
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=HELDOUT_SEED)
    ap.add_argument("--exclude", type=Path, action="append", default=[],
                    help="a prompt file whose prompts must not be drawn (repeatable)")
    a = ap.parse_args(argv)
    exclude = shipped_prompts()
    for f in a.exclude:
        exclude.update(line.strip() for line in f.read_text(encoding="utf-8").splitlines() if line.strip())
    print(write_prompt_file(a.out, heldout_prompts(a.n, a.seed, exclude)))


if __name__ == "__main__":
    main()
