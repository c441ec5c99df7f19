"""open_engine: one read of the manifest for whoever opens an engine directory (Session, validate, bench)."""

import pytest

from nemodiff_compile.backends.open import open_engine
from nemodiff_compile.errors import NemodiffError


@pytest.fixture
def reads(monkeypatch):
    """Count manifest reads wherever they come from."""
    import nemodiff_compile.artifact.manifest as manifest
    import nemodiff_compile.backends.open as opener

    calls, real = [], manifest.read_manifest

    def counted(*a, **kw):
        calls.append(a[0])
        return real(*a, **kw)

    monkeypatch.setattr(manifest, "read_manifest", counted)
    monkeypatch.setattr(opener, "read_manifest", counted)
    return calls


def test_open_engine(tiny_engine, reads):
    from nemodiff_compile.backends.ort import OrtDenoiser

    e = open_engine(tiny_engine, threads=1)
    assert isinstance(e.denoiser, OrtDenoiser) and e.manifest.backend == "onnxruntime" and len(reads) == 1
    assert e.denoiser.config == e.config and e.denoiser.max_len == e.manifest.buckets["max_context"]
    assert not e.denoiser.return_logits and "logits" in e.spec.output_names()
    assert open_engine(tiny_engine, threads=1, max_len=64, return_logits=None).denoiser.return_logits
    assert (e.tokenizer is None) == (not (tiny_engine / "tokenizer.json").is_file())
    with pytest.raises(NemodiffError):
        open_engine(tiny_engine / "missing")


def test_session_and_validate_open_once(tiny_engine, reads):
    from nemodiff_compile import load_reference
    from nemodiff_compile.session import Session
    from nemodiff_compile.validate.engine import open_pair

    Session.open(tiny_engine, threads=1).close()
    assert len(reads) == 1
    manifest, engine, ref, _ = open_pair(tiny_engine, reference=load_reference("tiny"), threads=1)
    assert len(reads) == 2 and engine.return_logits and ref.max_len == engine.max_len
