"""Several adapters over one base (issue 25): per-row LoRA/DoRA in one batch equals each adapter merged and run
alone; `lmforge serve --adapter NAME=DIR` driven by the real `openai` client on 127.0.0.1 (mixed concurrent
requests, /v1/models, run-time load/unload, a mismatched adapter refused while the others keep serving, the API
key and limits on the new routes).

The adapters are real PEFT adapter directories, built in code with random (nonzero) B matrices so that each
answers the same prompt differently; one is DoRA (with a rescaled magnitude), one is built on another model, and
one is a prompt-tuning adapter (random virtual token embeddings) served in the same batches as the others.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from test_serve_limits import KEY, request, start_cli_server, stop_cli_server

openai = pytest.importorskip("openai")

PROMPTS = ["the quick brown", "alpha lives in beta", "extract the name from: gamma works in delta", "seven wizards"]
CHAT = [{"role": "user", "content": "extract the name from: alpha lives in beta"}]


def lora_route(base: str, path: str, body: dict, key: str | None = KEY) -> tuple[int, str | dict]:
    """POST to a load/unload route: (status, the plain-text answer on success as vLLM gives it, else the JSON)."""
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(f"{base}{path}", data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _save_adapter(model_dir, out, seed: int, **lora) -> str:
    """A PEFT adapter over ``model_dir`` with random A and B (and DoRA magnitudes), saved to ``out``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.normal_(0, 0.4)
            elif "lora_magnitude_vector" in name:
                p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
    peft_model.save_pretrained(out)
    return str(out)


