#!/usr/bin/env python
"""Summarize `validate DIR --json` reports (or scripts/quant_heldout.py JSON lines) into the figures
README's "Quantization" section quotes: per report, the verdict, the pooled trajectory agreement (all /
ar / dlm / linear-spec), the lowest per-prompt figure, the lowest teacher-forced token agreement, the
draft passes' logit cosine (min / 5th percentile), the lowest cosine p05 and the highest mean KL over
pass kinds. The verdict is re-judged with today's recipe bounds (`quant.recipe_for`; the file name's
first part names the precision, "broken" is judged by fp8's): the free-running trajectory floor from the
recipe, every other failure as the report recorded it (those bounds did not change).

    python scripts/quant_table.py docs/benchmarks/quant-tiny/*.json docs/benchmarks/quant-tiny/*.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(path: Path):
    text = path.read_text()
    if path.suffix == ".jsonl":                                   # quant_heldout.py: one line per variant
        for line in text.splitlines():
            if line.startswith("{"):
                d = json.loads(line)
                yield f"{path.name}:{d['variant']}", _from_heldout(d)
        return
    d = json.loads(text)
    d = d.get("build_validation", d)          # a build's manifest excerpt: its own validation
    yield path.name, _from_validate(d)


def _from_validate(d: dict) -> dict:
    """A `validate --json` report, or the validation a manifest records (the same figures, fewer fields)."""
    modes = d["per_mode"]
    phases = [(m, ph, dict(x, kl=x.get("kl") or {"mean": x["kl_mean"]})) for m, v in modes.items()
              for ph, x in v["phases"].items()]
    draft = [x["cosine"] for _, ph, x in phases if ph == "draft"]
    return dict(passed=d["passed"], prompts=d.get("settings", d).get("prompts"), all=d["token_agreement"],
                modes={m: v["token_agreement"] for m, v in modes.items()},
                prompt_min={m: v["prompt_spread"]["min"] for m, v in modes.items()},
                forced=min(v["forced_token_agreement"] for v in modes.values()),
                draft=(draft[0]["min"], draft[0]["p05"]) if draft else None,
                cos_p05=min(x["cosine"]["p05"] for *_, x in phases), kl=max(x["kl"]["mean"] for *_, x in phases),
                failures=d["failures"])


def _from_heldout(d: dict) -> dict:
    modes = d["modes"]
    phases = [(m, ph, x) for m, v in modes.items() for ph, x in v["phases"].items()]
    draft = [x for _, ph, x in phases if ph == "draft"]
    return dict(passed=None, prompts=d["prompts"], all=d["trajectory"],
                modes={m: v["trajectory"] for m, v in modes.items()},
                prompt_min={m: v["prompts"]["min"] for m, v in modes.items()},
                forced=min(v["forced"] for v in modes.values()),
                draft=(draft[0]["cos_min"], draft[0]["cos_p05"]) if draft else None,
                cos_p05=min(x["cos_p05"] for *_, x in phases), kl=max(x["kl_mean"] for *_, x in phases),
                failures=[])


def rejudge(name: str, r: dict) -> dict:
    """r with `passed` / `failures` under the current recipe's trajectory floor."""
    from nemodiff_compile.quant import RECIPES

    precision = name.split(".")[0]
    recipe = RECIPES.get("fp8" if precision == "broken" else precision)
    if recipe is None or r["passed"] is None:
        return r
    floor = recipe.thresholds["mean_token_agreement"]
    kept = [f for f in r["failures"] if "trajectory token agreement over all prompts" not in f]
    kept += [f"{m}: trajectory token agreement over all prompts {a:.4f} < {floor}"
             for m, a in r["modes"].items() if a < floor]
    return dict(r, passed=not kept, failures=kept)


def main(paths: list[str]) -> None:
    print("report | verdict | prompts | trajectory all / ar / dlm / linear-spec | min per prompt (dlm) | "
          "teacher-forced min | draft cosine min / p05 | min cosine p05 | max mean KL")
    for p in paths:
        for name, r in rows(Path(p)):
            r = rejudge(name, r)
            m = r["modes"]
            verdict = "-" if r["passed"] is None else ("PASSED" if r["passed"] else "FAILED")
            draft = "-" if r["draft"] is None else f"{r['draft'][0]:.3f} / {r['draft'][1]:.4f}"
            print(f"{name} | {verdict} | {r['prompts']} | {r['all']:.4f} / {m.get('ar', 0):.4f} / {m.get('dlm', 0):.4f} / "
                  f"{m.get('linear-spec', 0):.4f} | {r['prompt_min'].get('dlm', 0):.3f} | {r['forced']:.4f} | {draft} | "
                  f"{r['cos_p05']:.4f} | {r['kl']:.2e}")
            for f in r["failures"]:
                print(f"    failed: {f}")


if __name__ == "__main__":
    main(sys.argv[1:])
