"""Which plugin ids a graph needs, which are registered in TensorRT, and registering ours.

`graph_plugin_ids` reads the ONNX (no weights) and lists every node whose domain is not a standard
ONNX domain: the TensorRT parser resolves those by plugin name (= op_type), version (attribute
`plugin_version`, default "1") and namespace (attribute `plugin_namespace`, else the node's domain
since TensorRT 10.10). `register_plugins` registers the creators this package implements for those
ids (today `nemodiff::Remask`, Python IPluginV3, see remask/trt_plugin.py) in TensorRT's registry,
before parsing. `registered_ids` lists what the registry holds (ours, NVIDIA's, loaded libraries).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import NemodiffError

_STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft", "pkg.onnxscript.torch_lib.common")


@dataclass(frozen=True)
class PluginRef:
    name: str
    namespace: str
    version: str

    @property
    def qualified(self) -> str:
        return f"{self.namespace}::{self.name}" if self.namespace else self.name

    @property
    def qualified_version(self) -> str:
        return f"{self.qualified}/{self.version}"

    @classmethod
    def parse(cls, text: str) -> "PluginRef":
        """'nemodiff::Remask/1' (as manifests record it) -> PluginRef."""
        qualified, _, version = text.partition("/")
        namespace, _, name = qualified.rpartition("::")
        return cls(name, namespace, version or "1")


def graph_plugin_ids(onnx_path: str | Path) -> list[PluginRef]:
    import onnx

    path = Path(onnx_path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise NemodiffError(f"{path}: not a readable ONNX file ({type(e).__name__})") from None
    local_functions = {(f.domain, f.name) for f in model.functions}
    found: dict[tuple, PluginRef] = {}
    for node in model.graph.node:
        if node.domain in _STANDARD_DOMAINS or (node.domain, node.op_type) in local_functions:
            continue
        attrs = {a.name: a for a in node.attribute}
        version = attrs["plugin_version"].s.decode() if "plugin_version" in attrs else "1"
        namespace = attrs["plugin_namespace"].s.decode() if "plugin_namespace" in attrs else node.domain
        ref = PluginRef(node.op_type, namespace, version)
        found[(ref.name, ref.namespace, ref.version)] = ref
    return sorted(found.values(), key=lambda r: r.qualified_version)


def _ours():
    """PluginRef -> factory(trt) returning a creator object, for the plugins this package implements."""
    from .remask.spec import REMASK

    def remask_creator(trt):
        from .remask.trt_plugin import make_creator

        return make_creator(trt.mod)

    return {PluginRef(REMASK.name, REMASK.namespace, REMASK.version): remask_creator}


PLUGIN_PATH_ENV = "NEMODIFF_PLUGIN_LIBS"     # os.pathsep-separated plugin libraries (e.g. libnemodiff_plugins.so)


def plugin_libraries() -> list[Path]:
    """Plugin libraries to load before building or deserializing: $NEMODIFF_PLUGIN_LIBS."""
    import os

    return [Path(p) for p in os.environ.get(PLUGIN_PATH_ENV, "").split(os.pathsep) if p]


def load_plugin_libraries(trt) -> list[str]:
    """Load each library in `plugin_libraries()` into TensorRT's registry (its creators register
    themselves through getCreators); a missing or unloadable one is a one-line error naming it."""
    loaded = []
    for path in plugin_libraries():
        key = (trt.flavor, str(path))
        if key in _REGISTERED:
            loaded.append(str(path))
            continue
        if not path.is_file():
            raise NemodiffError(f"${PLUGIN_PATH_ENV}: {path} not found")
        handle = trt.mod.get_plugin_registry().load_library(str(path))
        if handle is None:
            raise NemodiffError(f"${PLUGIN_PATH_ENV}: TensorRT could not load {path} (built for another "
                                "TensorRT, or no getCreators entry point)")
        _REGISTERED[key] = handle
        loaded.append(str(path))
    return loaded


_REGISTERED: dict[tuple[str, str], object] = {}     # keeps Python creators alive (TensorRT holds raw pointers)


def registered_ids(trt) -> list[PluginRef]:
    reg = trt.mod.get_plugin_registry()
    creators = reg.all_creators_recursive if hasattr(reg, "all_creators_recursive") else reg.all_creators
    out = {PluginRef(c.name, c.plugin_namespace, c.plugin_version) for c in creators}
    return sorted(out, key=lambda r: r.qualified_version)


def implemented_ids() -> list[PluginRef]:
    return sorted(_ours(), key=lambda r: r.qualified_version)


def register_plugins(trt, needed: list[PluginRef] | None = None) -> list[PluginRef]:
    """Register our creators for `needed` (default: all of ours) unless a loaded library already did
    (the C++ plugin wins over the Python one when $NEMODIFF_PLUGIN_LIBS names it); refuse ids nobody
    provides."""
    load_plugin_libraries(trt)
    ours = _ours()
    have = set(registered_ids(trt))
    done = []
    for ref in (needed if needed is not None else list(ours)):
        key = (trt.flavor, ref.qualified_version)
        if ref in have or key in _REGISTERED:
            done.append(ref)
            continue
        if ref not in ours:
            raise NemodiffError(f"the graph needs TensorRT plugin {ref.qualified_version}, which neither "
                                "nemodiff-compile nor the loaded plugin libraries provide "
                                "(run `nemodiff-compile doctor` on the graph)")
        creator = ours[ref](trt)
        if not trt.mod.get_plugin_registry().register_creator(creator, ref.namespace):
            raise NemodiffError(f"TensorRT refused to register plugin {ref.qualified_version}")
        _REGISTERED[key] = creator
        done.append(ref)
    return done