def _save_prompt_tuning(model_dir, out, seed: int, tokens: int = 5) -> str:
    """A PEFT prompt-tuning adapter over ``model_dir`` with random virtual token embeddings, saved to ``out``."""
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=tokens))
    torch.manual_seed(seed)
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.normal_(0, 1)
    peft_model.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    """name -> adapter dir: two LoRA adapters (different ranks, targets, rsLoRA), a DoRA one, 'pt' a prompt-tuning
    one (5 virtual tokens), and 'other', a LoRA adapter trained on a model of another hidden size (a mismatched
    base)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    out = {
        "alpha": _save_adapter(tiny_model_dir, root / "alpha", 1, r=4, lora_alpha=8, target_modules="all-linear"),
        "beta": _save_adapter(tiny_model_dir, root / "beta", 2, r=8, lora_alpha=8, use_rslora=True,
                              target_modules=["q_proj", "v_proj", "down_proj"]),
        "gamma": _save_adapter(tiny_model_dir, root / "gamma", 3, r=4, lora_alpha=4, use_dora=True,
                               target_modules=["q_proj", "o_proj", "up_proj"]),
        "pt": _save_prompt_tuning(tiny_model_dir, root / "pt", 5),
    }
    cfg = LlamaConfig(vocab_size=400, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512)
    other_dir = root / "other-base"
    LlamaForCausalLM(cfg).save_pretrained(other_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(other_dir)
    out["other"] = _save_adapter(other_dir, root / "other", 4, r=4, lora_alpha=8, target_modules=["q_proj"])
    return out


def _peft_forward_greedy(gen, prompt: list[int], n: int):
    """Greedy tokens from the PeftModel's own forward (its virtual tokens before the prompt's embeddings, the mask
    extended with ones) over the whole sequence at every step, no cache: the prompt-tuning reference. Not PEFT's
    ``generate``: PEFT 0.21.2 under transformers 5.25 inserts the virtual tokens again at every decoding step (it
    looks for the cache under ``past_key_values``, which transformers now passes as ``cache``), so its answers
    drift from its own forward after a few tokens (``lmforge generate/serve --model PT_DIR`` call it without a cache:
    test_generate.py)."""
    from lmforge.inference.generate import GenerationOptions

    eos = set(gen.eos_ids(GenerationOptions()))
    seq, out = list(prompt), []
    with torch.inference_mode():
        while len(out) < n and not (out and out[-1] in eos):
            x = torch.tensor([seq])
            out.append(int(gen.model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1].argmax()))
            seq.append(out[-1])
    return gen._decode(out, eos, [], len(prompt))


@pytest.fixture(scope="module")
def merged(tiny_model_dir, adapters):
    """Greedy answers of each adapter merged into the base and run alone (plain generate), and of the base; the
    prompt-tuning adapter's from PEFT's own forward (``_peft_forward_greedy``)."""
    from lmforge.inference.generate import GenerationOptions, Generator, encode_prompt
    from lmforge.inference.loading import load_for_inference

    generators = {name: Generator(load_for_inference(adapters[name] if name != "base" else str(tiny_model_dir),
                                                     dtype="float32"))
                  for name in ("base", "alpha", "beta", "gamma", "pt")}

    def answer(name: str, row: dict, n: int):
        gen = generators[name]
        prompt = encode_prompt(row, gen.tok)
        if name == "pt":
            return _peft_forward_greedy(gen, prompt, n)
        return gen.generate([prompt], GenerationOptions(max_new_tokens=n))[0]

    return answer


def _adapter_set(tiny_model_dir, adapters, names, max_adapters=None):
    from lmforge.inference.adapter_set import AdapterSet
    from lmforge.inference.loading import load_for_inference

    aset = AdapterSet(load_for_inference(str(tiny_model_dir), dtype="float32"), max_adapters)
    for name in names:
        aset.add(name, adapters[name])
    return aset


def test_adapters_answer_differently(merged):
    answers = {name: merged(name, {"prompt": PROMPTS[0]}, 10).token_ids
               for name in ("base", "alpha", "beta", "gamma", "pt")}
    assert len({tuple(a) for a in answers.values()}) == 5, answers  # else the mixing tests below prove nothing


def test_mixed_batch_rows_equal_each_adapter_merged(tiny_model_dir, adapters, merged):
    """One continuous batch mixing the base, two LoRA adapters, a DoRA one and a prompt-tuning one: each row's greedy
    tokens equal its adapter merged and run alone (prompt tuning: PEFT's generate on the PeftModel)."""
    from lmforge.inference import decode
    from lmforge.inference.generate import GenerationOptions, encode_prompt

    aset = _adapter_set(tiny_model_dir, adapters, ["alpha", "beta", "gamma", "pt"])
    tok = aset.base.tokenizer
    names = ["base", "alpha", "beta", "gamma", "pt"]
    rows = [(names[i % 5], {"prompt": PROMPTS[(i // 5) % len(PROMPTS)]}) for i in range(20)]
    rows += [(n, {"messages": CHAT}) for n in names]  # a shared chat prefix, prefilled per adapter (pt: after its
    # virtual tokens)
    opts = GenerationOptions(max_new_tokens=10)
    seqs = [decode.Sequence(encode_prompt(row, tok), opts, frozenset([tok.eos_token_id]), handle=i,
                            adapter=None if name == "base" else aset.get(name)) for i, (name, row) in enumerate(rows)]
    decoder = decode.Decoder(aset.base.model, tok, max_batch=8, rows=aset.rows)
    decoder.run(decode.from_list(seqs))
    assert decoder.peak == 8  # rows of different adapters really shared batches
    for (name, row), seq in zip(rows, seqs):
        assert seq.ids == merged(name, row, 10).token_ids, (name, row)


def test_prompt_tuning_rows_count_their_virtual_tokens(sharp_model_dir, tmp_path):
    """On a model with peaked attention (at random init attention is nearly uniform, so wrong positions barely
    show): two prompt-tuning adapters of 3 and 6 virtual tokens share a continuous batch with base rows, with and
    without a shared prompt prefix; each row equals PEFT's own forward of its adapter (the base's: generate)."""
    from lmforge.inference import decode
    from lmforge.inference.adapter_set import AdapterSet
    from lmforge.inference.generate import GenerationOptions, Generator, encode_prompt
    from lmforge.inference.loading import load_for_inference

    dirs = {f"pt{n}": _save_prompt_tuning(sharp_model_dir, tmp_path / f"pt{n}", n, tokens=n) for n in (3, 6)}
    aset = AdapterSet(load_for_inference(str(sharp_model_dir), dtype="float32"))
    for name, root in dirs.items():
        aset.add(name, root)
    alone = {name: Generator(load_for_inference(root, dtype="float32")) for name, root in dirs.items()}
    base, tok = Generator(aset.base), aset.base.tokenizer
    rows = [(name, row) for row in [{"prompt": p} for p in PROMPTS] + [{"messages": CHAT}]
            for name in ("base", "pt3", "pt6")]
    opts = GenerationOptions(max_new_tokens=8)
    seqs = [decode.Sequence(encode_prompt(row, tok), opts, frozenset([tok.eos_token_id]),
                            adapter=None if name == "base" else aset.get(name)) for name, row in rows]
    decoder = decode.Decoder(aset.base.model, tok, max_batch=8, rows=aset.rows)
    decoder.run(decode.from_list(seqs))
    assert decoder.peak == 8
    for (name, row), seq in zip(rows, seqs):
        want = (base.generate([seq.prompt], opts)[0] if name == "base" else
                _peft_forward_greedy(alone[name], seq.prompt, 8))
        assert seq.ids == want.token_ids, (name, row)
    assert len({tuple(s.ids) for s in seqs[:3]}) == 3  # the adapters answer differently
    again = [decode.Sequence(seqs[-1].prompt, opts, frozenset([tok.eos_token_id]), adapter=a)
             for a in (aset.get("pt6"), None)]  # the chat prefix kept from the first run, after pt6's tokens
    decoder.run(decode.from_list(again))
    assert again[0].ids == seqs[-1].ids


def test_max_adapters_drops_the_least_recently_used_and_reads_it_again(tiny_model_dir, adapters):
    aset = _adapter_set(tiny_model_dir, adapters, ["alpha", "beta"], max_adapters=1)
    assert aset.resident() == ["beta"]  # alpha, used least recently, was dropped from memory
    held = aset.get("beta")
    alpha = aset.get("alpha")  # read again from its path; beta dropped
    assert aset.resident() == ["alpha"] and [n for n, _ in aset.names()] == ["alpha", "beta"]
    assert set(alpha.layers) and held.layers  # a row still holding beta keeps its weights
    assert aset.get("beta") is not held  # a fresh read
    aset.add("pt", adapters["pt"])  # a prompt-tuning adapter counts as one too
    assert aset.resident() == ["pt"] and aset.kind("pt") == "prompt_tuning" and aset.kind("beta") == "lora"


def test_unmixable_and_mismatched_adapters_are_refused_with_the_reason(tiny_model_dir, adapters, tmp_path):
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lmforge.errors import ConfigError, UnsupportedError

    aset = _adapter_set(tiny_model_dir, adapters, [])
    with pytest.raises(ConfigError, match="hidden_size 48 vs 32"):
        aset.add("other", adapters["other"])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).save_pretrained(
        tmp_path / "prefix")
    with pytest.raises(UnsupportedError, match="prefix_tuning adapter: its virtual tokens are computed per layer"):
        aset.add("prefix", str(tmp_path / "prefix"))
    with pytest.raises(ConfigError, match="not a directory"):
        aset.add("missing", str(tmp_path / "nowhere"))
    assert aset.names() == []


def test_cli_refuses_a_mismatched_adapter_at_start(tiny_model_dir, adapters):
    proc = subprocess.run([sys.executable, "-m", "lmforge", "serve", "--model", str(tiny_model_dir), "--dtype",
                           "float32", "--adapter", f"alpha={adapters['alpha']}", "--adapter",
                           f"other={adapters['other']}"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "LMFORGE_API_KEY": ""})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]  # (libraries may warn above it)
    assert last.startswith("lmforge: error: adapter 'other'") and "hidden_size 48 vs 32" in last


def test_chat_switches_adapters_on_one_base(tiny_model_dir, adapters, merged):
    import io

    from lmforge.inference.backends import HfBackend
    from lmforge.inference.chat import Chat, open_answers
    from lmforge.inference.generate import GenerationOptions

    answers = open_answers(HfBackend(str(tiny_model_dir), "float32"), {n: adapters[n] for n in ("gamma", "pt")})
    try:
        out = io.StringIO()
        chat = Chat(answers, GenerationOptions(max_new_tokens=10), stdout=out)
        chat.handle("/model gamma")
        assert chat.ask(CHAT[0]["content"]).token_ids == merged("gamma", {"messages": CHAT}, 10).token_ids
        chat.handle("/reset")
        chat.handle("/model pt")
        assert chat.ask(CHAT[0]["content"]).token_ids == merged("pt", {"messages": CHAT}, 10).token_ids
        chat.handle("/reset")
        chat.handle(f"/model {tiny_model_dir}")
        assert chat.ask(CHAT[0]["content"]).token_ids == merged("base", {"messages": CHAT}, 10).token_ids
        chat.handle("/model nope")
        assert "[unknown model nope; models: " in out.getvalue() and chat.model == str(tiny_model_dir)
    finally:
        answers.close()


def test_eval_scores_each_adapter_on_one_base(tiny_model_dir, adapters, tmp_path, capsys):
    from conftest import write_jsonl

    from lmforge.cli import main

    data = write_jsonl(tmp_path / "val.jsonl", [{"prompt": p, "completion": " alpha beta"} for p in PROMPTS])
    common = ["--data", str(data), "--metrics", "perplexity", "--dtype", "float32"]
    assert main(["eval", "--model", str(tiny_model_dir), "--adapter", f"beta={adapters['beta']}", "--adapter",
                 f"gamma={adapters['gamma']}", "--output", str(tmp_path / "all.json"), *common]) == 0
    report = json.loads((tmp_path / "all.json").read_text())
    for name in ("beta", "gamma"):
        assert main(["eval", "--model", adapters[name], "--output", str(tmp_path / f"{name}.json"), *common]) == 0
        alone = json.loads((tmp_path / f"{name}.json").read_text())["metrics"]["perplexity"]
        assert report["adapters"][name]["metrics"]["perplexity"] == pytest.approx(alone, rel=1e-4)
    assert report["metrics"]["perplexity"] != pytest.approx(report["adapters"]["beta"]["metrics"]["perplexity"])
    assert main(["eval", "--model", str(tiny_model_dir), "--adapter", f"pt={adapters['pt']}", "--output",
                 str(tmp_path / "pt.json"), *common]) == 2  # scored by a forward, not the decode loop: refused
    assert "'pt' is a prompt-tuning adapter" in capsys.readouterr().err



def test_generate_compares_adapters_on_one_base(tiny_model_dir, adapters, merged, tmp_path, capsys):
    """`generate --adapter`: a row naming no model comes out once per model (the base, then each adapter), a row
    naming one comes out once; each completion equals that adapter merged and run alone. An unknown name stops the
    run before the model loads, naming the row."""
    from conftest import write_jsonl

    from lmforge.cli import main

    rows = [{"prompt": PROMPTS[0]}, {"messages": CHAT, "model": "pt"}, {"prompt": PROMPTS[1], "model": "alpha"}]
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    flags = ["--model", str(tiny_model_dir), "--adapter", f"alpha={adapters['alpha']}", "--adapter",
             f"pt={adapters['pt']}", "--max-new-tokens", "10", "--dtype", "float32", "--no-progress"]
    out = tmp_path / "out.jsonl"
    assert main(["generate", *flags, "--input", str(data), "--output", str(out)]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    expected = [("base", rows[0]), ("alpha", rows[0]), ("pt", rows[0]), ("pt", rows[1]), ("alpha", rows[2])]
    assert [g["model"] for g in got] == [str(tiny_model_dir) if n == "base" else n for n, _ in expected]
    for g, (name, row) in zip(got, expected):
        assert g["completion"] == merged(name, row, 10).text, name
    bad = write_jsonl(tmp_path / "bad.jsonl", [rows[0], {"prompt": "x", "model": "delta"}])
    assert main(["generate", *flags, "--input", str(bad), "--output", str(tmp_path / "o2.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2: model 'delta' is neither --model" in err and "Traceback" not in err

# ------------------------------------------------------------------------------------------ the server
@pytest.fixture(scope="module")
def server(tiny_model_dir, adapters, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-adapters") / "server.log"
    proc, base = start_cli_server(tiny_model_dir, log, "--api-key", KEY, "--max-new-tokens", "16",
                                  "--adapter", f"alpha={adapters['alpha']}", "--adapter", f"gamma={adapters['gamma']}",
                                  "--adapter", f"pt={adapters['pt']}", "--allow-adapter-loading",
                                  "--max-body-bytes", "4096")
    yield base
    stop_cli_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


def test_models_lists_the_base_and_each_adapter(client, adapters, tiny_model_dir):
    models = {m.id: m.model_dump() for m in client.models.list().data}
    assert list(models) == ["tiny", "alpha", "gamma", "pt"]
    assert models["tiny"]["parent"] is None and models["tiny"]["root"] == str(tiny_model_dir)
    for name, kind in (("alpha", "lora"), ("gamma", "dora"), ("pt", "prompt_tuning")):
        assert (models[name]["parent"], models[name]["root"], models[name]["kind"]) == ("tiny", adapters[name], kind)


def test_24_concurrent_mixed_requests_each_equal_its_adapter_alone(server, client, merged):
    """The base, a LoRA, a DoRA and a prompt-tuning adapter in one continuous batch."""
    names = ["tiny", "alpha", "gamma", "pt"]

    def one(i: int):
        model = names[i % 4]
        if i // 4 % 2:
            r = client.completions.create(model=model, prompt=PROMPTS[i // 8], max_tokens=10, temperature=0)
            return model, {"prompt": PROMPTS[i // 8]}, r.choices[0].text, r.model
        r = client.chat.completions.create(model=model, messages=CHAT, max_tokens=10, temperature=0)
        return model, {"messages": CHAT}, r.choices[0].message.content, r.model

    before = request(server, "/health")[1]
    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(one, range(24)))
    after = request(server, "/health")[1]
    for model, row, text, answered_as in results:
        assert (text, answered_as) == (merged("base" if model == "tiny" else model, row, 10).text, model), (model, row)
    assert after["requests"] - before["requests"] == 24 and after["largest_batch"] > 3


def test_load_use_unload_then_404(server, client, adapters, merged):
    code, body = lora_route(server, "/v1/load_lora_adapter", {"lora_name": "beta", "lora_path": adapters["beta"]})
    assert code == 200, body
    code, body = lora_route(server, "/v1/load_lora_adapter", {"lora_name": "pt2", "lora_path": adapters["pt"]})
    assert code == 200, body  # a prompt-tuning adapter loads at run time too
    assert [m.id for m in client.models.list().data] == ["tiny", "alpha", "gamma", "pt", "beta", "pt2"]
    r = client.completions.create(model="beta", prompt=PROMPTS[1], max_tokens=10, temperature=0)
    assert r.choices[0].text == merged("beta", {"prompt": PROMPTS[1]}, 10).text
    r = client.completions.create(model="pt2", prompt=PROMPTS[1], max_tokens=10, temperature=0)
    assert r.choices[0].text == merged("pt", {"prompt": PROMPTS[1]}, 10).text
    assert lora_route(server, "/v1/unload_lora_adapter", {"lora_name": "pt2"})[0] == 200
    code, body = lora_route(server, "/v1/load_lora_adapter", {"lora_name": "beta", "lora_path": adapters["beta"]})
    assert code == 400 and "already been loaded" in body["error"]["message"]
    assert lora_route(server, "/v1/unload_lora_adapter", {"lora_name": "beta"})[0] == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="beta", prompt=PROMPTS[1], max_tokens=2)
    code, body = lora_route(server, "/v1/unload_lora_adapter", {"lora_name": "beta"})
    assert code == 404 and "cannot be found" in body["error"]["message"]
    assert [m.id for m in client.models.list().data] == ["tiny", "alpha", "gamma", "pt"]


def test_a_mismatched_or_bad_adapter_is_refused_and_the_others_keep_serving(server, client, adapters, merged,
                                                                             tmp_path):
    code, body = lora_route(server, "/v1/load_lora_adapter", {"lora_name": "other", "lora_path": adapters["other"]})
    assert code == 400 and "hidden_size 48 vs 32" in body["error"]["message"], body
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "x"}))
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    code, body = lora_route(server, "/v1/load_lora_adapter", {"lora_name": "broken", "lora_path": str(broken)})
    assert code == 400 and "broken" in body["error"]["message"], body
    code, body = lora_route(server, "/v1/load_lora_adapter", {"lora_name": "tiny", "lora_path": adapters["beta"]})
    assert code == 400 and "base model" in body["error"]["message"]
    assert [m.id for m in client.models.list().data] == ["tiny", "alpha", "gamma", "pt"]
    r = client.completions.create(model="alpha", prompt=PROMPTS[2], max_tokens=10, temperature=0)
    assert r.choices[0].text == merged("alpha", {"prompt": PROMPTS[2]}, 10).text


def test_the_new_routes_need_the_key_and_obey_the_limits(server, adapters):
    body = {"lora_name": "beta", "lora_path": adapters["beta"]}
    assert lora_route(server, "/v1/load_lora_adapter", body, key=None)[0] == 401
    assert lora_route(server, "/v1/load_lora_adapter", body, key="wrong")[0] == 401
    assert lora_route(server, "/v1/unload_lora_adapter", {"lora_name": "alpha"}, key=None)[0] == 401
    code, _ = lora_route(server, "/v1/load_lora_adapter", {"lora_name": "beta", "lora_path": "x" * 5000})
    assert code == 413  # --max-body-bytes 4096
    code, err = lora_route(server, "/v1/load_lora_adapter", {"lora_name": "beta"})
    assert code == 400 and err["error"]["param"] == "lora_path"
    code, err, _ = request(server, "/v1/chat/completions", {"model": "alpha", "messages": CHAT, "n": 99})
    assert code == 400 and err["error"]["param"] == "n"  # the request limits hold for adapters too
    assert "alpha" in [m["id"] for m in request(server, "/v1/models")[1]["data"]]  # nothing was unloaded


def test_the_routes_exist_only_with_allow_adapter_loading(tiny_model_dir, adapters, tmp_path):
    proc, base = start_cli_server(tiny_model_dir, tmp_path / "log", "--adapter", f"alpha={adapters['alpha']}")
    try:
        code, _ = lora_route(base, "/v1/load_lora_adapter", {"lora_name": "beta", "lora_path": adapters["beta"]})
        assert code == 404
        assert [m["id"] for m in request(base, "/v1/models")[1]["data"]] == ["tiny", "alpha"]
    finally:
        stop_cli_server(proc)


def test_layers_sharing_an_input_are_found_and_share_one_weight(tiny_model_dir, adapters):
    """q/k/v and gate/up take one input each: found from a forward and computed as one (their base weights become
    views into one tensor, so serving them together costs no copy)."""
    aset = _adapter_set(tiny_model_dir, adapters, [])
    layers = aset.base.model.config.num_hidden_layers
    names = {g.names for g in aset.rows.siblings}
    expected = set()
    for i in range(layers):
        expected.add(tuple(f"model.layers.{i}.self_attn.{p}_proj" for p in "qkv"))
        expected.add((f"model.layers.{i}.mlp.gate_proj", f"model.layers.{i}.mlp.up_proj"))
    assert names == expected
    for group in aset.rows.siblings:
        start = group.buffer.data_ptr()
        assert all(start <= aset.rows.layers[n].weight.data_ptr() < start + group.buffer.nbytes for n in group.names)


def test_the_fold_keeps_recent_adapters_and_drops_unused_ones(tiny_model_dir, adapters):
    """The adapters folded into the base matmul are a superset of the batch's: a batch of fewer adapters (a prefill,
    rows leaving) reuses the fold, an adapter unused for STALE forwards leaves it, a new one joins it."""
    aset = _adapter_set(tiny_model_dir, adapters, ["alpha", "beta"])
    rows, alpha, beta = aset.rows, aset.get("alpha"), aset.get("beta")
    with rows.rows([alpha, beta]):
        pass
    assert rows.folded == (alpha, beta)
    for _ in range(rows.STALE):
        with rows.rows([alpha, None]):
            pass
    assert rows.folded == (alpha, beta)
    with rows.rows([None, alpha]):
        pass
    assert rows.folded == (alpha,)
    with rows.rows([beta]):
        pass
    assert rows.folded == (alpha, beta)
