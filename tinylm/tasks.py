"""Prompts with checkable answers for the corpus's tasks, made by the corpus's own generators.

`task_prompts(per_task, seed)` draws, from its own `random.Random(seed)`, `per_task` prompts for each
task the corpus teaches, alternately in the plain-text layout of a corpus document cut before the
answer and as a one-turn chat request (the corpus's chat layout):

  task        plain text (chat: false)                 chat (chat: true)               answer
  arithmetic  "3 + 4 ="                                "What is 3 + 4?"                7 (int)
  counting    "Count from 5:"                          "Count from 5."                 [5, 6, 7, 8] (first 4)
  calendar    "After Monday comes"                     "What comes after Monday?"      "Tuesday"
  qa          "Q: What color is the sky? A:"           "What color is the sky?"        "The sky is blue."
  echo        "Say it twice: red Tom cup."             "Repeat after me: Mia has ..."  "red Tom cup" / the sentence

Each item is {"task", "text", "chat", "answer", "target"}: `target` is the continuation a corpus
document has there (for reading; the bench scores `answer`, see nemodiff_compile/bench/tasks.py).
`scripts/make_tiny_tasks.py` writes them to docs/prompts/tiny-tasks.jsonl, the file `bench --tasks` reads.
"""

from __future__ import annotations

import random
import re

from . import corpus

COUNT_PREFIX = 4           # counting answers: the first 4 numbers (the corpus counts 4 to 10 of them)
SEED = 2026                # not the corpus's training seed (0)


def _arithmetic(r: random.Random, chat: bool) -> dict:
    if chat:                                   # chat_turn / qa_pair: "What is a + b?" -> "a + b = c."
        a, b = r.randint(0, 10), r.randint(0, 10)
        return dict(text=f"What is {a} + {b}?", answer=a + b, target=f"{a} + {b} = {a + b}.")
    head, c = corpus.sum_fact(r).rstrip(".").split(" = ")      # "3 + 4 = 7." (or a - b)
    return dict(text=f"{head} =", answer=int(c), target=f" {c}.")


def _counting(r: random.Random, chat: bool) -> dict:
    head, body = corpus.count_list(r)          # "Count from 5:", "5, 6, 7, 8, 9."
    answer = [int(x) for x in re.findall(r"\d+", body)][:COUNT_PREFIX]
    if chat:                                   # chat_turn: head.rstrip(":") + "."
        return dict(text=head.rstrip(":") + ".", answer=answer, target=body)
    return dict(text=head, answer=answer, target=f" {body}")


def _calendar(r: random.Random, chat: bool) -> dict:
    names = corpus.DAYS if r.random() < 0.5 else corpus.MONTHS
    i = r.randrange(len(names))
    nxt = names[(i + 1) % len(names)]
    if chat:                                   # qa_pair: "What comes after X?" -> "Y comes after X."
        return dict(text=f"What comes after {names[i]}?", answer=nxt, target=f"{nxt} comes after {names[i]}.")
    return dict(text=f"After {names[i]} comes", answer=nxt,     # calendar: "After X comes Y. Before X ..."
                target=f" {nxt}. Before {names[i]} comes {names[i - 1]}.")


def _qa(r: random.Random, chat: bool) -> dict:
    question, answer = r.choice(corpus.FACTS)
    if chat:
        return dict(text=question, answer=answer, target=answer)
    return dict(text=f"Q: {question} A:", answer=answer, target=f" {answer}")      # qa: "Q: ... A: ..."


def _echo(r: random.Random, chat: bool) -> dict:
    if chat:                                   # chat_turn: "Repeat after me: S" -> "S"
        said = corpus.repeat_sentence(r)
        return dict(text=f"Repeat after me: {said}", answer=said, target=said)
    words = corpus.echo_words(r)               # echo: "Say it twice: W. W."
    return dict(text=f"Say it twice: {words}.", answer=words, target=f" {words}.")


TASKS = {"arithmetic": _arithmetic, "counting": _counting, "calendar": _calendar, "qa": _qa, "echo": _echo}


def task_prompts(per_task: int = 8, seed: int = SEED) -> list[dict]:
    """per_task prompts of each task, interleaved (arithmetic, counting, ..., echo, arithmetic, ...)
    so that any prefix covers every task; even rounds plain text, odd rounds chat."""
    r = random.Random(seed)
    out = []
    for i in range(per_task):
        for name, make in TASKS.items():
            item = make(r, chat=i % 2 == 1)
            out.append(dict(task=name, text=item["text"], chat=i % 2 == 1, answer=item["answer"],
                            target=item["target"]))
    return out
