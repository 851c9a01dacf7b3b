"""`lmforge serve` on a tiny trained reward model (a LoRA SEQ_CLS adapter): POST /v1/score over HTTP on 127.0.0.1
gives the scores plain transformers/PEFT give the same texts (batch order kept, right padding); the generation
routes answer 400 for it, /v1/score answers 400 for a generative model, bad input 400, unknown model 404, the
API key is enforced."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch
from conftest import base_config, write_jsonl
from test_reward_eval import _fox_rows

from lmforge.config import load_config
from lmforge.data.preference import encode_side
from lmforge.data.tokenize import Encoder
from lmforge.methods import reward

KEY = "score-key"
TEXTS = ["the quick brown fox", "a dog", "the quick brown dog jumps over the lazy fox again and again", "fox"]
CHAT = [{"role": "user", "content": "which animal?"}, {"role": "assistant", "content": "the fox"}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(model_dir, name: str, log) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", "--model", str(model_dir), "--port",
                                 str(port), "--api-key", KEY, "--dtype", "float32", "--served-model-name", name,
                                 "--max-batch-size", "3"],
                                stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "LMFORGE_API_KEY": ""})
    base = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            urllib.request.urlopen(f"{base}/health", timeout=1)
            return proc, base
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"server exited: {log.read_text()}")
            time.sleep(0.25)
    proc.kill()
    pytest.fail(f"server did not come up: {log.read_text()}")


def _post(base: str, path: str, body: dict, key: str | None = KEY) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(base + path, json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("rm-serve")
    data = write_jsonl(tmp / "train.jsonl", _fox_rows(64, 0))
    tree = base_config(tiny_model_dir, data, tmp / "run", method="reward", peft={"kind": "lora", "r": 4, "alpha": 8},
                       train={"max_steps": 10, "learning_rate": 3e-3, "save_steps": 100, "logging_steps": 10})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMFORGE_CACHE", str(tmp / "cache"))
        return reward.train(load_config(None, tree=tree))


@pytest.fixture(scope="module")
def servers(reward_dir, tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-score")
    procs = [_start(reward_dir, "rm", tmp / "rm.log"), _start(tiny_model_dir, "tiny", tmp / "tiny.log")]
    yield procs[0][1], procs[1][1]
    for proc, _ in procs:
        proc.kill()
        proc.wait(timeout=30)


def _by_hand(out) -> list[float]:
    """Each text alone (no padding) through PEFT's sequence classifier as plain transformers loads it."""
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    model = AutoPeftModelForSequenceClassification.from_pretrained(out, num_labels=1).eval()
    tok = AutoTokenizer.from_pretrained(out)
    seqs = [tok(t)["input_ids"] for t in TEXTS]
    seqs.append(sum(encode_side(Encoder(tok), CHAT[:1], CHAT[1:]), []))  # as reward training renders prompt+answer
    with torch.no_grad():
        return [model(input_ids=torch.tensor([s])).logits[0, 0].item() for s in seqs]


def test_scores_equal_transformers_in_order(servers, reward_dir):
    rm, _ = servers
    want = _by_hand(reward_dir)
    status, body = _post(rm, "/v1/score", {"model": "rm", "input": TEXTS + [{"messages": CHAT}]})
    assert status == 200, body
    assert body["object"] == "list" and body["model"] == "rm"
    assert [d["index"] for d in body["data"]] == list(range(len(want)))
    got = [d["score"] for d in body["data"]]
    assert got == pytest.approx(want, abs=1e-4), (got, want)
    assert len({round(v, 3) for v in want}) == len(want)  # distinct scores: a wrong order cannot pass
    status, one = _post(rm, "/v1/score", {"model": "rm", "input": TEXTS[2]})
    assert status == 200 and one["data"][0]["score"] == pytest.approx(want[2], abs=1e-4)
    status, chat = _post(rm, "/v1/score", {"model": "rm", "input": {"messages": CHAT}})
    assert status == 200 and chat["data"][0]["score"] == pytest.approx(want[-1], abs=1e-4)


def test_models_lists_the_reward_model(servers):
    req = urllib.request.Request(servers[0] + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert [m["id"] for m in json.loads(r.read())["data"]] == ["rm"]


def test_error_cases(servers):
    rm, tiny = servers
    status, body = _post(rm, "/v1/completions", {"model": "rm", "prompt": "hi"})
    assert status == 400 and "does not generate" in body["error"]["message"], body
    status, body = _post(rm, "/v1/chat/completions", {"model": "rm", "messages": CHAT[:1]})
    assert status == 400 and "does not generate" in body["error"]["message"], body
    status, body = _post(tiny, "/v1/score", {"model": "tiny", "input": "hi"})
    assert status == 400 and "not a reward model" in body["error"]["message"], body
    assert _post(rm, "/v1/score", {"model": "other", "input": "hi"})[0] == 404
    assert _post(rm, "/v1/score", {"model": "rm", "input": "hi"}, key=None)[0] == 401
    assert _post(rm, "/v1/score", {"model": "rm", "input": "hi"}, key="wrong")[0] == 401
    for bad in [[], 5, "", [1, 2], {"messages": []}, {"text": "x"}, {"messages": [{"role": "user", "content": "q"}]},
                {"messages": [{"role": "wizard", "content": "q"}]}]:
        status, body = _post(rm, "/v1/score", {"model": "rm", "input": bad})
        assert status in (400, 422) and body["error"]["message"].startswith("input"), (bad, body)
    status, body = _post(rm, "/v1/score", {"model": "rm"})
    assert status in (400, 422) and "input" in body["error"]["message"], body
