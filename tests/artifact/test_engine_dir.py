"""The engine directory: atomic build, manifest checks, and refusal of corrupted directories."""

import json
import shutil

import pytest
from click.testing import CliRunner

from nemodiff_compile.artifact.manifest import EngineError, Manifest, read_manifest, write_manifest
from nemodiff_compile.cli import cli

pytest.importorskip("onnx")


@pytest.fixture
def built(tiny_engine):
    return tiny_engine


@pytest.fixture
def copy(built, tmp_path):
    dst = tmp_path / "engine"
    shutil.copytree(built, dst)
    return dst


def test_layout_and_manifest(built):
    m = read_manifest(built, deep=True)
    assert m.backend == "onnxruntime" and m.precision == "fp32" and m.source == "tiny"
    assert {"model.onnx", "model.onnx.data", "config.json"} <= set(m.artifacts)
    assert m.io_spec["opset"] >= 21 and m.buckets["block_length"] == m.model_config["block_size"]
    assert "onnxruntime" in m.tool_versions and m.validation is None
    assert not [p for p in built.parent.iterdir() if p.name.startswith(".")]   # no temp dirs left


def test_edited_manifest_is_refused(copy):
    path = copy / "manifest.json"
    raw = json.loads(path.read_text())
    raw["precision"] = "fp8"
    path.write_text(json.dumps(raw))
    with pytest.raises(EngineError, match="edited or corrupted.*rebuild"):
        read_manifest(copy)


def test_truncated_weights_are_refused(copy):
    data = copy / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(EngineError, match="model.onnx.data: 1000 bytes.*truncated"):
        read_manifest(copy)


def test_altered_weights_are_caught_by_the_deep_check(copy):
    data = copy / "model.onnx.data"
    b = bytearray(data.read_bytes())
    b[100] ^= 0xFF
    data.write_bytes(bytes(b))
    read_manifest(copy)                                   # sizes still match
    with pytest.raises(EngineError, match="sha256 mismatch"):
        read_manifest(copy, deep=True)


def test_newer_tool_requirement_is_refused(copy):
    m = read_manifest(copy)
    m.requires = {"onnxruntime": "99.0"}
    write_manifest(copy, m)
    with pytest.raises(EngineError, match="needs onnxruntime >= 99.0, found"):
        read_manifest(copy)


def test_missing_manifest_and_missing_dir(copy, tmp_path):
    (copy / "manifest.json").unlink()
    with pytest.raises(EngineError, match="not an engine directory"):
        read_manifest(copy)
    with pytest.raises(EngineError, match="not found"):
        read_manifest(tmp_path / "nope")


def test_cli_inspect_and_refusal(built, copy):
    r = CliRunner().invoke(cli, ["inspect", str(built)])
    assert r.exit_code == 0 and "past_keys" in r.output and "cache_len" in r.output
    (copy / "model.onnx").write_bytes(b"")
    r = CliRunner().invoke(cli, ["inspect", str(copy)])
    assert r.exit_code == 2
    assert r.output.count("\n") == 1 and "model.onnx: 0 bytes" in r.output


def test_unsupported_precision_is_one_line(tmp_path):
    r = CliRunner().invoke(cli, ["build", "--precision", "nvfp4", "--output", str(tmp_path / "e")])
    assert r.exit_code == 2 and "nvfp4" in r.output and r.output.count("\n") == 1
    assert not (tmp_path / "e").exists()


def test_manifest_round_trip(tmp_path):
    m = Manifest(backend="onnxruntime", precision="fp32", source="x", model_config={}, weights_sha256="0",
                 io_spec={}, buckets={}, artifacts={}, tool_versions={})
    write_manifest(tmp_path, m)
    assert read_manifest(tmp_path) == m
