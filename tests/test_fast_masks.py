"""Chat masks from one rendering per conversation (the fast path) equal the per-prefix masks and hand-built
ones on ChatML, Llama-3-style and Zephyr-style templates; a template the fast path cannot handle falls back
and says so; tokenising in several processes gives the same data; a cached re-run does not re-tokenise."""

import os
import random

import pytest
from transformers import AutoTokenizer

from conftest import CHATML_TEMPLATE, base_config, chat_rows, write_jsonl
from lmforge.cli import main
from lmforge.config import load_config
from lmforge.data import prepare
from lmforge.data.tokenize import FAST, IGNORE, PER_PREFIX, Encoder
from lmforge.models import finalize_tokenizer

LLAMA3 = (
    "{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim"
    " + eos_token }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
ZEPHYR = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ '<|user|>\n' + m['content'] + eos_token + '\n' }}"
    "{% elif m['role'] == 'system' %}{{ '<|system|>\n' + m['content'] + eos_token + '\n' }}"
    "{% elif m['role'] == 'tool' %}{{ '<|tool|>\n' + m['content'] + eos_token + '\n' }}"
    "{% else %}{{ '<|assistant|>\n' + m['content'] + eos_token + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
# Prefix-consistent, but each turn carries its number: the text before an assistant turn is never the same
# twice, so spans cannot be found from one rendering by a fixed layout.
NUMBERED = (
    "{% for m in messages %}{{ '[' ~ loop.index ~ '] ' + m['role'] + ':\n' + m['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '[' ~ (messages | length + 1) ~ '] assistant:\n' }}{% endif %}"
)

CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "name the fox"},
    {"role": "assistant", "content": "the quick fox"},
    {"role": "tool", "content": "fox: 7"},
    {"role": "assistant", "content": "a lazy dog"},
    {"role": "user", "content": "city"},
    {"role": "assistant", "content": "Lyon"},
]
# Hand-written renderings of CHAT as (text, carries loss) segments; {eos} is the tokenizer's EOS.
SEGMENTS = {
    "chatml": [
        ("<|im_start|>system\nbe brief{eos}\n<|im_start|>user\nname the fox{eos}\n<|im_start|>assistant\n", False),
        ("the quick fox{eos}", True),
        ("\n<|im_start|>tool\nfox: 7{eos}\n<|im_start|>assistant\n", False),
        ("a lazy dog{eos}", True),
        ("\n<|im_start|>user\ncity{eos}\n<|im_start|>assistant\n", False),
        ("Lyon{eos}", True),
        ("\n", False),
    ],
    "llama3": [
        ("<|start_header_id|>system<|end_header_id|>\n\nbe brief{eos}<|start_header_id|>user<|end_header_id|>\n\n"
         "name the fox{eos}<|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("the quick fox{eos}", True),
        ("<|start_header_id|>tool<|end_header_id|>\n\nfox: 7{eos}<|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("a lazy dog{eos}", True),
        ("<|start_header_id|>user<|end_header_id|>\n\ncity{eos}<|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("Lyon{eos}", True),
    ],
    "zephyr": [
        ("<|system|>\nbe brief{eos}\n<|user|>\nname the fox{eos}\n<|assistant|>\n", False),
        ("the quick fox{eos}", True),
        ("\n<|tool|>\nfox: 7{eos}\n<|assistant|>\n", False),
        ("a lazy dog{eos}", True),
        ("\n<|user|>\ncity{eos}\n<|assistant|>\n", False),
        ("Lyon{eos}", True),
        ("\n", False),
    ],
    "numbered": [
        ("[1] system:\nbe brief{eos}\n[2] user:\nname the fox{eos}\n[3] assistant:\n", False),
        ("the quick fox{eos}", True),
        ("\n[4] tool:\nfox: 7{eos}\n[5] assistant:\n", False),
        ("a lazy dog{eos}", True),
        ("\n[6] user:\ncity{eos}\n[7] assistant:\n", False),
        ("Lyon{eos}", True),
        ("\n", False),
    ],
}
TEMPLATES = {"chatml": CHATML_TEMPLATE, "llama3": LLAMA3, "zephyr": ZEPHYR, "numbered": NUMBERED}


def _tok(path, template):
    tok = finalize_tokenizer(AutoTokenizer.from_pretrained(path))
    tok.chat_template = template
    return tok


def _hand_built(tok, segments):
    ids, labels = [], []
    for text, loss in segments:
        seg = tok(text.format(eos=tok.eos_token), add_special_tokens=False).input_ids
        ids += seg
        labels += seg if loss else [IGNORE] * len(seg)
    labels[0] = IGNORE
    return ids, labels


def _random_chats(n, seed=0):
    """Multi-turn conversations with optional system prompts and tool turns; contents include the role names
    and markers a careless search would mistake for the template's own."""
    rng = random.Random(seed)
    words = "the fox assistant user system tool [3] : <|im_start|> <|assistant|> \n jumps over a lazy dog".split(" ")
    say = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(1, 8))).strip() or "ok"  # noqa: E731
    chats = []
    for _ in range(n):
        msgs = [{"role": "system", "content": say()}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 4)):
            msgs.append({"role": "user", "content": say()})
            msgs.append({"role": "assistant", "content": say()})
            if rng.random() < 0.3:
                msgs.append({"role": "tool", "content": say()})
                msgs.append({"role": "assistant", "content": say()})
        chats.append(msgs)
    return chats


