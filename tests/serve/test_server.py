"""The OpenAI-compatible server: a real uvicorn on 127.0.0.1 and the official openai client.

Answers equal Session.generate (greedy; streamed or not), concurrent requests equal their solo runs, bad
requests are 400s the client raises as BadRequestError, a full queue is a 503 with Retry-After, a client
that disconnects mid-stream frees its row, /metrics is Prometheus text, SIGTERM drains and exits."""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra (pip install -e '.[serve]')")
pytest.importorskip("uvicorn", reason="needs the serve extra (pip install -e '.[serve]')")
openai = pytest.importorskip("openai", reason="needs the openai client (pip install -e '.[test]')")

from contract_denoiser import ContractOnly  # noqa: E402  (tests/contract_denoiser.py)
from live_server import serving  # noqa: E402  (tests/live_server.py)
from polling import until  # noqa: E402  (tests/polling.py)

from nemodiff_compile.serve.server import create_app  # noqa: E402
from nemodiff_compile.session import Session  # noqa: E402

TEXTS = ["Once upon a time", "What is 3 + 4?", "The cat sat on", "Tom has 3 apples and", "Count: 1, 2, 3,",
         "Lily went to the park", "What day comes after Monday?", "Say it twice: red"]
KNOBS = [dict(mode="ar"), dict(), dict(mode="linear-spec"), dict(steps=4, block_length=8),
         dict(threshold=0.5), dict(mode="ar"), dict(block_length=8), dict(mode="linear-spec", block_length=8)]
NEW = 24


@pytest.fixture(scope="module")
def session(tiny_engine):
    s = Session.open(tiny_engine, threads=1, max_batch=8)
    yield s
    s.close()


@pytest.fixture(scope="module")
def url(session):
    with serving(create_app(session, model_name="tiny", close_session=False)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)


def test_answers_equal_session_generate(client, session):
    want = session.generate(TEXTS[0], chat=False, max_new_tokens=NEW)
    r = client.completions.create(model="tiny", prompt=TEXTS[0], max_tokens=NEW, temperature=0)
    assert r.choices[0].text == want.text and r.choices[0].finish_reason in ("stop", "length")
    u = r.usage
    assert (u.completion_tokens, u.prompt_tokens) == (len(want.completions[0].tokens), len(session.encode(TEXTS[0], False)))
    assert u.model_extra["nfe"] == want.generation.nfe
    assert u.model_extra["tokens_per_forward"] == pytest.approx(want.generation.tokens_per_forward, abs=1e-4)
    chunks = list(client.completions.create(model="tiny", prompt=TEXTS[0], max_tokens=NEW, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert len(chunks) >= 3 and chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason   # a chunk per block

    want = session.generate(TEXTS[5], mode="linear-spec", max_new_tokens=NEW)          # the chat template
    msgs = [{"role": "user", "content": TEXTS[5]}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=NEW, extra_body={"mode": "linear-spec"})
    assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=NEW, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"mode": "linear-spec"}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.completion_tokens == len(want.completions[0].tokens)
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_thinking_in_the_body(client, session):
    want = session.generate(TEXTS[0], enable_thinking=True, max_thinking_tokens=3, max_new_tokens=NEW, mode="ar")
    assert want.completions[0].tokens[3] == 13                              # </think> forced at index 3
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": TEXTS[0]}], max_tokens=NEW,
                                       extra_body={"mode": "ar", "enable_thinking": True, "max_thinking_tokens": 3})
    assert r.choices[0].message.content == want.text
    with pytest.raises(openai.BadRequestError, match="thinking is off"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"enable_thinking": False, "max_thinking_tokens": 3})


def test_concurrent_requests_equal_their_solo_runs(client, session, url):
    alone = [session.generate(t, chat=False, max_new_tokens=NEW, **k) for t, k in zip(TEXTS, KNOBS)]
    passes = session.scheduler.passes
    got = [None] * len(TEXTS)

    def ask(i):
        got[i] = client.completions.create(model="tiny", prompt=TEXTS[i], max_tokens=NEW,
                                           extra_body=KNOBS[i]).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(TEXTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == [r.text for r in alone]
    assert session.scheduler.passes - passes < sum(r.generation.nfe for r in alone)     # they shared passes


def test_bad_requests_are_400(client):
    bad = [dict(prompt="hi", max_tokens=0), dict(prompt="hi", extra_body={"mode": "fast"}),
           dict(prompt="hi", extra_body={"steps": 4, "threshold": 0.5}), dict(prompt="hi", extra_body={"bogus": 1}),
           dict(prompt=[1, 10**6]), dict(prompt="hi", stop=["."]), dict(prompt="hi", max_tokens=10**6),
           dict(prompt="hi", n=2)]
    for kw in bad:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny", **kw)
        err = e.value.body
        assert e.value.status_code == 400 and err["type"] == "invalid_request_error" and err["message"], kw
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="tiny", messages=[])


