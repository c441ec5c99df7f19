"""Issue 12: a build never destroys user data, engines are swapped atomically, every bad input is one line.

Refusals happen before any export, so they run in-process through click's runner; the kill, Ctrl-C and
concurrency tests run real `python -m nemodiff_compile build` subprocesses on a one-layer checkpoint
(the cheapest real export) and copy the session's built engine instead of building one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from nemodiff_compile.artifact.manifest import EngineError, read_manifest
from nemodiff_compile.cli import cli
from nemodiff_compile.errors import InvalidArgument, NemodiffError
from nemodiff_compile.fsutil import partials

pytest.importorskip("onnxruntime")
REPO = Path(__file__).resolve().parents[1]


def invoke(*args, cwd: Path | None = None):
    old = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        return CliRunner().invoke(cli, [str(a) for a in args])
    finally:
        os.chdir(old)


def one_line(r, *needles: str, code: int = 2) -> str:
    """The result is exactly one `error: ...` line (no traceback, no progress lines) with exit `code`."""
    assert r.exit_code == code, r.output
    assert isinstance(r.exception, SystemExit), r.exception     # not an uncaught exception
    assert "Traceback" not in r.output and r.output.startswith("error: ") and r.output.count("\n") == 1, r.output
    for n in needles:
        assert n in r.output, (n, r.output)
    return r.output.strip()


def tree(root: Path) -> dict[str, str]:
    """Every file under root (hidden ones too) -> sha256 of its bytes, or "dir"/"link -> target"."""
    out = {}
    for p in sorted(root.rglob("*")):
        key = str(p.relative_to(root))
        if p.is_symlink():
            out[key] = "link -> " + os.readlink(p)
        elif p.is_dir():
            out[key] = "dir"
        else:
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def engine(tiny_engine, tmp_path) -> Path:
    """A copy of the session's tiny engine (tests alter it)."""
    dst = tmp_path / "engines" / "tiny"
    shutil.copytree(tiny_engine, dst)
    return dst


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory) -> Path:
    """The tiny geometry with one layer, random weights, in the Hugging Face layout (its export is the
    cheapest real build)."""
    from nemodiff_compile.config import PRESETS
    from nemodiff_compile.model.checkpoint import random_model, save_checkpoint

    return save_checkpoint(random_model(PRESETS["tiny"].replace(num_hidden_layers=1)),
                           tmp_path_factory.mktemp("ckpt") / "one-layer")


# ---- data loss: what --output may replace ---------------------------------------------------------


def test_output_that_is_not_an_engine_is_refused_before_any_work(tmp_path, engine, small_ckpt):
    """A user's folder, a file, a foreign manifest, an engine holding a user's file, a symbolic link,
    the checkpoint itself or its parent, the current folder or its parent: one line each, untouched."""
    user = tmp_path / "mine"
    (user / "sub").mkdir(parents=True)
    (user / "thesis.txt").write_text("years of work")
    (user / "sub" / "data.bin").write_bytes(b"\0\1\2")
    afile = tmp_path / "notes.txt"
    afile.write_text("keep me")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.json").write_text('{"name": "someone else\'s"}')
    (engine / "my-notes.md").write_text("added by the user")
    link = tmp_path / "link"
    link.symlink_to(engine)
    ckpt = tmp_path / "models" / "ckpt"
    shutil.copytree(small_ckpt, ckpt)
    work = tmp_path / "work"                                     # the current folder, with a user's file
    work.mkdir()
    (work / "draft.txt").write_text("unsaved")
    cases = [
        (["--output", user], "no manifest.json; it holds sub, thesis.txt"),
        (["--output", afile], "an existing file, not an engine directory"),
        (["--output", foreign], "has a manifest.json that nemodiff-compile did not write"),
        (["--output", engine], "also holds my-notes.md"),
        (["--output", link], "a symbolic link"),
        (["--model", ckpt, "--output", ckpt], "the source checkpoint folder would be replaced"),
        (["--model", ckpt, "--output", ckpt.parent], "a folder holding the source checkpoint"),
        (["--output", "."], "the current folder would be replaced"),
        (["--output", ".."], "a folder holding the current folder"),
        (["--output", afile / "engine"], "notes.txt is a file, not a folder"),
    ]
    before = tree(tmp_path)
    for args, why in cases:
        r = invoke("build", "--backend", "onnxruntime", "--no-validate", *args, cwd=work)
        msg = one_line(r, why)
        assert "rm " not in msg and "delete it" not in msg, msg
        assert tree(tmp_path) == before, args                      # nothing touched, nothing left beside
    assert (user / "thesis.txt").read_text() == "years of work"