@pytest.mark.parametrize("name", ["chatml", "llama3", "zephyr", "numbered"])
def test_masks_equal_hand_built_and_per_prefix(tiny_tokenizer_dir, name):
    tok = _tok(tiny_tokenizer_dir, TEMPLATES[name])
    enc = Encoder(tok)
    ids, labels = _hand_built(tok, SEGMENTS[name])
    for got in (enc.chat(CHAT), enc.encode_batch([({"messages": CHAT}, "chat")])[0], enc.chat_per_prefix(CHAT)):
        assert got.input_ids == ids
        assert got.labels == labels
    assert labels[-1 if name == "llama3" else -2] == tok.eos_token_id  # EOS ends the last turn and carries loss
    assert enc.chat_path()[0] == (PER_PREFIX if name == "numbered" else FAST)
    assert enc.mask_counts[FAST] == (0 if name == "numbered" else 2)  # chat() and encode_batch() took the fast path


@pytest.mark.parametrize("name", ["chatml", "llama3", "zephyr"])
def test_fast_path_equals_per_prefix_on_many_conversations(tiny_tokenizer_dir, name):
    tok = _tok(tiny_tokenizer_dir, TEMPLATES[name])
    enc = Encoder(tok)
    chats = _random_chats(60)
    fast = enc.encode_batch([({"messages": c}, "chat") for c in chats])
    ref = [enc.chat_per_prefix(c) for c in chats]
    assert [(e.input_ids, e.labels) for e in fast] == [(e.input_ids, e.labels) for e in ref]
    assert enc.chat_path() == (FAST, "")
    # rows whose content holds the template's own markers are masked by the per-prefix method; the rest fast
    assert enc.mask_counts[FAST] > 20 and enc.mask_counts[FAST] + enc.mask_counts[PER_PREFIX] == 60


def test_template_without_eos_gets_it_appended_on_the_fast_path(tiny_tokenizer_dir):
    tok = _tok(tiny_tokenizer_dir, ZEPHYR.replace(" + eos_token", ""))
    enc = Encoder(tok)
    got = enc.chat(CHAT[:3])
    assert enc.chat_path()[0] == FAST
    assert (got.input_ids, got.labels) == (enc.chat_per_prefix(CHAT[:3]).input_ids, enc.chat_per_prefix(CHAT[:3]).labels)
    assert got.input_ids[-1] == tok.eos_token_id and got.labels[-1] == tok.eos_token_id


def test_unsupported_template_falls_back_and_says_so(tmp_path, tiny_model_dir, lmforge_cache):
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}] * 3)
    cfg = load_config(None, tree=base_config(tiny_model_dir, data, tmp_path / "out", data={"max_length": 512}))
    tok = _tok(tiny_model_dir, NUMBERED)
    ds, stats, _ = prepare.prepare_split(cfg, tok, "train", packed=False)
    lines = "\n".join(stats.lines())
    assert f"chat masks, {data}: per-prefix rendering for all 3 rows" in lines
    assert "varies between turns" in lines
    ids, labels = _hand_built(tok, SEGMENTS["numbered"])
    assert ds[0]["input_ids"] == ids and ds[0]["labels"] == labels
    tok = _tok(tiny_model_dir, CHATML_TEMPLATE)
    _, stats, _ = prepare.prepare_split(cfg, tok, "train", packed=False)
    assert f"chat masks, {data}: fast path (one template rendering per conversation) for all 3 rows" in stats.lines()


