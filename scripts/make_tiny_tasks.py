#!/usr/bin/env python
"""Write the tiny model's task prompts (arithmetic, counting, calendar, Q&A facts, echo), made by the
corpus generators with their own seed, as the JSON lines `nemodiff-compile bench --tasks` reads.

    python scripts/make_tiny_tasks.py [--per-task 8] [--seed 2026] [--out docs/prompts/tiny-tasks.jsonl]

Deterministic: the same arguments write the same bytes (tests/bench/test_sweep.py holds the committed
file equal to the default output).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tinylm.tasks import SEED, task_prompts  # noqa: E402


def tasks_jsonl(per_task: int = 8, seed: int = SEED) -> str:
    return "".join(json.dumps(item) + "\n" for item in task_prompts(per_task, seed))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-task", type=int, default=8)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "prompts" / "tiny-tasks.jsonl")
    a = ap.parse_args()
    tmp = a.out.with_name(a.out.name + ".tmp")
    tmp.write_text(tasks_jsonl(a.per_task, a.seed))
    tmp.replace(a.out)
    print(f"wrote {a.out} ({a.per_task} prompts per task, seed {a.seed})")


if __name__ == "__main__":
    main()
