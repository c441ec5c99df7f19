"""`nemodiff-compile doctor [GRAPH]`: the TensorRT in use, and the plugin ids a graph needs against
what is registered and loadable, before any build."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import user_errors


@click.command()
@click.argument("graph", required=False, type=click.Path(path_type=Path))
@user_errors
def doctor(graph):
    """Check TensorRT and the plugins a graph (model.onnx or an engine directory) needs."""
    from ..backends import trt_shim
    from ..errors import NemodiffError
    from ..kernels import registry

    if graph is not None and graph.is_dir():
        graph = graph / "model.onnx"
    needed = registry.graph_plugin_ids(graph) if graph is not None else []
    ours = {r.qualified_version for r in registry.implemented_ids()}
    try:
        trt = trt_shim.load()
    except trt_shim.TensorRTUnavailable as e:
        click.echo(f"tensorrt     not importable: {e}")
        trt = None
    registered: set[str] = set()
    if trt is not None:
        click.echo(f"tensorrt     {trt.flavor} {trt.version}; plugin layers "
                   + ("buildable" if trt.can_build_plugins else
                      "NOT buildable (no INetworkDefinition.add_plugin_v3)"))
        libs = registry.load_plugin_libraries(trt)
        click.echo(f"libraries    {', '.join(libs) or f'none (${registry.PLUGIN_PATH_ENV} unset)'}")
        registry.register_plugins(trt)
        registered = {r.qualified_version for r in registry.registered_ids(trt)}
        click.echo(f"registered   {', '.join(sorted(registered)) or 'none'}")
    click.echo(f"provided     {', '.join(sorted(ours))} (nemodiff-compile, Python IPluginV3)")
    if graph is None:
        return
    click.echo(f"graph        {graph}: needs {', '.join(r.qualified_version for r in needed) or 'no plugins'}")
    missing = [r.qualified_version for r in needed
               if r.qualified_version not in registered and r.qualified_version not in ours]
    for r in needed:
        where = ("registered" if r.qualified_version in registered else
                 "loadable (nemodiff-compile)" if r.qualified_version in ours else "MISSING")
        click.echo(f"  {r.qualified_version:<24} {where}")
    if missing:
        raise NemodiffError(f"{graph}: plugin(s) {', '.join(missing)} are neither registered nor provided: load "
                            "their library (IPluginRegistry.load_library) before building")
    if needed and trt is not None and not trt.can_build_plugins:
        raise NemodiffError(f"{graph}: needs plugin layers, which {trt.flavor} {trt.version} cannot build: "
                            "re-export with --remask onnx or build with the tensorrt module")