def _prepare_cfg(tmp_path, tiny_model_dir, n=48):
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(n))
    return data, load_config(None, tree=base_config(tiny_model_dir, data, tmp_path / "out"))


def test_parallel_tokenising_gives_the_same_data(tmp_path, tiny_model_dir, lmforge_cache, monkeypatch):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two cores")
    data, cfg = _prepare_cfg(tmp_path, tiny_model_dir)
    tok = finalize_tokenizer(AutoTokenizer.from_pretrained(tiny_model_dir))
    serial, s_stats, _ = prepare.prepare_split(cfg, tok, "train", packed=True)
    monkeypatch.setattr(prepare, "PARALLEL_MIN_ROWS", 8)
    monkeypatch.setattr(prepare, "_BATCH", 5)
    cfg.data.cache_dir = str(tmp_path / "other-cache")
    par, p_stats, _ = prepare.prepare_split(cfg, tok, "train", packed=True)
    assert s_stats.processes == 1 and p_stats.processes == 2
    assert par.to_dict() == serial.to_dict()
    assert (p_stats.tokens, p_stats.loss_tokens, p_stats.masks) == (s_stats.tokens, s_stats.loss_tokens, s_stats.masks)


def test_bad_rows_keep_file_and_line_when_parallel(tmp_path, tiny_model_dir, lmforge_cache, monkeypatch, capsys):
    monkeypatch.setattr(prepare, "PARALLEL_MIN_ROWS", 8)
    rows = chat_rows(30)
    rows[17] = {"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    from conftest import write_config

    cfg = write_config(tmp_path / "c.yaml", base_config(tiny_model_dir, data, tmp_path / "out"))
    assert main(["prepare", str(cfg)]) == 2
    assert f"{data}:18" in capsys.readouterr().err


def test_cached_rerun_does_not_tokenise(tmp_path, tiny_model_dir, lmforge_cache, monkeypatch):
    data, cfg = _prepare_cfg(tmp_path, tiny_model_dir)
    tok = finalize_tokenizer(AutoTokenizer.from_pretrained(tiny_model_dir))
    calls = []
    real = Encoder.encode_batch
    monkeypatch.setattr(Encoder, "encode_batch", lambda self, rows: calls.append(len(rows)) or real(self, rows))
    first, _, path = prepare.prepare_split(cfg, tok, "train", packed=True)
    assert sum(calls) == 48
    again, stats, path2 = prepare.prepare_split(cfg, tok, "train", packed=True)
    assert sum(calls) == 48 and path2 == path and stats.rows == 48
    assert again.to_dict() == first.to_dict()
    assert again.cache_files  # memory-mapped from the cache's Arrow files, not loaded into memory
    os.utime(data, ns=(os.stat(data).st_atime_ns, os.stat(data).st_mtime_ns + 10**9))  # the file changed: rebuild
    _, _, path3 = prepare.prepare_split(cfg, tok, "train", packed=True)
    assert sum(calls) == 96 and path3 != path


@pytest.mark.parametrize("chat_template", [False, True])
def test_batched_encoding_equals_one_row_at_a_time(tiny_tokenizer_dir, chat_template):
    tok = _tok(tiny_tokenizer_dir, CHATML_TEMPLATE)
    rows = [({"text": "the quick brown fox"}, "text"), ({"prompt": "name the fox:", "completion": " the quick fox"},
            "prompt_completion"), ({"messages": CHAT}, "chat"), ({"text": "a lazy dog"}, "text")]
    batched = Encoder(tok, apply_chat_template=chat_template).encode_batch(rows)
    one = Encoder(tok, apply_chat_template=chat_template)
    assert batched == [one.encode(row, fmt) for row, fmt in rows]