def test_hints_name_the_engines_own_build_and_never_a_folder_to_delete(engine, tmp_path):
    m = json.loads((engine / "manifest.json").read_text())
    assert (m["source"], m["precision"]) == ("tiny", "fp32")
    m["source"], m["precision"] = "/models/nld-8b", "fp8"           # an edited manifest: what can be read
    (engine / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineError, match=r"checksum mismatch\); rebuild it with `nemodiff-compile build "
                                          r"--model /models/nld-8b --precision fp8 --backend onnxruntime "
                                          rf"--output {engine}`"):
        read_manifest(engine)
    user = tmp_path / "mine"
    user.mkdir()
    (user / "a.txt").write_text("x")
    r = invoke("generate", "--engine", user)
    msg = one_line(r, "is not an engine directory")
    assert "--output" not in msg and "rebuild" not in msg, msg     # never suggests building over it


def test_read_only_output_location_is_one_line(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    undo = _make_read_only(ro)
    try:
        for out in (ro / "engine", ro / "new" / "engine"):
            r = invoke("build", "--backend", "onnxruntime", "--no-validate", "--output", out)
            one_line(r, f"--output {out}: cannot ", "give a location you can write to")
        assert list(ro.iterdir()) == []
    finally:
        undo()


def _make_read_only(folder: Path):
    """chmod 555; as root (which ignores modes) the immutable attribute, where the file system has it."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return lambda: folder.chmod(0o755)
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
        return lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)
    pytest.skip("running as root where chattr +i is unavailable: no way to make a read-only folder")


# ---- silently accepted inputs -----------------------------------------------------------------------


def test_token_ids_are_checked_where_they_enter(engine, random_tiny):
    from nemodiff_compile.backends.eager import TorchDenoiser
    from nemodiff_compile.decoding import loops
    from nemodiff_compile.session import Session

    for ids in ("1,99999", "1,-5"):
        bad = ids.split(",")[1]
        for source in (["--engine", engine], ["--size", "tiny"]):
            r = invoke("generate", *source, "--prompt-ids", ids, "--max-new-tokens", "4")
            one_line(r, f"--prompt-ids {ids}: token id {bad} is outside the vocabulary (0..1023)")
    with Session.open(engine) as s:
        for ids in ([1, -5], [1, 1024]):
            with pytest.raises(InvalidArgument, match=f"prompt: token id {ids[1]} is outside the vocabulary"):
                s.generate(ids, max_new_tokens=4)
        with pytest.raises(InvalidArgument, match="token id 2.5 is not an integer"):
            s.generate([1, 2.5], max_new_tokens=4)
        ok = s.generate([1, 5, 6], max_new_tokens=4, mode="ar")              # in range: still runs
        assert len(ok.completions[0].tokens) == 4
    den = TorchDenoiser(random_tiny, max_len=64)                              # the loops' prefill
    for mode in loops.MODES:
        with pytest.raises(InvalidArgument, match="prompt 1: token id -1 is outside"):
            loops.generate(den, [[1, 2], [3, -1]], mode, max_new_tokens=4)
    assert len(loops.generate(den, [[1, 2]], "ar", max_new_tokens=2).tokens[0]) == 2


def test_python_api_and_cli_share_bounds_and_messages(engine):
    """max_new_tokens <= 0, steps = 0, temperature < 0 (and friends): the same sentence, the flag's name
    on the command line and the keyword's in Python."""
    from nemodiff_compile.session import Session

    cases = [("max_new_tokens", 0), ("max_new_tokens", -3), ("steps", 0), ("temperature", -1.0),
             ("threshold", 1.5), ("block_length", 1)]
    with Session.open(engine) as s:
        for key, value in cases:
            flag = "--" + key.replace("_", "-")
            r = invoke("generate", "--engine", engine, flag, value)
            cli_msg = one_line(r, f"{flag} {value}: expected ")
            kw = {"max_new_tokens": 4, key: value}
            with pytest.raises(InvalidArgument) as e:
                s.generate([1, 5, 6], **kw)
            assert str(e.value) == cli_msg.removeprefix("error: ").replace(flag, key), (cli_msg, e.value)


def test_oversized_requests_blame_the_argument_at_fault(engine):
    from nemodiff_compile.session import Session

    r = invoke("generate", "--engine", engine, "--prompt-ids", "1,5,6", "--block-length", "4096",
               "--max-new-tokens", "4")
    msg = one_line(r, "--block-length 4096: one block after the prompt (3 tokens) needs 4099 cache positions",
                   "expected --block-length <= 1021")
    assert "max-new-tokens" not in msg
    r = invoke("generate", "--engine", engine, "--prompt-ids", "1,5,6", "--max-new-tokens", "5000")
    one_line(r, "--max-new-tokens 5000: ", "expected --max-new-tokens <= 1008",
             "rebuild the engine with a larger --max-context")
    with Session.open(engine, max_len=64) as s:
        with pytest.raises(InvalidArgument, match=r"max_new_tokens 100: .* expected max_new_tokens <= 48, "
                                                  r"or raise the backend's max_len \(Session.open\(max_len=N\)"):
            s.generate([1, 5, 6], max_new_tokens=100)
        with pytest.raises(InvalidArgument, match="block_length 80: one block after the prompt"):
            s.generate([1, 5, 6], max_new_tokens=4, block_length=80)


def test_build_and_info_shape_checks_are_one_line(tmp_path):
    out = tmp_path / "e"
    for args, needles in [
        (["build", "--max-context", "8", "--block-length", "64", "--output", out],
         ["--max-context 8: the cache must hold a prompt and one block (--block-length 64); "
          "expected --max-context >= 65"]),
        (["build", "--max-context", "16", "--output", out], ["the model's block_size 16", ">= 17"]),
        (["build", "--batch-sizes", "0", "--output", out], ["--batch-sizes 0: expected"]),
        (["info", "--context", "-5", "--batch", "0"], ["--context -5: expected an integer >= 1"]),
        (["info", "--batch", "0"], ["--batch 0: expected an integer >= 1"]),
    ]:
        one_line(invoke(*args), *needles)
    assert list(tmp_path.iterdir()) == []


def test_closed_session_config_is_a_clear_error(engine):
    from nemodiff_compile.session import Session

    s = Session.open(engine)
    s.close()
    with pytest.raises(NemodiffError, match="session is closed"):
        s.config
    with pytest.raises(NemodiffError, match="session is closed"):
        s.generate([1, 5], max_new_tokens=2)


def test_an_altered_weights_file_is_named(engine):
    """Overwritten in place with the same size: sizes pass, the re-hash names the file."""
    from nemodiff_compile.session import Session

    data = engine / "model.onnx.data"
    b = bytearray(data.read_bytes())
    b[len(b) // 2: len(b) // 2 + 64] = bytes(64)
    data.write_bytes(bytes(b))
    assert invoke("inspect", engine).exit_code == 0                 # the cheap check cannot see it
    Session.open(engine).close()
    for args in (["validate", engine, "--max-new-tokens", "4"], ["inspect", "--verify", engine]):
        one_line(invoke(*args), f"{data}: content differs from the build (sha256 mismatch); rebuild it with "
                                "`nemodiff-compile build --size tiny --precision fp32")
    with pytest.raises(EngineError, match="model.onnx.data: content differs"):
        Session.open(engine, verify="sha256")
    with pytest.raises(InvalidArgument, match="verify 'all': expected 'size' or 'sha256'"):
        Session.open(engine, verify="all")


# ---- killed, interrupted and overlapping builds (real subprocesses) --------------------------------


def _build(ckpt: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # SIGINT back to its default in the child: a shell starts background jobs with SIGINT ignored, which
    # Python (and so the build) then keeps, and the Ctrl-C test would wait for a signal that never acts
    return subprocess.Popen([sys.executable, "-m", "nemodiff_compile", "build", "--model", str(ckpt),
                             "--backend", "onnxruntime", "--output", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(proc: subprocess.Popen, text: str, timeout: float = 120) -> list[str]:
    """Read the build's stderr until a line holds `text` (its progress lines say where it is)."""
    lines, end = [], time.monotonic() + timeout
    while time.monotonic() < end:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    proc.kill()
    raise AssertionError(f"the build never said {text!r}: {''.join(lines)[-2000:]}")


def _errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:") or "Traceback" in ln]


def test_killed_builds_leave_the_previous_engine_and_no_partial_folder(engine, small_ckpt):
    before = tree(engine)
    p = _build(small_ckpt, engine, "--no-validate")                 # SIGKILL mid-export: nothing can clean up
    _wait_for(p, "exporting the denoiser step")
    p.send_signal(signal.SIGKILL)
    p.communicate()
    assert tree(engine) == before
    left = sorted(x.name.split("-")[0] for x in partials(engine))     # the lock file and the partial folder
    assert left == [f".{engine.name}.lock", f".{engine.name}.partial"], left
    p = _build(small_ckpt, engine, "--no-validate")                 # the next build sweeps it; SIGTERM it too
    _wait_for(p, "exporting the denoiser step")
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate()
    assert p.returncode == 128 + signal.SIGTERM, err
    assert _errors(err) == ["error: interrupted (SIGTERM); nothing was left half-written"], err
    assert tree(engine) == before and partials(engine) == []
    assert read_manifest(engine, deep=True).source == "tiny"


def test_ctrl_c_during_validation_leaves_nothing(tmp_path, small_ckpt):
    out = tmp_path / "new" / "engine"                               # its parent is made by the build
    p = _build(small_ckpt, out, "--max-context", "64", "--batch-sizes", "1")
    _wait_for(p, "validating against the PyTorch reference")
    p.send_signal(signal.SIGINT)
    _, err = p.communicate()
    assert p.returncode == 130, err
    assert _errors(err) == ["error: interrupted (SIGINT); nothing was left half-written"], err
    assert list(tmp_path.iterdir()) == []


def test_overlapping_builds_and_a_reader_never_see_a_missing_or_mixed_engine(engine, small_ckpt):
    """Two builds of one output (different graphs: with and without logits) while a reader opens it in a
    loop: every open gets one whole engine (a mix would fail the graph-vs-manifest I/O check); one build
    waits for the other's lock; both end cleanly."""
    from nemodiff_compile.session import Session

    seen, failures, stop = [], [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                with Session.open(engine, threads=1) as s:
                    outputs = sorted(o.name for o in s.denoiser.session.get_outputs())
                    spec = sorted(t["name"] for t in s.manifest.io_spec["outputs"])
                    assert outputs == spec, (outputs, spec)
                    seen.append((s.manifest.buckets["batch_sizes"], "logits" in outputs))
            except Exception as e:                                   # noqa: BLE001 (any failure is the finding)
                failures.append(repr(e))
            time.sleep(0.1)

    t = threading.Thread(target=reader)
    t.start()
    try:
        a = _build(small_ckpt, engine, "--no-validate", "--with-logits", "--batch-sizes", "1,2")
        _wait_for(a, "loading")                                      # a holds the lock
        b = _build(small_ckpt, engine, "--no-validate", "--batch-sizes", "1")
        out_a, err_a = a.communicate()
        out_b, err_b = b.communicate()
        time.sleep(0.3)
    finally:
        stop.set()
        t.join()
    assert a.returncode == 0 and b.returncode == 0, (err_a[-2000:], err_b[-2000:])
    assert failures == [], failures[:3]
    assert "waiting for another build" in err_b, err_b
    assert ([1, 4], True) in seen and ([1, 2], True) in seen, sorted(set(map(str, seen)))   # the old one, a's
    with Session.open(engine, verify="sha256") as s:                 # b's, whole
        assert s.manifest.buckets["batch_sizes"] == [1] and "logits" not in s.manifest.io_spec["outputs"]
    m = read_manifest(engine, deep=True)
    assert m.buckets["batch_sizes"] == [1] and m.source == str(small_ckpt)
    assert partials(engine) == []
