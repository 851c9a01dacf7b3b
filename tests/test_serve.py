"""`lmforge serve` on the tiny model, driven by the real `openai` client over HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")

KEY = "test-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lmforge", "serve", "--model", str(tiny_model_dir), "--port", str(port),
             "--api-key", KEY, "--dtype", "float32", "--served-model-name", "tiny", "--max-new-tokens", "16"],
            stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "LMFORGE_API_KEY": ""})
    base = f"http://127.0.0.1:{port}"
    for _ in range(240):  # up to 60 s for imports + model load on a busy machine
        try:
            urllib.request.urlopen(f"{base}/health", timeout=1)
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"server exited: {log.read_text()}")
            time.sleep(0.25)
    else:
        proc.kill()
        pytest.fail(f"server did not come up: {log.read_text()}")
    yield proc, base
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[1]}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """Greedy completions from the library directly, to check the server returns the model's own output."""
    from lmforge.inference.generate import GenerationOptions, Generator, encode_prompt
    from lmforge.inference.loading import load_for_inference

    loaded = load_for_inference(str(tiny_model_dir), dtype="float32")
    gen = Generator(loaded)

    def greedy(row: dict, n: int) -> str:
        return gen.generate([encode_prompt(row, loaded.tokenizer)], GenerationOptions(max_new_tokens=n))[0].text

    return greedy


MESSAGES = [{"role": "user", "content": "extract the name from: alpha lives in beta"}]


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_chat_completion_is_the_models_greedy_output(client, reference):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == reference({"messages": MESSAGES}, 8)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0


def test_completion_and_stop(client, reference):
    r = client.completions.create(model="tiny", prompt="the quick brown", max_tokens=10, temperature=0)
    full = reference({"prompt": "the quick brown"}, 10)
    assert r.choices[0].text == full
    stop = full[2:4]
    r = client.completions.create(model="tiny", prompt="the quick brown", max_tokens=10, temperature=0, stop=[stop])
    assert r.choices[0].text == full[: full.find(stop)] and r.choices[0].finish_reason == "stop"


def test_streaming_chat_matches_non_streaming(client):
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0]
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 1  # really streamed, not one blob
    assert "".join(deltas) == whole.message.content
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason


def test_streaming_completion(client):
    stream = client.completions.create(model="tiny", prompt="alpha beta", max_tokens=6, temperature=0, stream=True)
    chunks = list(stream)
    whole = client.completions.create(model="tiny", prompt="alpha beta", max_tokens=6, temperature=0)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_wrong_or_missing_key_is_401(server):
    bad = openai.OpenAI(base_url=f"{server[1]}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
    req = urllib.request.Request(f"{server[1]}/v1/models")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 401


def _post(base: str, path: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(f"{base}{path}", data=body, method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _health(base: str) -> dict:
    """/health with the key: the figures (without it, only the status)."""
    req = urllib.request.Request(f"{base}/health", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def test_malformed_bodies_and_invalid_fields_are_4xx(server, client):
    base = server[1]
    code, body = _post(base, "/v1/chat/completions", b"{not json")
    assert code == 400 and "not valid JSON" in body["error"]["message"]
    code, body = _post(base, "/v1/chat/completions", json.dumps({"model": "tiny"}).encode())
    assert code == 400 and body["error"]["param"] == "messages"
    code, body = _post(base, "/v1/chat/completions", json.dumps(
        {"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}).encode())
    assert code == 400 and body["error"]["param"] == "messages.0.role"
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=7)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="x", max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny", prompt="x", max_tokens=1000)  # < --max-tokens-limit, > context
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=MESSAGES, max_tokens=2)


def test_32_concurrent_requests_succeed_and_are_batched(server, client):
    def one(i: int):
        if i % 2:
            r = client.completions.create(model="tiny", prompt=f"record {i} lives in", max_tokens=4 + i % 5)
            return r.choices[0].finish_reason, r.usage.completion_tokens
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"name {i}"}],
                                           max_tokens=4 + i % 5, temperature=0.8, seed=i)
        return r.choices[0].finish_reason, r.usage.completion_tokens

    before = _health(server[1])
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    after = _health(server[1])
    assert len(results) == 32 and all(reason in ("stop", "length") for reason, _ in results)
    assert all(1 <= n <= 4 + i % 5 for i, (_, n) in enumerate(results))  # each row kept its own max_tokens
    assert after["requests"] - before["requests"] == 32
    # batched: one request at a time would need a decode step for every token after its first (which comes
    # from the prefill), i.e. exactly sum(n) - 32 steps (checked with --max-batch-size 1); together needs fewer
    assert after["decode_steps"] - before["decode_steps"] < sum(n for _, n in results) - 32
    assert after["largest_batch"] > 1


def test_sigterm_finishes_in_flight_request_then_exits(server, client):
    proc, _ = server
    result = {}

    def slow():
        r = client.completions.create(model="tiny", prompt="the", max_tokens=300, temperature=0)
        result["tokens"] = r.usage.completion_tokens

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    t.join(timeout=120)
    assert result.get("tokens", 0) >= 1  # the request in flight still got its answer
    assert proc.wait(timeout=60) == 0


def test_stream_safe_text_holds_back_possible_stop_strings_and_partial_characters():
    from lmforge.inference.engine import stream_safe_text

    assert stream_safe_text("hello wor", ["world"]) == "hello "  # "wor" may still become the stop string
    assert stream_safe_text("hello world and more", ["world"]) == "hello "
    assert stream_safe_text("hello wax", ["world"]) == "hello wax"
    assert stream_safe_text("caf\ufffd", []) == "caf"  # the rest of a multi-byte character has not arrived


def test_a_thread_done_with_torch_lets_its_openmp_workers_go():
    """openmp.release_thread_pool: the main thread's OpenMP workers end (so the engine thread's pool is the only
    one and keeps spinning between ops); the next parallel op starts them again. In a fresh process: 2 threads."""
    code = """
import os, time, torch
from lmforge.inference import openmp
torch.set_num_threads(2)
def threads():
    time.sleep(0.2)
    return len(os.listdir('/proc/self/task'))
before = threads()
(torch.randn(512, 512) @ torch.randn(512, 512)).sum()
pooled = threads()
openmp.release_thread_pool()
released = threads()
(torch.randn(512, 512) @ torch.randn(512, 512)).sum()
print(before, pooled, released, threads())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    before, pooled, released, again = map(int, out.stdout.split())
    assert pooled > before and released == pooled - 1 and again == pooled, out.stdout
