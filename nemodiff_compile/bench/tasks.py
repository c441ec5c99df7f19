"""Task prompts with checkable answers (`bench --tasks FILE.jsonl`) and the rules that score them.

A task file holds one JSON object per line:

    {"task": "arithmetic", "text": "3 + 4 =", "answer": 7, "chat": false}

`text` is the prompt (`chat: true` wraps it in the tokenizer's chat template, default false), `task`
names the rule that parses the answer out of the generated text (never a comparison with another
decode), `answer` is what that rule must find; other keys (e.g. "target") are ignored. Rules, on the
decoded continuation (special tokens dropped); "first sentence" = up to the first "." or newline:

  task        answer              correct when
  arithmetic  int                 the first integer after "=" in the first sentence (or its first
                                  integer when it has no "=") equals answer: " 7." and "3 + 4 = 7." both give 7
  counting    [int, ...]          the first sentence's integers start with answer
  calendar    str (one word)      the continuation's first word is answer
  qa, echo    str (one sentence)  the first sentence is answer (whitespace and the final "." aside)

docs/prompts/tiny-tasks.jsonl is such a file for the embedded tiny model (scripts/make_tiny_tasks.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import InvalidArgument
from ..prompts import read_lines


@dataclass(frozen=True)
class Task:
    task: str
    text: str
    answer: Any
    chat: bool = False


def first_sentence(text: str) -> str:
    return re.split(r"[.\n]", text.strip(), maxsplit=1)[0].strip()


def _words(s: str) -> str:
    return " ".join(s.strip().rstrip(".").split())


def _number(text: str, answer: int) -> bool:
    s = first_sentence(text)
    m = re.search(r"\d+", s.split("=", 1)[1] if "=" in s else s)
    return m is not None and int(m.group()) == answer


def _sequence(text: str, answer: list[int]) -> bool:
    got = [int(x) for x in re.findall(r"\d+", first_sentence(text))]
    return got[: len(answer)] == answer


def _first_word(text: str, answer: str) -> bool:
    m = re.match(r"\s*([A-Za-z]+)", text)
    return m is not None and m.group(1) == answer


def _sentence(text: str, answer: str) -> bool:
    return _words(first_sentence(text)) == _words(answer)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# task -> (rule, answer check, what the answer must be)
RULES: dict[str, tuple[Callable[[str, Any], bool], Callable[[Any], bool], str]] = {
    "arithmetic": (_number, _is_int, "an integer"),
    "counting": (_sequence, lambda a: isinstance(a, list) and bool(a) and all(map(_is_int, a)),
                 "a non-empty list of integers"),
    "calendar": (_first_word, lambda a: isinstance(a, str) and re.fullmatch(r"[A-Za-z]+", a) is not None,
                 "one word"),
    "qa": (_sentence, lambda a: isinstance(a, str) and _words(a) != "" and "." not in _words(a),
           "one sentence"),
    "echo": (_sentence, lambda a: isinstance(a, str) and _words(a) != "" and "." not in _words(a),
             "one sentence"),
}


def check(task: Task, text: str) -> bool:
    """Is the answer parsed out of the generated `text` the task's answer?"""
    return RULES[task.task][0](text, task.answer)


def read_tasks(path: str | Path, flag: str = "--tasks") -> list[Task]:
    """The tasks of a .jsonl file; every error names the flag, file and line."""
    return [_task(where, line) for where, line in read_lines(path, flag, "tasks")]


def _task(where: str, line: str) -> Task:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise InvalidArgument(f"{where}: not JSON ({e.msg})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or not obj["text"].strip():
        raise InvalidArgument(f"{where}: expected an object with \"text\", \"task\" and \"answer\"")
    name = obj.get("task")
    if name not in RULES:
        raise InvalidArgument(f"{where}: task {name!r} unknown (known: {', '.join(RULES)})")
    if "answer" not in obj or not RULES[name][1](obj["answer"]):
        raise InvalidArgument(f"{where}: a {name} answer must be {RULES[name][2]}, got {obj.get('answer')!r}")
    chat = obj.get("chat", False)
    if not isinstance(chat, bool):
        raise InvalidArgument(f"{where}: \"chat\" must be true or false, got {chat!r}")
    return Task(name, obj["text"], obj["answer"], chat)


def accuracy(tasks: list[Task], texts: list[str]) -> tuple[float, dict[str, float]]:
    """(overall, per task) fraction of texts whose parsed answer is right."""
    right = [check(t, s) for t, s in zip(tasks, texts, strict=True)]
    by: dict[str, list[bool]] = {}
    for t, ok in zip(tasks, right):
        by.setdefault(t.task, []).append(ok)
    return sum(right) / len(right), {k: sum(v) / len(v) for k, v in by.items()}


def encode_tasks(tasks: list[Task], tokenizer: Any, source: str = "--tasks") -> list[list[int]]:
    """Token ids of each task's prompt (chat template where chat is true), cut like every prompt file's."""
    if tokenizer is None:
        raise InvalidArgument(f"{source}: this model has no tokenizer, so answers cannot be read from its text")
    from ..model.tokenizer import encode_prompt
    from ..prompts import MAX_PROMPT_TOKENS

    return [encode_prompt(tokenizer, t.text, chat=t.chat)[-MAX_PROMPT_TOKENS:] for t in tasks]
