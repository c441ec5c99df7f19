"""Manifest checks on small hand-made engine directories (no build): each refusal, and versions
compared as versions, not strings ("1.9" < "1.18")."""

import importlib.metadata
import json

import pytest

from nemodiff_compile.artifact import manifest as mf
from nemodiff_compile.artifact.manifest import EngineError, Manifest, read_manifest, write_manifest


@pytest.fixture
def engine(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"abcdefgh")
    m = Manifest(backend="onnxruntime", precision="fp32", source="x", model_config={}, weights_sha256="0",
                 io_spec={}, buckets={}, artifacts={"w.bin": mf.file_digest(tmp_path / "w.bin")},
                 tool_versions={}, requires={})
    write_manifest(tmp_path, m)
    return tmp_path


def _edit(engine, fn):
    path = engine / "manifest.json"
    raw = json.loads(path.read_text())
    fn(raw)
    path.write_text(json.dumps(raw))


def _fake_versions(monkeypatch, **have):
    def version(name):
        if name not in have:
            raise importlib.metadata.PackageNotFoundError(name)
        return have[name]
    monkeypatch.setattr(importlib.metadata, "version", version)


def _require(engine, **req):
    m = read_manifest(engine)
    m.requires = req
    write_manifest(engine, m)


def test_intact_directory_reads_back(engine):
    m = read_manifest(engine, deep=True)
    assert m.artifacts["w.bin"]["bytes"] == 8 and m.requires == {}


def test_manifest_without_checksum_is_refused(engine):
    _edit(engine, lambda raw: raw.pop("checksum"))
    with pytest.raises(EngineError, match="checksum mismatch"):
        read_manifest(engine)


def test_manifest_with_a_stale_checksum_is_refused(engine):
    _edit(engine, lambda raw: raw.update(source="y"))
    with pytest.raises(EngineError, match="checksum mismatch"):
        read_manifest(engine)


def test_non_object_manifest_is_refused(engine):
    (engine / "manifest.json").write_text("[1, 2]")
    with pytest.raises(EngineError, match="checksum mismatch"):
        read_manifest(engine)


def test_unreadable_manifest_is_refused(engine):
    (engine / "manifest.json").write_text("{not json")
    with pytest.raises(EngineError, match="unreadable"):
        read_manifest(engine)


def _resign(raw):
    raw["checksum"] = mf._checksum(raw)


def test_other_format_version_is_refused(engine):
    _edit(engine, lambda raw: (raw.update(format_version=mf.FORMAT_VERSION + 1), _resign(raw)))
    with pytest.raises(EngineError, match=f"format version {mf.FORMAT_VERSION + 1}, this nemodiff-compile reads"):
        read_manifest(engine)


def test_unknown_fields_are_refused(engine):
    _edit(engine, lambda raw: (raw.update(surprise=1), _resign(raw)))
    with pytest.raises(EngineError, match="unexpected fields"):
        read_manifest(engine)


def test_missing_and_resized_artifacts_are_refused(engine):
    (engine / "w.bin").write_bytes(b"abcdefg")
    with pytest.raises(EngineError, match="w.bin: 7 bytes, the build wrote 8"):
        read_manifest(engine)
    (engine / "w.bin").unlink()
    with pytest.raises(EngineError, match="w.bin: missing"):
        read_manifest(engine)


def test_same_size_edit_needs_the_deep_check(engine):
    (engine / "w.bin").write_bytes(b"abcdefgX")
    read_manifest(engine)
    with pytest.raises(EngineError, match="sha256 mismatch"):
        read_manifest(engine, deep=True)


@pytest.mark.parametrize("have, need", [("1.18.0", "1.9"), ("1.10", "1.9.3"), ("2.0", "1.18"),
                                        ("1.18.0rc1", "1.18"), ("1.18", "1.18.0")])
def test_versions_compare_as_versions(engine, monkeypatch, have, need):
    _require(engine, onnxruntime=need)
    _fake_versions(monkeypatch, onnxruntime=have)
    assert read_manifest(engine).requires == {"onnxruntime": need}


@pytest.mark.parametrize("have, need", [("1.9.0", "1.18"), ("1.17.9", "1.18"), ("0.99", "1.0"),
                                        ("1.18.0", "1.18.1")])
def test_older_tool_is_refused(engine, monkeypatch, have, need):
    _require(engine, onnxruntime=need)
    _fake_versions(monkeypatch, onnxruntime=have)
    with pytest.raises(EngineError, match=f"needs onnxruntime >= {need}, found {have}: upgrade onnxruntime"):
        read_manifest(engine)


def test_missing_tool_is_refused(engine, monkeypatch):
    _require(engine, onnxruntime="1.18")
    _fake_versions(monkeypatch)
    with pytest.raises(EngineError, match="needs onnxruntime >= 1.18, which is not installed"):
        read_manifest(engine)


def test_version_tuple():
    assert mf._version_tuple("1.18.0rc1") == (1, 18, 0)
    assert mf._version_tuple("2.13.0+cpu") == (2, 13, 0)
    assert mf._version_tuple("1.9") < mf._version_tuple("1.18")
    assert mf._version_tuple("1.2.3.4") == (1, 2, 3)
    assert mf._version_tuple("3.dev0") == (3, 0, 0) and mf._version_tuple("7") == (7, 0, 0)


def test_refusals_name_the_file_and_the_rebuild(engine, tmp_path, monkeypatch):
    rebuild = (f"rebuild it with `nemodiff-compile build --model x --precision fp32 --backend onnxruntime "
               f"--output {engine}`")
    with pytest.raises(EngineError, match="nope: engine directory not found"):
        read_manifest(tmp_path / "nope")
    _require(engine, onnxruntime="1.18")
    _fake_versions(monkeypatch, onnxruntime="1.9")
    with pytest.raises(EngineError) as e:
        read_manifest(engine)
    assert str(e.value) == (f"{engine / 'manifest.json'}: needs onnxruntime >= 1.18, found 1.9: upgrade onnxruntime "
                            f"or {rebuild} under this one")
    (engine / "manifest.json").unlink()
    with pytest.raises(EngineError) as e:
        read_manifest(engine)
    assert str(e.value) == (f"{engine / 'manifest.json'}: missing; {engine} is not an engine directory "
                            "(give a folder that `nemodiff-compile build` wrote)")     # never "build over it"


def test_checksum_ignores_key_order_and_the_file_is_readable(engine):
    path = engine / "manifest.json"
    text = path.read_text()
    assert '\n  "backend": "onnxruntime",\n' in text                     # indented, one field a line
    raw = json.loads(text)
    path.write_text(json.dumps(dict(reversed(list(raw.items())))))      # same content, other key order
    assert read_manifest(engine).backend == "onnxruntime"


def test_manifest_is_written_beside_itself_then_renamed(engine, monkeypatch):
    """Atomic: the temp file is in the engine directory (a rename across file systems is a copy)."""
    import os

    moves = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (moves.append((a, b)), real(a, b)))
    write_manifest(engine, read_manifest(engine))
    ((src, dst),) = moves
    assert os.path.dirname(src) == str(engine) and dst == engine / "manifest.json"
    assert os.path.basename(src).startswith(".manifest.")
    assert sorted(p.name for p in engine.iterdir()) == ["manifest.json", "w.bin"]
    assert oct(os.stat(dst).st_mode & 0o777) == "0o644"
