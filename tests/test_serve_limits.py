"""`lmforge serve` under failure and abuse (issue 12): an engine thread that raises, a full queue, oversized or
greedy requests, clients that disconnect, the API key check, /health without a key, the vLLM key.

Two kinds of real server on 127.0.0.1: `lmforge serve` in a subprocess (flags end to end), and the same app run
by uvicorn in this process around a tiny model whose forward can be made to fail, block or slow down (fault
injection in the model, never in the HTTP path). Every wait is bounded, so a hung server fails the test.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

KEY = "test-key"
WAIT = 30  # seconds any one request or condition may take before the test fails


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(base: str, path: str, body=None, key: str | None = KEY) -> tuple[int, dict, http.client.HTTPMessage]:
    """(status, JSON body, headers) of one request: a POST of ``body`` as JSON, or a GET without one."""
    data = json.dumps(body).encode() if body is not None else None
    h = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(f"{base}{path}", data=data, headers=h, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=WAIT) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


def wait_until(condition, what: str, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def start_cli_server(model_dir, log_path, *flags: str):
    port = _free_port()
    with open(log_path, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", "--model", str(model_dir),
                                 "--port", str(port), "--dtype", "float32", "--served-model-name", "tiny", *flags],
                                stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "LMFORGE_API_KEY": ""})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90  # imports + model load on a busy machine
    while True:
        try:
            urllib.request.urlopen(f"{base}/health", timeout=1)
            return proc, base
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"server did not come up: {log_path.read_text()}")
            time.sleep(0.25)


def stop_cli_server(proc) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


# ------------------------------------------------------------------------------------------ in-process server
@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    from lmforge.inference.loading import load_for_inference

    return load_for_inference(str(tiny_model_dir), dtype="float32")


class Fault:
    """Fault injection in the model's forward: ``fail`` raises (once, or always), ``gate`` blocks the next
    forward until released, ``delay`` slows every forward down."""

    def __init__(self, model):
        self.fail = 0  # forwards still to fail; -1 = all
        self.gate: threading.Event | None = None
        self.gates: list[threading.Event] = []  # every gate set, to open them all at the end
        self.entered = threading.Event()
        self.delay = 0.0
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        if self.fail:
            if self.fail > 0:
                self.fail -= 1
            raise RuntimeError("injected fault")
        if self.gate is not None:
            gate, self.gate = self.gate, None
            self.gates.append(gate)
            self.entered.set()
            if not gate.wait(WAIT):
                raise RuntimeError("the test never opened the gate")
        if self.delay:
            time.sleep(self.delay)


@contextlib.contextmanager
def inproc_server(loaded, api_key: str | None = KEY, max_batch_size: int = 8, max_queue: int | None = None, **limits):
    """The serve app on 127.0.0.1 in a uvicorn thread; yields (base URL, engine, fault)."""
    import uvicorn

    from lmforge.inference.engine import Engine
    from lmforge.inference.generate import Generator
    from lmforge.inference.server import create_app

    engine = Engine(Generator(loaded), max_batch_size=max_batch_size, **({"max_queue": max_queue} if max_queue else {}))
    if limits:
        from lmforge.inference.server import ServeLimits

        limits = {"limits": ServeLimits(**limits)}
    app = create_app(engine, "tiny", api_key, 16, **limits)
    fault = Fault(loaded.model)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=_free_port(), log_level="warning",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), "uvicorn to start")
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{server.config.port}", engine, fault
    finally:
        fault.handle.remove()
        for gate in [*fault.gates, fault.gate]:
            if gate is not None:
                gate.set()
        server.should_exit = True
        thread.join(timeout=WAIT)
        assert not thread.is_alive(), "the server did not shut down"


def health(base: str, key: str | None = KEY) -> tuple[int, dict]:
    code, body, _ = request(base, "/health", key=key)
    return code, body


def complete(base: str, **fields) -> tuple[int, dict, dict]:
    return request(base, "/v1/completions", {"model": "tiny", "prompt": "the", "max_tokens": 4, **fields})


def stream_events(base: str, **fields) -> list:
    """The decoded `data:` events of a streamed completion (the last is the string "[DONE]" when it ended)."""
    body = json.dumps({"model": "tiny", "prompt": "the", "max_tokens": 4, "stream": True, **fields}).encode()
    req = urllib.request.Request(f"{base}/v1/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    events = []
    with urllib.request.urlopen(req, timeout=WAIT) as r:
        for line in r:
            if line.startswith(b"data: "):
                data = line[6:].strip()
                events.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return events


# ------------------------------------------------------------------------------------------ engine failures
def test_exception_in_decode_thread_fails_held_requests_with_500_then_engine_restarts(loaded):
    with inproc_server(loaded) as (base, engine, fault):
        fault.fail = 1
        code, body, _ = complete(base)
        assert code == 500, body
        assert "injected fault" in body["error"]["message"] and body["error"]["type"] == "server_error"

        fault.fail = 1  # a streamed request has its 200 already: the error comes as an event, then the stream ends
        events = stream_events(base)
        assert len(events) == 1 and "injected fault" in events[0]["error"]["message"], events

        code, body, _ = complete(base)  # the engine started again
        assert code == 200 and body["choices"][0]["finish_reason"] in ("stop", "length"), body
        code, h = health(base)
        assert code == 200 and h["status"] == "ok" and h["restarts"] == 2 and h["running"] == 0


def test_an_engine_that_keeps_failing_reports_unhealthy_and_refuses_requests(loaded):
    from lmforge.inference.engine import MAX_CRASHES

    with inproc_server(loaded) as (base, engine, fault):
        fault.fail = -1
        for _ in range(MAX_CRASHES):
            code, body, _ = complete(base)
            assert code in (500, 503), body  # the last one may see the engine give up first
        code, body = health(base, key=None)
        assert code == 503 and body == {"status": "unhealthy"}  # no detail without the key
        code, body = health(base)
        assert code == 503 and "injected fault" in body["error"]
        code, body, _ = complete(base)  # answered at once, never queued behind a dead thread
        assert code == 503 and body["error"]["type"] == "server_error", body


# ------------------------------------------------------------------------------------------ back-pressure
def test_full_queue_answers_429_with_retry_after(loaded):
    with inproc_server(loaded, max_batch_size=1, max_queue=1) as (base, engine, fault):
        fault.gate = threading.Event()
        gate = fault.gate
        answers = {}

        def ask(name):
            answers[name] = complete(base)[0]

        first = threading.Thread(target=ask, args=("first",))
        first.start()
        assert fault.entered.wait(WAIT)  # the first request is in the (blocked) batch
        second = threading.Thread(target=ask, args=("second",))
        second.start()
        wait_until(lambda: health(base)[1]["queued"] == 1, "the second request to queue")
        code, body, headers = complete(base)
        assert code == 429 and headers.get("Retry-After") == "1", (code, body)
        assert body["error"]["type"] == "rate_limit_error" and "busy" in body["error"]["message"]
        code, body, _ = complete(base, n=2)  # a request that can never fit is a 400, not an endless 429
        assert code == 400 and body["error"]["param"] == "n", body
        gate.set()
        first.join(WAIT)
        second.join(WAIT)
        assert answers == {"first": 200, "second": 200}


# ------------------------------------------------------------------------------------------ disconnects
def _open_request(base: str, body: dict) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection(base.removeprefix("http://"), timeout=WAIT)
    conn.request("POST", "/v1/completions", json.dumps(body),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    return conn


def _hang_up(conn: http.client.HTTPConnection) -> None:
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()


def test_a_client_that_disconnects_cancels_its_request_and_frees_its_slot(loaded):
    long = {"model": "tiny", "prompt": "the", "max_tokens": 400, "temperature": 0}  # greedy: 400 tokens, no EOS
    with inproc_server(loaded, max_batch_size=1) as (base, engine, fault):
        fault.delay = 0.005  # >= 2 s for the whole answer, so a cancel shows
        steps = health(base)[1]["decode_steps"]

        conn = _open_request(base, {**long, "stream": True})  # streaming: hang up after the first chunk
        response = conn.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: ")
        _hang_up(conn)
        h = wait_until(lambda: (h := health(base)[1])["running"] == 0 and h, "the streamed request to leave")
        assert h["cancelled"] == 1 and h["decode_steps"] - steps < 200, h  # not the 399 steps of the whole answer
        steps = h["decode_steps"]

        conn = _open_request(base, long)  # not streaming: hang up while it decodes
        wait_until(lambda: health(base)[1]["decode_steps"] > steps, "the request to start decoding")
        _hang_up(conn)
        h = wait_until(lambda: (h := health(base)[1])["running"] == 0 and h, "the request to leave")
        assert h["cancelled"] == 2 and h["decode_steps"] - steps < 200, h

        fault.delay = 0
        code, body, _ = complete(base, max_tokens=2)  # the slot is free again
        assert code == 200 and health(base)[1]["queued"] == 0


# ------------------------------------------------------------------------------------------ API key
def test_api_key_is_compared_in_constant_time(loaded, monkeypatch):
    import hmac

    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    with inproc_server(loaded) as (base, engine, fault):
        code, _, _ = request(base, "/v1/completions", {"model": "tiny", "prompt": "x"}, key="wrong")
        assert code == 401
        assert (b"Bearer wrong", f"Bearer {KEY}".encode()) in calls
        # a header that is not ASCII is a wrong key (401), not a crash (compare_digest refuses non-ASCII str)
        conn = http.client.HTTPConnection(base.removeprefix("http://"), timeout=WAIT)
        conn.putrequest("GET", "/v1/models")
        conn.putheader("Authorization", b"Bearer t\xe9st-key")
        conn.endheaders()
        assert conn.getresponse().status == 401
        conn.close()


# ------------------------------------------------------------------------------------------ the CLI server
FLAGS = ("--api-key", KEY, "--max-new-tokens", "8", "--max-body-bytes", "4096", "--max-messages", "4",
         "--max-tokens-limit", "100", "--max-n", "2", "--max-stop", "2", "--max-stop-length", "8")


@pytest.fixture(scope="module")
def limited(tiny_model_dir, tmp_path_factory):
    proc, base = start_cli_server(tiny_model_dir, tmp_path_factory.mktemp("serve") / "server.log", *FLAGS)
    yield proc, base
    stop_cli_server(proc)


def _chat(**fields) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **fields}


def test_request_limits_are_413_or_400_naming_the_field(limited):
    _, base = limited
    code, body, _ = request(base, "/v1/chat/completions", _chat(messages=[{"role": "user", "content": "x" * 5000}]))
    assert code == 413 and "4096 bytes" in body["error"]["message"], body

    def chunks():  # no Content-Length: the server must count what it reads
        yield json.dumps(_chat())[:-1].encode()
        for _ in range(10):
            yield b" " * 1000
        yield b"}"

    conn = http.client.HTTPConnection(base.removeprefix("http://"), timeout=WAIT)
    conn.request("POST", "/v1/chat/completions", chunks(), {"Content-Type": "application/json",
                                                          "Authorization": f"Bearer {KEY}"}, encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 413 and "4096 bytes" in json.loads(response.read())["error"]["message"]
    conn.close()

    cases = [
        ("/v1/chat/completions", _chat(messages=[{"role": "user", "content": "hi"}] * 5), "messages"),
        ("/v1/chat/completions", _chat(max_tokens=101), "max_tokens"),
        ("/v1/chat/completions", _chat(max_completion_tokens=101), "max_completion_tokens"),
        ("/v1/completions", {"model": "tiny", "prompt": ["a"] * 5}, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": "a", "n": 3}, "n"),
        ("/v1/completions", {"model": "tiny", "prompt": "a", "stop": ["a", "b", "c"]}, "stop"),
        ("/v1/completions", {"model": "tiny", "prompt": "a", "stop": "x" * 9}, "stop"),
        ("/v1/completions", {"model": "tiny", "prompt": "a", "seed": 2**70}, "seed"),  # used to kill the engine
    ]
    for path, body, param in cases:
        code, answer, _ = request(base, path, body)
        assert code == 400 and answer["error"]["param"] == param, (body, answer)
    code, answer, _ = request(base, "/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 100, "n": 2,
                                                        "stop": ["a", "b"], "seed": 2**62})
    assert code == 200 and len(answer["choices"]) == 2, answer  # at the limits is fine


def test_health_says_only_ok_without_the_key(limited):
    _, base = limited
    assert health(base, key=None) == (200, {"status": "ok"})
    assert health(base, key="wrong") == (200, {"status": "ok"})
    code, body = health(base)
    assert code == 200 and body["status"] == "ok" and "decode_steps" in body and "queued" in body


def test_binds_loopback_by_default(limited):
    from lmforge.cli import build_parser

    proc, base = limited
    assert build_parser().parse_args(["serve", "--model", "m"]).host == "127.0.0.1"
    port = int(base.rsplit(":", 1)[1])
    listening = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{proc.pid}/net/{table}") as fh:
            for line in list(fh)[1:]:
                local, state = line.split()[1], line.split()[3]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A = LISTEN
                    listening.add(local.rsplit(":", 1)[0])
    assert listening == {"0100007F"}  # 127.0.0.1 only (little-endian hex), not 0.0.0.0 or ::


def test_cli_limit_defaults_are_the_servers():
    from dataclasses import asdict

    from lmforge.commands.serve import LIMIT_DEFAULTS
    from lmforge.inference.server import ServeLimits

    defaults = asdict(ServeLimits())
    defaults.pop("retry_after")
    assert LIMIT_DEFAULTS == defaults


def test_cli_refuses_limits_below_one_before_loading_the_model():
    from lmforge.cli import build_parser
    from lmforge.commands.serve import run
    from lmforge.errors import ConfigError

    for flags, message in [(["--max-queue", "0"], "--max-queue"), (["--max-tokens-limit", "0"], "--max-tokens-limit"),
                           (["--max-new-tokens", "300", "--max-tokens-limit", "200"], "above --max-tokens-limit")]:
        args = build_parser().parse_args(["serve", "--model", "/nonexistent", *flags])
        with pytest.raises(ConfigError, match=message):
            run(args)


def test_vllm_backend_gets_the_key_by_environment_not_argv(tiny_model_dir, tmp_path):
    """A stand-in `vllm` package records how `lmforge serve --backend vllm` started its server."""
    server = tmp_path / "fake" / "vllm" / "entrypoints" / "openai"
    server.mkdir(parents=True)
    for d in (server, server.parent, server.parent.parent):
        (d / "__init__.py").write_text("")
    record = tmp_path / "record.json"
    (server / "api_server.py").write_text(
        "import json, os, sys\n"
        f"json.dump({{'argv': sys.argv, 'key': os.environ.get('VLLM_API_KEY')}}, open({str(record)!r}, 'w'))\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'fake'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "LMFORGE_API_KEY": ""}
    proc = subprocess.run([sys.executable, "-m", "lmforge", "serve", "--backend", "vllm",
                           "--model", str(tiny_model_dir), "--api-key", "s3cret-key", "--port", "1"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(record.read_text())
    assert got["key"] == "s3cret-key"
    assert not any("s3cret-key" in a for a in got["argv"]) and "--api-key" not in got["argv"]
    assert got["argv"][got["argv"].index("--host") + 1] == "127.0.0.1"
