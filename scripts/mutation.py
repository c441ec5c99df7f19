"""Mutation testing of one core module with mutmut, against only that module's tests.

    python scripts/mutation.py decoding/remask.py          # one module (a key of MODULES)
    python scripts/mutation.py --list                      # the configured modules and their tests

The run happens in a scratch copy (default /tmp/nemodiff-mutation/<module>): the package, the module's
test files and tests/conftest.py, and a setup.cfg telling mutmut which file to mutate and which tests
to run, so the repository is never touched and each module gets its own test selection. Prints
killed / survived / timeout and the kill rate (killed + timeout over all), and the surviving mutants'
names (`mutmut show NAME` in the scratch dir prints a diff). Runs under `nice`; not part of CI.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = "nemodiff_compile"

# module (under nemodiff_compile/) -> the test files that own it
# (fast files only: every surviving mutant runs them whole)
MODULES: dict[str, list[str]] = {
    "decoding/remask.py": ["tests/decoding/test_remask.py", "tests/kernels/test_remask_kernel.py"],
    "decoding/loops.py": ["tests/decoding/test_loops.py"],
    "decoding/policy.py": ["tests/decoding/test_policy.py"],
    "model/rope.py": ["tests/model/test_model.py"],
    "model/cache.py": ["tests/model/test_model.py"],
    "backends/base.py": ["tests/backends/test_base.py"],
    "artifact/manifest.py": ["tests/artifact/test_manifest_checks.py"],
    "quant/qdq.py": ["tests/quant/test_recipe.py"],
}


def prepare(module: str, work: Path) -> None:
    if work.exists():
        shutil.rmtree(work)
    (work / "tests").mkdir(parents=True)
    shutil.copytree(ROOT / PKG, work / PKG, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "tests" / "conftest.py", work / "tests" / "conftest.py")
    for t in MODULES[module]:
        (work / t).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / t, work / t)
    tests = "\n    ".join(MODULES[module])
    (work / "setup.cfg").write_text(
        "[mutmut]\n"
        f"source_paths = {PKG}\n"
        f"only_mutate = {PKG}/{module}\n"
        f"pytest_add_cli_args_test_selection =\n    {tests}\n"
        "pytest_add_cli_args =\n    -x\n    -q\n    -p\n    no:cacheprovider\n")


def results(work: Path) -> dict[str, list[str]]:
    r = subprocess.run(["mutmut", "results", "--all", "true"], cwd=work, capture_output=True, text=True)
    out: dict[str, list[str]] = {}
    for line in r.stdout.splitlines():
        name, _, status = line.strip().rpartition(": ")
        if name:
            out.setdefault(status, []).append(name)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("module", nargs="?", help="a module under nemodiff_compile/, e.g. decoding/remask.py")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--work", type=Path, default=None, help="scratch dir (default /tmp/nemodiff-mutation/<module>)")
    ap.add_argument("--jobs", type=int, default=1, help="mutmut workers (the machine is shared: 1)")
    ap.add_argument("--quiet", action="store_true", help="hide mutmut's progress output")
    a = ap.parse_args()
    if a.list or not a.module:
        for m, t in MODULES.items():
            print(f"{m:24s} {' '.join(t)}")
        return 0
    if a.module not in MODULES:
        print(f"module: {a.module} is not configured; one of {', '.join(MODULES)}", file=sys.stderr)
        return 2
    work = a.work or Path("/tmp/nemodiff-mutation") / a.module.replace("/", "_").removesuffix(".py")
    prepare(a.module, work)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)             # mutmut puts mutants/ first on sys.path itself
    subprocess.run(["nice", "-n", "10", "mutmut", "run", "--max-children", str(a.jobs)], cwd=work, env=env,
                   stdout=subprocess.DEVNULL if a.quiet else None)
    res = results(work)
    counts = {k: len(v) for k, v in res.items()}
    total = sum(counts.values())
    killed = counts.get("killed", 0) + counts.get("timeout", 0)
    checked = total - counts.get("not checked", 0)
    summary = dict(module=a.module, total=total, counts=counts,
                   kill_rate=round(killed / checked, 4) if checked else None,
                   survived=res.get("survived", []) + res.get("no tests", []))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
