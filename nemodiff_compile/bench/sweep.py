"""`bench --sweep`: the refinement budget's trade-off, one decode setting per row, measured in one run.

A sweep is a grid of decode settings, given as one `AXIS=V1,V2,...` per `--sweep`:

  mode=ar,dlm,linear-spec     the modes to sweep (default: the one --mode names, dlm)
  threshold=0.3,0.5,0.9,1.0   dlm: commit threshold; linear-spec: draft threshold      (in [0, 1])
  steps=2,4,8                 dlm only: the fixed-steps schedule, passes per block (excludes threshold)
  block-length=8,16,32        dlm and linear-spec                                      (>= 2)

Several axes make their product; each mode takes only the axes that apply to it (ar takes none).
Greedy AR is always measured first, once, as the reference point. Unset knobs take the loops'
defaults (dlm threshold 0.9, linear-spec 0.0, the model's block length). Example:
`--sweep mode=dlm,linear-spec --sweep threshold=0.5,0.9` -> ar, dlm t=0.5, dlm t=0.9,
linear-spec t=0.5, linear-spec t=0.9.

Per setting, over all prompts (run `batch` rows at a time, temperature 0):
  tokens per forward   a row's tokens / the passes run while it generated, mean over rows (loops.py)
  nfe, nfe_by_phase    forward passes run, summed over the batches
  passes_per_block     refinement passes (denoise; draft for linear-spec) per row and block: mean, max
  commits_per_pass     positions a row commits in one such pass: min, mean, max
  tokens_per_s         generated tokens / wall time of a run, over `repeats` timed runs
  nll                  mean NLL per token of each continuation under the model (bench/quality.py)
  accuracy             with task prompts: answers parsed from the text are right (bench/tasks.py)
The first run of a setting is traced (the figures above, and the warm-up); the timed runs are not, so a
backend that declares a device block refiner (decoding/refine.py: the fast engine) runs greedy dlm blocks
through it (after one untimed run of its own for the graph captures; it commits the same tokens as the
traced host passes).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..errors import InvalidArgument
from ..model.tokenizer import decode
from ..decoding import loops
from ..decoding.policy import DEFAULT_THRESHOLD, DecodePolicy
from .quality import causal_nll
from .tasks import Task, accuracy

AXES = ("mode", "threshold", "steps", "block-length")
APPLIES = {"threshold": ("dlm", "linear-spec"), "steps": ("dlm",), "block-length": ("dlm", "linear-spec")}
PHASE_ABBR = {"prefill": "pre", "decode": "dec", "denoise": "den", "commit": "com", "draft": "dra", "verify": "ver"}


@dataclass(frozen=True)
class Setting:
    mode: str
    threshold: float | None = None
    steps: int | None = None
    block_length: int | None = None
    label: str = ""

    def knobs(self) -> dict[str, Any]:
        return dict(threshold=self.threshold, steps=self.steps, block_length=self.block_length)


# ---- the spec -------------------------------------------------------------------------------------

def parse_sweep(specs: Sequence[str]) -> dict[str, tuple]:
    """`--sweep` values -> {axis: values, in the order given}; every error is one line naming the spec."""
    axes: dict[str, tuple] = {}
    for spec in specs:
        axis, eq, values = spec.partition("=")
        axis = axis.strip().lower()
        if not eq or axis not in AXES:
            raise InvalidArgument(f"--sweep {spec!r}: expected AXIS=V1,V2,... with AXIS one of {', '.join(AXES)}")
        if axis in axes:
            raise InvalidArgument(f"--sweep {spec!r}: axis {axis} given twice (list all its values in one --sweep)")
        parsed = tuple(_value(spec, axis, v.strip()) for v in values.split(","))
        dup = next((v for i, v in enumerate(parsed) if v in parsed[:i]), None)
        if dup is not None:
            raise InvalidArgument(f"--sweep {spec!r}: value {dup} given twice")
        axes[axis] = parsed
    if "threshold" in axes and "steps" in axes:
        raise InvalidArgument("--sweep: threshold and steps are two dlm commit policies; sweep one of them")
    return axes


def _value(spec: str, axis: str, v: str):
    if not v:
        raise InvalidArgument(f"--sweep {spec!r}: empty value")
    if axis == "mode":
        if v not in loops.MODES:
            raise InvalidArgument(f"--sweep {spec!r}: mode {v!r} unknown (modes: {', '.join(loops.MODES)})")
        return v
    if axis == "threshold":
        try:
            t = float(v)
        except ValueError:
            raise InvalidArgument(f"--sweep {spec!r}: {v!r} is not a number") from None
        if not 0.0 <= t <= 1.0:
            raise InvalidArgument(f"--sweep {spec!r}: thresholds are in [0, 1], got {v}")
        return t
    try:
        n = int(v)
    except ValueError:
        raise InvalidArgument(f"--sweep {spec!r}: {v!r} is not an integer") from None
    low = 2 if axis == "block-length" else 1
    if n < low:
        raise InvalidArgument(f"--sweep {spec!r}: {axis} must be at least {low}, got {n}")
    return n


def plan_sweep(axes: dict[str, tuple], *, mode: str = "dlm", block_size: int | None = None) -> list[Setting]:
    """The settings of a parsed spec, AR greedy first; `mode` when the spec sweeps none. With
    block_size (the model's), steps are checked against the block lengths."""
    modes = axes.get("mode", (mode,))
    for axis in axes:
        if axis != "mode" and not set(APPLIES[axis]) & set(modes):
            raise InvalidArgument(f"--sweep {axis}: applies to {' and '.join(APPLIES[axis])}, "
                                  f"not to the swept modes ({', '.join(modes)})")
    show_b = "block-length" in axes
    out = [Setting("ar", label="ar")]
    for m in modes:
        if m == "ar":
            continue
        blens = axes.get("block-length", (None,))
        if m == "dlm" and "steps" in axes:
            policies = [dict(threshold=None, steps=s) for s in axes["steps"]]
        else:
            policies = [dict(threshold=t, steps=None)
                        for t in axes.get("threshold", (DEFAULT_THRESHOLD[m],))]
        for pol, bl in itertools.product(policies, blens):
            if pol["steps"] is not None and block_size is not None:
                try:
                    DecodePolicy("dlm", block_length=bl or block_size, steps=pol["steps"])
                except InvalidArgument as e:
                    raise InvalidArgument(f"--sweep steps={pol['steps']}: {e}") from None
            label = m + (f" steps={pol['steps']}" if pol["steps"] is not None else f" t={pol['threshold']:g}")
            out.append(Setting(m, pol["threshold"], pol["steps"], bl, label + (f" B={bl}" if show_b else "")))
    return out


@dataclass
class SweepInputs:
    """A sweep's spec and prompt source, read and checked before any model loads."""

    axes: dict[str, tuple]
    tasks: list | None = None               # bench.tasks.Task per prompt (--tasks), scored by their answers
    items: list | None = None               # --prompts file items
    where: str = "built-in"

    @classmethod
    def read(cls, specs: Sequence[str], *, mode: str, tasks_file=None, prompts_file=None) -> "SweepInputs":
        from ..prompts import read_prompt_file
        from .tasks import read_tasks

        if tasks_file is not None and prompts_file is not None:
            raise InvalidArgument("give --tasks or --prompts, not both")
        axes = parse_sweep(specs)
        plan_sweep(axes, mode=mode)
        if tasks_file is not None:
            return cls(axes, tasks=read_tasks(tasks_file), where=f"--tasks {tasks_file}")
        if prompts_file is not None:
            return cls(axes, items=read_prompt_file(prompts_file, "--prompts"), where=f"--prompts {prompts_file}")
        return cls(axes)

    def prompts(self, tok, cfg) -> tuple[list[list[int]], str]:
        """(token ids per prompt, the source as the report names it)."""
        from ..prompts import TEXT_PROMPTS, builtin_prompts, encode_prompts
        from .tasks import encode_tasks

        if self.tasks is not None:
            return encode_tasks(self.tasks, tok, self.where), self.where.replace("--tasks ", "tasks ")
        if self.items is not None:
            return encode_prompts(self.items, tok, cfg, self.where), self.where.replace("--prompts ", "prompts ")
        return builtin_prompts(tok, cfg, len(TEXT_PROMPTS)), "built-in"


# ---- measuring ------------------------------------------------------------------------------------

@dataclass
class SweepRow:
    setting: Setting
    tokens: int = 0
    nfe_by_phase: dict[str, int] = field(default_factory=dict)
    tokens_per_forward: float = 0.0
    passes_per_block: list[int] = field(default_factory=list, repr=False)   # per (row, block)
    commits_per_pass: list[int] = field(default_factory=list, repr=False)   # per (row, pass)
    wall_s: list[float] = field(default_factory=list)
    outputs: list[list[int]] = field(default_factory=list, repr=False)
    nll_rows: list[float] = field(default_factory=list, repr=False)
    accuracy: float | None = None
    accuracy_by_task: dict[str, float] | None = None

    @property
    def nfe(self) -> int:
        return sum(self.nfe_by_phase.values())

    @property
    def nll(self) -> float:
        return sum(self.nll_rows) / len(self.nll_rows)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens * len(self.wall_s) / sum(self.wall_s)

    def to_json(self, info: dict[str, Any], ar_nll: float | None) -> dict[str, Any]:
        s, r = self.setting, lambda x, n=4: None if x is None else round(x, n)  # noqa: E731
        wall = sum(self.wall_s) / len(self.wall_s)
        ppb, cpp = self.passes_per_block, self.commits_per_pass
        return dict(setting=s.label, mode=s.mode, threshold=s.threshold, steps=s.steps, block_length=s.block_length,
                    tokens=self.tokens, tokens_per_forward=r(self.tokens_per_forward), nfe=self.nfe,
                    nfe_by_phase=self.nfe_by_phase,
                    passes_per_block=dict(mean=r(sum(ppb) / len(ppb), 3), max=max(ppb)) if ppb else None,
                    commits_per_pass=dict(min=min(cpp), mean=r(sum(cpp) / len(cpp), 3), max=max(cpp)) if cpp else None,
                    tokens_per_s=r(self.tokens_per_s, 2), wall_s_mean=r(wall), ms_per_forward=r(wall / self.nfe * 1e3, 3),
                    nll=r(self.nll), nll_vs_ar=r(None if ar_nll is None else self.nll - ar_nll),
                    accuracy=r(self.accuracy), accuracy_by_task=self.accuracy_by_task and
                    {k: r(v) for k, v in self.accuracy_by_task.items()}, **info)


@dataclass
class SweepReport:
    rows: list[SweepRow]
    info: dict[str, Any]                   # what every row shares: engine, prompts, batch, judge, ...

    def to_json_lines(self) -> list[dict[str, Any]]:
        ar = next((r.nll for r in self.rows if r.setting.mode == "ar"), None)
        return [row.to_json(self.info, ar) for row in self.rows]

    def to_table(self) -> str:
        i = self.info
        lines = [f"sweep on {i['engine']}: {i['prompts']} prompts ({i['prompt_source']}), batch {i['batch']}, "
                 f"{i['max_new_tokens']} new tokens, greedy, {i['repeats']} timed repeats",
                 f"quality: mean NLL per generated token, teacher-forced under {i['judge']} (lower is better)"
                 + ("; acc: task answers parsed from the text" if i.get("tasks") else "")]
        js = self.to_json_lines()
        tasks = list(js[0]["accuracy_by_task"] or {})
        head = ["setting", "tok/fwd", "NFE", "by phase", "passes/blk", "commits/pass", "tok/s", "ms/fwd",
                "NLL", "dNLL(ar)"] + (["acc"] + tasks if tasks else [])
        body = []
        for d in js:
            ppb, cpp = d["passes_per_block"], d["commits_per_pass"]
            cells = [d["setting"], f"{d['tokens_per_forward']:.2f}", str(d["nfe"]),
                     " ".join(f"{PHASE_ABBR.get(k, k)}{v}" for k, v in d["nfe_by_phase"].items()),
                     f"{ppb['mean']:.2f}/{ppb['max']}" if ppb else "-",
                     f"{cpp['min']}-{cpp['max']} ({cpp['mean']:.2f})" if cpp else "-",
                     f"{d['tokens_per_s']:.1f}", f"{d['ms_per_forward']:.2f}", f"{d['nll']:.3f}",
                     f"{d['nll_vs_ar']:+.3f}"]
            if tasks:
                cells += [f"{d['accuracy']:.2f}"] + [f"{d['accuracy_by_task'].get(t, 0):.2f}" for t in tasks]
            body.append(cells)
        widths = [max(len(r[k]) for r in (head, *body)) for k in range(len(head))]
        fmt = lambda r: "  ".join(c.ljust(w) if k in (0, 3) else c.rjust(w)  # noqa: E731
                                  for k, (c, w) in enumerate(zip(r, widths)))
        lines += [fmt(head), fmt(["-" * w for w in widths]), *map(fmt, body)]
        lines.append("passes/blk: mean/max refinement passes (denoise, or draft) per row and block; commits/pass: "
                     "min-max (mean) positions one pass commits; phases: "
                     + " ".join(f"{v}={k}" for k, v in PHASE_ABBR.items()))
        return "\n".join(lines)


def run_sweep(den, settings: list[Setting], prompts: list[list[int]], *, judge, max_new_tokens: int = 64,
              batch: int = 1, repeats: int = 3, tasks: list[Task] | None = None, tokenizer: Any = None,
              info: dict[str, Any] | None = None, log: Callable[[str], None] | None = None) -> SweepReport:
    """Measure every setting on `den` (a Denoiser); `judge` (the reference model) scores the NLL."""
    if repeats < 1 or batch < 1 or max_new_tokens < 1:
        raise InvalidArgument(f"repeats, batch and max_new_tokens must be >= 1, got {repeats}, {batch}, {max_new_tokens}")
    if not prompts:
        raise InvalidArgument("the sweep needs at least one prompt")
    if tasks is not None and (tokenizer is None or len(tasks) != len(prompts)):
        raise InvalidArgument("task prompts need a tokenizer (to read the answers) and one task per prompt")
    for s in settings:                                     # every setting fits before any runs
        _check_room(den, s, max(map(len, prompts)), max_new_tokens)
    chunks = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
    rows = []
    for s in settings:
        row = SweepRow(s)
        gens = [_generate(den, c, s, max_new_tokens, trace=True) for c in chunks]     # figures + warm-up
        if _device_refined(den, s):                       # its own warm-up: graph captures
            for c in chunks:
                _generate(den, c, s, max_new_tokens, trace=False)
        for _ in range(repeats):
            t0 = time.perf_counter()
            for c in chunks:
                _generate(den, c, s, max_new_tokens, trace=False)
            row.wall_s.append(time.perf_counter() - t0)
        _figures(row, gens)
        row.nll_rows = causal_nll(judge, prompts, row.outputs)
        if tasks is not None:
            row.accuracy, row.accuracy_by_task = accuracy(tasks, [decode(tokenizer, o) for o in row.outputs])
        rows.append(row)
        if log is not None:
            acc = "" if row.accuracy is None else f", accuracy {row.accuracy:.2f}"
            log(f"  {s.label}: {row.tokens_per_forward:.2f} tok/fwd, {row.tokens_per_s:.1f} tok/s, "
                f"NLL {row.nll:.3f}{acc}")
    info = dict(info or {})
    info.setdefault("engine", "engine")
    info.setdefault("prompt_source", "given")
    info.update(prompts=len(prompts), batch=batch, max_new_tokens=max_new_tokens, repeats=repeats,
                tasks=tasks is not None)
    info.setdefault("judge", "the reference model")
    return SweepReport(rows, info)


def room(s: Setting, max_new_tokens: int, block_size: int) -> int:
    """Cache positions a setting's generation needs beyond the prompt (as the loops reserve them)."""
    blen = s.block_length or block_size
    return {"ar": max_new_tokens, "dlm": math.ceil(max_new_tokens / blen) * blen,
            "linear-spec": max_new_tokens + blen}[s.mode]


def _check_room(den, s: Setting, longest: int, max_new: int) -> None:
    need = room(s, max_new, den.config.block_size)
    if longest + need > den.max_len:
        raise InvalidArgument(f"--max-new-tokens {max_new}: {s.label} needs {longest + need} cache positions "
                              f"(longest prompt {longest} + generation {need}), the engine has {den.max_len}")


def _policy(s: Setting) -> DecodePolicy:
    return DecodePolicy(s.mode, **(s.knobs() if s.mode != "ar" else {}))


def _device_refined(den, s: Setting) -> bool:
    """Untraced greedy dlm runs on the backend's device block refiner, where it declares one."""
    return s.mode == "dlm" and den.block_refiner(_policy(s).resolve(den.config)) is not None


def _generate(den, prompts: list[list[int]], s: Setting, max_new_tokens: int, *, trace: bool):
    return loops.generate(den, prompts, _policy(s), max_new_tokens=max_new_tokens, trace=trace)


def _figures(row: SweepRow, gens: list[loops.Generation]) -> None:
    rates = []
    for g in gens:
        row.outputs += g.tokens
        row.tokens += sum(len(t) for t in g.tokens)
        for k, v in g.nfe_by_phase.items():
            row.nfe_by_phase[k] = row.nfe_by_phase.get(k, 0) + v
        rates += [len(t) / n for t, n in zip(g.tokens, g.row_nfe) if n]
        per_block: dict[tuple[int, int], int] = {}
        for rec in g.trace:
            if rec.phase in ("denoise", "draft") and rec.committed is not None:
                counts = rec.committed.sum(1)                                   # [B] positions committed
                for b in counts.nonzero()[:, 0].tolist():                       # rows that refined
                    row.commits_per_pass.append(int(counts[b]))
                    per_block[b, rec.block] = per_block.get((b, rec.block), 0) + 1
        row.passes_per_block += list(per_block.values())
    row.tokens_per_forward = sum(rates) / len(rates) if rates else 0.0

