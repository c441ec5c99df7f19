"""bench --sweep: the decode-settings grid on the tiny ONNX Runtime engine, its quality measures,
task accuracy from parsed answers, the figure, and one-line errors for bad specs."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from nemodiff_compile import TINY_ASSET
from nemodiff_compile.bench.sweep import parse_sweep, plan_sweep
from nemodiff_compile.bench.tasks import RULES, Task, accuracy, check, read_tasks
from nemodiff_compile.cli import cli
from nemodiff_compile.errors import InvalidArgument
from tinylm.tasks import task_prompts

ROOT = Path(__file__).resolve().parents[2]
TASKS = ROOT / "docs" / "prompts" / "tiny-tasks.jsonl"
pytestmark = pytest.mark.skipif(not (TINY_ASSET / "config.json").is_file(),
                                reason="the trained tiny checkpoint is not in this build of the package")


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def tasks10(tmp_path_factory):
    """The first 10 committed task prompts: two of each task, plain text and chat."""
    path = tmp_path_factory.mktemp("tasks") / "tasks10.jsonl"
    path.write_text("".join(TASKS.read_text().splitlines(keepends=True)[:10]))
    return path


@pytest.fixture(scope="module")
def report(tiny_engine, tasks10):
    from nemodiff_compile.validate.engine import sweep_engine

    return sweep_engine(tiny_engine, ("threshold=0.0,1.0",), max_new_tokens=16, batch=10, repeats=1,
                        tasks_file=tasks10)


def test_sweep_figures_show_the_commit_rule(report):
    rows = {d["setting"]: d for d in report.to_json_lines()}
    assert list(rows) == ["ar", "dlm t=0", "dlm t=1"]
    json.loads(json.dumps(list(rows.values())))                        # JSON-serialisable lines
    ar, t0, t1 = rows["ar"], rows["dlm t=0"], rows["dlm t=1"]
    assert t1["commits_per_pass"]["min"] == t1["commits_per_pass"]["max"] == 1         # one token per pass
    assert t1["passes_per_block"]["mean"] > 1
    assert t0["passes_per_block"] == {"mean": 1.0, "max": 1}                            # a block in one pass
    assert t0["commits_per_pass"]["min"] == t0["commits_per_pass"]["max"] == 15          # block 16 minus the seed
    assert t0["nfe_by_phase"]["denoise"] == t0["nfe_by_phase"]["commit"]
    assert ar["nfe_by_phase"]["decode"] > 0 and ar["passes_per_block"] is None
    assert t0["tokens_per_forward"] > ar["tokens_per_forward"] == 1.0 > t1["tokens_per_forward"]
    for d in rows.values():
        assert d["nfe"] == sum(d["nfe_by_phase"].values()) and d["tokens_per_s"] > 0 and d["prompts"] == 10
        assert d["nll"] >= ar["nll"] - 1e-6, d                           # AR greedy: the most likely output
    assert t0["nll"] > ar["nll"] + 0.5                                   # committing blind costs likelihood
    table = report.to_table()
    assert "dlm t=1" in table and "commits/pass" in table and "arithmetic" in table


def test_accuracy_is_read_from_the_answers(report, tasks10):
    from nemodiff_compile.model.tokenizer import decode, load_tokenizer

    tok = load_tokenizer(TINY_ASSET)
    tasks = read_tasks(tasks10)
    for row in report.rows:
        texts = [decode(tok, o) for o in row.outputs]
        assert accuracy(tasks, texts)[0] == row.accuracy
        wrong = [replace(t, answer=_wrong(t)) for t in tasks]                 # the same text, wrong answers
        assert accuracy(wrong, texts) == (0.0, {t: 0.0 for t in RULES})
    assert next(r for r in report.rows if r.setting.mode == "ar").accuracy > 0


def _wrong(t: Task):
    return {"arithmetic": lambda a: a + 100, "counting": lambda a: [x + 100 for x in a],
            "calendar": lambda a: "Blursday", "qa": lambda a: "Nobody knows",
            "echo": lambda a: "zzz qqq"}[t.task](t.answer)


def test_rules_parse_the_corpus_formats():
    items = task_prompts()
    assert {i["task"] for i in items} == set(RULES) and len(items) == 40
    for i in items:                                  # the corpus's own continuation is right, a shifted one wrong
        t = Task(i["task"], i["text"], i["answer"], i["chat"])
        assert check(t, i["target"]), i
        assert not check(replace(t, answer=_wrong(t)), i["target"]), i
    t = Task("arithmetic", "What is 3 + 4?", 7)
    assert check(t, "3 + 4 = 7.") and check(t, " 7. 7 + 7 = 15.") and not check(t, "3 + 4 = 8.")
    assert not check(Task("counting", "Count from 5:", [5, 6, 7, 8]), " 5, 6, 7. 8, 9.")
    assert check(Task("qa", "Q: x A:", "The sky is blue."), " The  sky is blue. Q: next")


def test_committed_task_file_is_the_generators_output():
    want = "".join(json.dumps(i) + "\n" for i in task_prompts())
    assert TASKS.read_text() == want, "regenerate: python scripts/make_tiny_tasks.py"
    assert len(read_tasks(TASKS)) == 40


def test_plot_is_a_real_png(report, tmp_path):
    pytest.importorskip("matplotlib")
    import numpy as np
    from PIL import Image

    from nemodiff_compile.bench.plot import plot_sweep

    out = plot_sweep(report.to_json_lines(), tmp_path / "sweep.png", size=(640, 480), title="t")
    img = Image.open(out)
    assert img.format == "PNG" and img.size == (640, 480)
    px = np.asarray(img.convert("RGB")).astype(int)                            # [H, W, 3]
    assert (px.sum(-1) < 600).mean() > 0.02                                    # axes, text, points
    blue = (abs(px - np.array([31, 119, 180])).sum(-1) < 40).sum()             # tab:blue dlm points
    assert blue > 30
    assert not list(tmp_path.glob("*.tmp"))


def test_plan_grid_and_labels():
    plan = plan_sweep(parse_sweep(["mode=dlm,linear-spec", "threshold=0.5,0.9", "block-length=8,16"]),
                      block_size=16)
    assert [s.label for s in plan][:4] == ["ar", "dlm t=0.5 B=8", "dlm t=0.5 B=16", "dlm t=0.9 B=8"]
    assert len(plan) == 1 + 4 + 4 and plan[-1].label == "linear-spec t=0.9 B=16"
    plan = plan_sweep(parse_sweep(["mode=ar,dlm,linear-spec", "steps=2,4"]), block_size=16)
    assert [s.label for s in plan] == ["ar", "dlm steps=2", "dlm steps=4", "linear-spec t=0"]
    assert [s.label for s in plan_sweep(parse_sweep([]), mode="linear-spec")] == ["ar", "linear-spec t=0"]
    with pytest.raises(InvalidArgument, match="steps=20"):
        plan_sweep(parse_sweep(["steps=20"]), block_size=16)


@pytest.mark.parametrize("specs", [
    ["threshold"], ["temperature=0.5"], ["threshold=1.5"], ["threshold=0.5,abc"], ["threshold="],
    ["steps=0"], ["block-length=1"], ["mode=ar,fast"], ["threshold=0.5,0.5"], ["threshold=0.5", "threshold=0.9"],
    ["threshold=0.5", "steps=2"], ["mode=ar", "threshold=0.5"], ["steps=4", "mode=linear-spec"],
])
def test_bad_specs_are_one_line_exit_2(tmp_path, specs):
    args = ["bench", tmp_path / "no-engine"] + [a for s in specs for a in ("--sweep", s)]
    r = run(*args)
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: --sweep") and r.output.count("\n") == 1, r.output


def test_bad_flags_are_one_line_exit_2(tiny_engine, tmp_path):
    cases = [
        (["--sweep", "steps=20"], "error: --sweep steps=20"),                       # > the block length
        (["--tasks", TASKS], "error: --tasks: only with --sweep"),
        (["--sweep", "threshold=0.5", "--plot", tmp_path / "x.jpg"], "error: --plot"),
        (["--sweep", "threshold=0.5", "--plot", tmp_path / "x.png", "--plot-size", "big"], "error: --plot-size"),
        (["--sweep", "threshold=0.5", "--tasks", tmp_path / "none.jsonl"], "error: --tasks"),
        (["--sweep", "mode=dlm", "--mode", "ar"], "error: give the modes"),
        (["--sweep", "threshold=0.5", "--max-new-tokens", "2000"], "error: --max-new-tokens 2000: ar needs"),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task": "arithmetic", "text": "1 + 1 =", "answer": "two"}\n')
    cases.append((["--sweep", "threshold=0.5", "--tasks", bad], "error: --tasks"))
    for extra, start in cases:
        r = run("bench", tiny_engine, *extra)
        assert r.exit_code == 2, (extra, r.output)
        assert r.output.startswith(start) and r.output.count("\n") == 1, (extra, r.output)
    assert not list(tmp_path.glob("*.png"))


def test_cli_sweep_json_lines_plot_and_lossless_linear_spec(tiny_engine, tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    png, jl = tmp_path / "s.png", tmp_path / "s.jsonl"
    r = run("bench", tiny_engine, "--sweep", "mode=ar,linear-spec", "--max-new-tokens", "8", "--repeats", "1",
            "--batch", "4", "--json", "--plot", png, "--plot-size", "400x300", "--json-out", jl)
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [d["setting"] for d in lines] == ["ar", "linear-spec t=0"]
    assert lines == [json.loads(x) for x in jl.read_text().splitlines()]
    ar, ls = lines
    assert ls["nll"] == ar["nll"] and ls["nfe_by_phase"].keys() == {"prefill", "draft", "verify"}  # lossless
    assert ar["accuracy"] is None and ar["prompts"] == 4                      # built-in prompts carry no answers
    assert Image.open(png).size == (400, 300)


def test_fast_engine_sweep_on_the_cpu(tmp_path):
    """bench-gpu --sweep's code (the fast engine's device loop for timed dlm runs) on the CPU."""
    from nemodiff_compile.validate.fast import sweep_fast

    prompts = tmp_path / "p.txt"
    prompts.write_text("What is 3 + 4?\nCount from 5:\n")
    rep = sweep_fast("tiny", ("threshold=1.0", "block-length=4"), precision="fp32", device="cpu", max_new_tokens=8,
                     batch=2, repeats=1, prompts_file=prompts)
    ar, t1 = rep.to_json_lines()
    assert t1["commits_per_pass"]["max"] == 1 and t1["tokens_per_forward"] < 1 <= ar["tokens_per_forward"]
    assert t1["nll"] >= ar["nll"] - 1e-6 and "fast engine fp32" in t1["engine"] and t1["prompts"] == 2
