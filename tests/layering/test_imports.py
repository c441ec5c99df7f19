"""The package's layering, read from the source (every import, function-local ones included):

- no import cycle between the package's parts (its top-level modules and subpackages);
- the runtime side (what a service embeds) never imports the exporter, quantization, the TensorRT
  builder or the build pipeline, so it needs neither torch.onnx nor ModelOpt nor the builder.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "nemodiff_compile"
RUNTIME = {"errors", "fsutil", "config", "build_config", "prompts", "hub", "progress", "model", "decoding", "kernels",
           "artifact", "backends", "session", "serve"}
BUILD_SIDE = {"export", "quant", "trt", "pipeline"}


def _part(module: str) -> str:
    """'nemodiff_compile.backends.ort' -> 'backends'; the package itself -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> set[str]:
    """Absolute names of the package's modules that `path` imports (relative imports resolved)."""
    rel = path.relative_to(PKG.parent).with_suffix("")
    here = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "nemodiff_compile":
                continue
            if mod == "nemodiff_compile":      # `from .. import x`: x may be a part (a subpackage)
                for a in node.names:
                    out.add(f"nemodiff_compile.{a.name}" if (PKG / a.name).exists()
                            or (PKG / f"{a.name}.py").exists() else mod)
            else:
                out.add(mod)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "nemodiff_compile")
    return out


def _graph() -> dict[str, set[str]]:
    g: dict[str, set[str]] = {}
    for f in PKG.rglob("*.py"):
        src = _part(".".join(f.relative_to(PKG.parent).with_suffix("").parts))
        if f.parent == PKG:
            src = f.stem
        for mod in _imports(f):
            dst = _part(mod)
            if dst != src:
                g.setdefault(src, set()).add(dst)
        g.setdefault(src, set())
    return g


def _cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one part (Tarjan)."""
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_between_parts():
    assert _cycles(_graph()) == []


def test_runtime_never_imports_the_build_side():
    g = _graph()
    bad = sorted(f"{src} -> {dst}" for src in RUNTIME for dst in g.get(src, ()) if dst in BUILD_SIDE)
    assert bad == []


def test_the_checker_sees_cycles_and_function_local_imports(tmp_path):
    """The checker itself: a cycle hidden in a function-local import is found."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    f = PKG / "session.py"
    assert "nemodiff_compile.decoding" in {m.rsplit(".", 1)[0] if m.count(".") > 1 else m
                                           for m in _imports(f)} or any(m.startswith("nemodiff_compile.decoding")
                                                                        for m in _imports(f))
    g = _graph()
    assert "backends" in g["session"] and "model" in g["backends"]
