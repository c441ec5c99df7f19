"""Ray Serve on this machine's local Ray: 2 replicas (each one engine + scheduler) behind one route; requests
spread over both and every answer is right; a replica killed mid-load is replaced by Ray and no request hangs
(each completes, or fails with an error, within a bound)."""

import socket
import threading
import time

import pytest

ray = pytest.importorskip("ray", reason="needs ray[serve] (pip install -e '.[test]')")
serve = pytest.importorskip("ray.serve", reason="needs ray[serve] (pip install -e '.[test]')")
openai = pytest.importorskip("openai", reason="needs the openai client (pip install -e '.[test]')")

TEXTS = ["Once upon a time", "The cat sat on", "Lily went to the park", "Count: 1, 2, 3,"]
MODES = ["dlm", "ar", "linear-spec", "dlm"]
NEW = 16
BOUND_S = 90          # no request may take longer than this, replica killed or not


@pytest.fixture(scope="module")
def expected(tiny_engine):
    from nemodiff_compile.session import Session

    with Session.open(tiny_engine, threads=1) as s:
        return [s.generate(t, mode=m, chat=False, max_new_tokens=NEW).text for t, m in zip(TEXTS, MODES)]


@pytest.fixture(scope="module")
def cluster(tiny_engine):
    from nemodiff_compile.serve.ray_app import APP_NAME, app_builder

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app_builder({"engine_dir": str(tiny_engine), "replicas": 2, "threads": 1, "num_cpus": 0.5}),
                  name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        serve.shutdown()
        ray.shutdown()


def _ask(client, i):
    r = client.completions.with_raw_response.create(model="tiny-fp32", prompt=TEXTS[i % 4], max_tokens=NEW,
                                                    extra_body={"mode": MODES[i % 4]})
    return r.parse().choices[0].text, r.headers["x-nemodiff-replica"]


def _replicas():
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("SERVE_REPLICA")}


@pytest.mark.slow
def test_two_replicas_spread_and_survive_a_kill(cluster, expected):
    client = openai.OpenAI(base_url=cluster, api_key="none", max_retries=0, timeout=BOUND_S)
    answers = [_ask(client, i) for i in range(8)]
    assert [a for a, _ in answers] == [expected[i % 4] for i in range(8)]
    assert len({r for _, r in answers}) == 2                        # both replicas answered

    victim = sorted(_replicas())[0]
    outcomes: list = [None] * 12

    def load(i):
        t0 = time.monotonic()
        try:
            outcomes[i] = ("ok", _ask(client, i)[0] == expected[i % 4], time.monotonic() - t0)
        except openai.APIError as e:                                  # failed, with an error, not hung
            outcomes[i] = ("error", type(e).__name__, time.monotonic() - t0)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    for t in threads:
        t.join(BOUND_S + 30)
    assert all(o is not None and o[2] < BOUND_S for o in outcomes), outcomes      # nobody hangs
    assert all(o[1] for o in outcomes if o[0] == "ok"), outcomes                   # every answer right

    deadline = time.monotonic() + BOUND_S                           # Ray Serve replaces the replica
    while not (victim not in _replicas() and len(_replicas()) == 2):
        assert time.monotonic() < deadline, _replicas()
        time.sleep(0.5)
    answers = [_ask(client, i) for i in range(4)]
    assert [a for a, _ in answers] == expected


@pytest.mark.slow
def test_a_stream_through_ray_equals_the_answer(cluster, expected):
    """A streamed completion through the Ray Serve route: its chunks add up to the engine's answer, and it ends."""
    client = openai.OpenAI(base_url=cluster, api_key="none", max_retries=0, timeout=BOUND_S)
    stream = client.completions.create(model="tiny-fp32", prompt=TEXTS[0], max_tokens=NEW, stream=True,
                                       extra_body={"mode": MODES[0]})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected[0]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] is not None