def test_full_queue_is_503_and_a_disconnect_frees_the_row(tiny_engine):
    from nemodiff_compile.backends.open import open_engine

    engine = open_engine(tiny_engine, threads=1)
    slow = Session(ContractOnly(engine.denoiser, 0.03), engine.tokenizer, engine.manifest, max_batch=1, max_queue=1)
    with serving(create_app(slow, model_name="tiny")) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=60)
        stream = client.completions.create(model="tiny", prompt=TEXTS[0], max_tokens=200, stream=True,
                                           extra_body={"threshold": 1.0})      # one commit per pass: long
        next(iter(stream))                                  # it holds the only row
        queued = {}
        t = threading.Thread(target=lambda: queued.update(r=client.completions.create(
            model="tiny", prompt=TEXTS[1], max_tokens=8, extra_body={"mode": "ar"})))
        t.start()
        until(lambda: _health(base)["queued"] == 1)
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model="tiny", prompt=TEXTS[2], max_tokens=8)
        assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "1"
        assert e.value.body["type"] == "server_overloaded"
        stream.close()                                      # the client goes away mid-stream
        t.join(30)
        assert queued["r"].usage.completion_tokens >= 1      # its row was freed for the queued request
        after = client.completions.create(model="tiny", prompt=TEXTS[3], max_tokens=8, extra_body={"mode": "ar"})
        assert after.usage.completion_tokens >= 1
        metrics = _metrics(base)
        assert metrics[("nemodiff_requests_total", (("endpoint", "/v1/completions"), ("status", "cancelled")))] == 1
        assert metrics[("nemodiff_requests_total", (("endpoint", "/v1/completions"), ("status", "overloaded")))] == 1
        assert _health(base)["running"] == 0


def test_metrics_are_prometheus_text(client, url):
    client.completions.create(model="tiny", prompt=TEXTS[0], max_tokens=8)
    m = _metrics(url)
    assert m[("nemodiff_generated_tokens_total", ())] > 0 and m[("nemodiff_engine_passes_total", ())] > 0
    assert m[("nemodiff_row_passes_total", ())] >= m[("nemodiff_engine_passes_total", ())]
    assert m[("nemodiff_pass_seconds_count", ())] == m[("nemodiff_engine_passes_total", ())]
    assert m[("nemodiff_tokens_per_forward_count", ())] > 0 and ("nemodiff_queue_depth", ()) in m
    assert m[("nemodiff_batch_occupancy_count", ())] > 0 and ("nemodiff_batch_rows", ()) in m
    assert m[("nemodiff_requests_total", (("endpoint", "/v1/completions"), ("status", "ok")))] >= 1
    assert _health(url)["status"] == "ok"


def test_raw_stream_and_replica_header(session):
    """The bytes on the wire: every event a JSON chunk, one finish chunk, then usage, then [DONE] (events ready at
    once share a write, and stay separate events); x-nemodiff-replica on every response of a replica's app and on
    none of a plain server's."""
    text, want = max(((t, session.generate(t, chat=False, max_new_tokens=NEW)) for t in TEXTS),
                     key=lambda tw: len(tw[1].completions[0].tokens))
    assert len(want.completions[0].tokens) > 16                                   # two blocks at least
    with serving(create_app(session, model_name="tiny", replica="r7", close_session=False)) as base:
        host, port = base.removeprefix("http://").split(":")
        c = http.client.HTTPConnection(host, int(port), timeout=60)
        c.request("POST", "/v1/completions", json.dumps(dict(prompt=text, max_tokens=NEW, stream=True,
                                                            stream_options={"include_usage": True})),
                  {"Content-Type": "application/json"})
        r = c.getresponse()
        assert r.getheader("x-nemodiff-replica") == "r7" and r.getheader("content-type").startswith("text/event-stream")
        events = [ln[6:] for ln in r.read().split(b"\n\n") if ln.strip()]
        c.request("GET", "/health")
        assert c.getresponse().getheader("x-nemodiff-replica") == "r7"
        ok = ("nemodiff_requests_total", (("endpoint", "/v1/completions"), ("status", "ok")))
        assert _metrics(base)[ok] == 1                                            # a finished stream is "ok"
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    finish = [i for i, ch in enumerate(chunks) if ch["choices"] and ch["choices"][0]["finish_reason"]]
    assert finish == [len(chunks) - 2] and chunks[-1]["choices"] == []           # finish, then usage
    assert chunks[-1]["usage"]["completion_tokens"] == len(want.completions[0].tokens)
    assert "".join(ch["choices"][0]["text"] for ch in chunks[:-1]) == want.text
    assert len(chunks) - 2 >= 2                                                   # a chunk per block
    with serving(create_app(session, model_name="tiny", close_session=False)) as base:
        host, port = base.removeprefix("http://").split(":")
        c = http.client.HTTPConnection(host, int(port), timeout=60)
        c.request("GET", "/health")
        assert c.getresponse().getheader("x-nemodiff-replica") is None


def test_load_test_script_reports_each_level(url, tmp_path):
    """scripts/load_test.py against a running server: one JSON line per level, no errors, the c8/c1 line."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(TEXTS[:4]) + "\n")
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, str(root / "scripts/load_test.py"), "--url", f"{url}/v1", "--levels", "1,8",
                        "--requests", "8", "--max-tokens", "8", "--prompts", str(prompts)],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(root)))
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [json.loads(ln) for ln in r.stdout.splitlines()]
    levels = [ln for ln in lines if "concurrency" in ln]
    assert [ln["concurrency"] for ln in levels] == [1, 8]
    assert all(ln["requests"] == 8 and ln["errors"] == 0 and ln["tokens"] > 0 for ln in levels)
    assert all(0 < ln["ttfb_p50_s"] <= ln["latency_p50_s"] <= ln["latency_p99_s"] for ln in levels)
    assert lines[-1]["tokens_per_s_c8_over_c1"] > 0


def test_request_cpu_script_splits_cpu_by_thread(tiny_engine, tmp_path):
    """scripts/request_cpu.py starts its own server: per request, the server's event-loop thread and the engine's
    threads used CPU, and so did the client; latency is within the wall time per request. /proc counts CPU in clock
    ticks (10 ms): enough requests that the loop's ~2 ms each add up to several."""
    line = _c1_script("request_cpu.py", tiny_engine, tmp_path, requests=40)
    cpu = line["server_cpu_ms_per_request"]
    assert line["requests"] == 40 and cpu["loop"] > 0 and len(cpu) >= 2 and line["client_cpu_ms_per_request"] > 0
    assert 0 < line["latency_p50_ms"] <= 2 * line["ms_per_request"]


@pytest.mark.parametrize("client", ["openai", "raw"])
def test_c1_latency_script_splits_a_request_beside_session_generate(tiny_engine, tmp_path, client):
    """scripts/c1_latency.py starts its own server and times Session.generate beside it: the server's scheduler time
    (from its /metrics) is part of the client's latency, and the rest is the HTTP path; `--client raw` reads the
    same streams to their last chunk without parsing them (the server counts each request once, finished)."""
    line = _c1_script("c1_latency.py", tiny_engine, tmp_path, requests=3, extra=("--client", client))
    assert line["requests"] == 3 and line["client"] == client
    assert 0 < line["scheduler_ms"] < line["client_ms"] and line["http_ms"] > 0 and line["session_ms"] > 0
    assert abs(line["client_over_session"] - line["client_ms"] / line["session_ms"]) < 0.01
    if client == "openai":
        bad = _script("c1_latency.py", tmp_path / "nope")
        assert bad.returncode == 2 and "expected an engine directory" in bad.stderr


def _script(name: str, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    """scripts/NAME ARGS in a subprocess, this checkout on its path."""
    root = Path(__file__).resolve().parents[2]
    return subprocess.run([sys.executable, str(root / "scripts" / name), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, PYTHONPATH=str(root)))


def _c1_script(name: str, engine, tmp_path, *, requests: int, extra: tuple = ()) -> dict:
    """A concurrency-1 script (it starts its own server) on two prompts, 8 new tokens, one engine thread: its
    JSON line."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(TEXTS[:2]) + "\n")
    r = _script(name, engine, "--requests", requests, "--max-tokens", 8, "--threads", 1, "--prompts", prompts, *extra)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.splitlines()[-1])


def test_sigterm_drains_and_exits(tiny_engine):
    """`nemodiff-compile serve` in a subprocess: a stream in flight when SIGTERM arrives still ends with [DONE]."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2])] + sys.path))
    proc = subprocess.Popen([sys.executable, "-m", "nemodiff_compile", "serve", str(tiny_engine), "--port", str(port),
                             "--threads", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        until(lambda: proc.poll() is not None or _up(port), timeout=120)
        assert proc.poll() is None, proc.stdout.read()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/v1/completions", json.dumps(dict(prompt=TEXTS[5], max_tokens=64, stream=True,
                                                                threshold=1.0)),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        lines = [resp.readline()]                            # the first chunk is out: the request is in flight
        proc.send_signal(signal.SIGTERM)
        lines += resp.read().splitlines()
        events = [ln for ln in lines if ln.strip().startswith(b"data: ")]
        assert events[-1].strip() == b"data: [DONE]"
        assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")
        assert proc.wait(60) == 0
        assert not _up(port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _up(port: int) -> bool:
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        c.request("GET", "/health")
        return c.getresponse().status == 200
    except OSError:
        return False


def _health(base: str) -> dict:
    host, port = base.removeprefix("http://").split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=10)
    c.request("GET", "/health")
    return json.loads(c.getresponse().read())


def _metrics(base: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    host, port = base.removeprefix("http://").split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=10)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}




def test_serve_cli_refuses_bad_input(tmp_path):
    from click.testing import CliRunner

    from nemodiff_compile.cli import cli

    r = CliRunner().invoke(cli, ["serve", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "engine directory not found" in r.output and len(r.output.strip().splitlines()) == 1
    r = CliRunner().invoke(cli, ["serve", str(tmp_path), "--port", "0"])
    assert r.exit_code == 2 and "--port" in r.output
