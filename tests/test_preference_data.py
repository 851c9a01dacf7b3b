"""Preference data: SFT-identical rendering, hand-built collation and masks, truncation counts, inspect."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import base_config, write_config, write_jsonl
from transformers import AutoTokenizer

from lmforge.config import load_config
from lmforge.data.prepare import Stats
from lmforge.data.split import prepare_split
from lmforge.data.preference import encode_preference_rows, encode_side
from lmforge.data.sources import Row
from lmforge.data.tokenize import IGNORE, Encoder
from lmforge.errors import DataError
from lmforge.models import finalize_tokenizer
from lmforge.synthetic import preference_rows

PROMPT = [{"role": "user", "content": "extract the name"}]
CHOSEN = [{"role": "assistant", "content": '{"name":"Alice Adler"}'}]
REJECTED = [{"role": "assistant", "content": "The person is Alice."}]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return finalize_tokenizer(AutoTokenizer.from_pretrained(tiny_model_dir))


def _ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def _cfg(tmp_path, tiny_model_dir, method="dpo", **data):
    tree = base_config(tiny_model_dir, tmp_path / "d.jsonl", tmp_path / "run", method=method, data=data)
    return load_config(None, tree=tree)


def test_chat_pair_matches_hand_rendered_chatml(tok):
    eos = tok.eos_token
    prompt, chosen = encode_side(Encoder(tok), PROMPT, CHOSEN)
    assert prompt == _ids(tok, "<|im_start|>user\nextract the name" + eos + "\n<|im_start|>assistant\n")
    # the answer is the assistant text and its EOS; the newline the template puts after EOS carries no loss
    assert chosen == _ids(tok, '{"name":"Alice Adler"}' + eos)


def test_answer_tokens_are_exactly_the_sft_loss_tokens(tok):
    enc = Encoder(tok)
    for prompt, answer in [(PROMPT, CHOSEN), (PROMPT, REJECTED), ("a raw prompt", "a raw answer")]:
        p, a = encode_side(enc, prompt, answer)
        if isinstance(prompt, list):
            sft = enc.chat(prompt + answer)
        else:
            sft = enc.prompt_completion(prompt, answer)
        loss_positions = [t for t, label in enumerate(sft.labels) if label != IGNORE]
        assert sft.input_ids[:len(p) + len(a)] == p + a
        assert loss_positions == list(range(len(p), len(p) + len(a)))


def test_string_rows_are_raw_text_and_mixed_rows_use_the_template(tok):
    enc = Encoder(tok)
    p, a = encode_side(enc, "Q: two plus two?", " four")
    assert p == enc.bos + _ids(tok, "Q: two plus two?") and a == _ids(tok, " four") + [tok.eos_token_id]
    p2, a2 = encode_side(enc, "extract the name", CHOSEN)  # string prompt + message answer -> a user turn
    assert (p2, a2) == encode_side(enc, PROMPT, CHOSEN)
    p3, _ = encode_side(Encoder(tok, apply_chat_template=True), "extract the name", '{"name":"Alice Adler"}')
    assert p3 == p2


def test_dpo_collation_equals_hand_built_batch(tok):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    rows = [("preference", Row({"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}, "d.jsonl:1")),
            ("preference", Row({"prompt": "hi", "chosen": "yes", "rejected": "no no"}, "d.jsonl:2"))]
    cfg = load_config(None, tree={"method": "dpo", "model": {"name_or_path": "x"}, "data": {"train": [{"path": "x"}]}})
    records = encode_preference_rows(cfg, tok, rows, Stats())
    batch = DataCollatorForPreference(pad_token_id=tok.pad_token_id)(records)

    eos, pad = tok.eos_token, tok.pad_token_id
    p0 = _ids(tok, "<|im_start|>user\nextract the name" + eos + "\n<|im_start|>assistant\n")
    c0, r0 = _ids(tok, '{"name":"Alice Adler"}' + eos), _ids(tok, "The person is Alice." + eos)
    p1 = _ids(tok, "hi")
    c1, r1 = _ids(tok, "yes") + [tok.eos_token_id], _ids(tok, "no no") + [tok.eos_token_id]
    seqs = [(p0, c0), (p1, c1), (p0, r0), (p1, r1)]  # TRL's layout: all chosen, then all rejected
    T = max(len(p) + len(a) for p, a in seqs)
    ids = torch.full((4, T), pad)
    attn = torch.zeros(4, T, dtype=torch.long)
    comp = torch.zeros(4, T, dtype=torch.long)
    for b, (p, a) in enumerate(seqs):
        ids[b, :len(p) + len(a)] = torch.tensor(p + a)
        attn[b, :len(p) + len(a)] = 1
        comp[b, len(p):len(p) + len(a)] = 1
    assert torch.equal(batch["input_ids"], ids)
    assert torch.equal(batch["attention_mask"], attn)
    assert torch.equal(batch["completion_mask"], comp)


def test_orpo_collation_equals_hand_built_batch(tok):
    from trl.experimental.utils import DPODataCollatorWithPadding

    from lmforge.methods.orpo import orpo_columns

    rec = {"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10]}
    rec2 = {"prompt_ids": [5], "chosen_ids": [11], "rejected_ids": [12, 13, 14]}
    batch = DPODataCollatorWithPadding(pad_token_id=0)([orpo_columns(rec), orpo_columns(rec2)])
    assert batch["chosen_input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 11, 0, 0, 0]]
    assert batch["chosen_attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch["chosen_labels"].tolist() == [[-100, -100, -100, 8, 9], [-100, 11, -100, -100, -100]]
    assert batch["rejected_input_ids"].tolist() == [[5, 6, 7, 10], [5, 12, 13, 14]]
    assert batch["rejected_labels"].tolist() == [[-100, -100, -100, 10], [-100, 12, 13, 14]]


def test_truncation_is_applied_and_counted(tok, tmp_path, tiny_model_dir):
    long_prompt = "alpha beta gamma " * 20
    rows = [("preference", Row({"prompt": long_prompt, "chosen": "yes", "rejected": "no " * 30}, "d.jsonl:1")),
            ("preference", Row({"prompt": "hi", "chosen": "yes", "rejected": "no"}, "d.jsonl:2"))]
    enc = Encoder(tok)
    full_prompt, _ = encode_side(enc, long_prompt, "yes")
    cfg = _cfg(tmp_path, tiny_model_dir, max_length=24, max_prompt_length=16)
    stats = Stats()
    recs = encode_preference_rows(cfg, tok, rows, stats)
    assert stats.prompt_truncated == 1 and stats.truncated == 1
    assert recs[0]["prompt_ids"] == full_prompt[-16:]  # the end of the prompt is kept
    assert len(recs[0]["prompt_ids"]) + len(recs[0]["rejected_ids"]) == 24
    assert recs[1]["rejected_ids"] == _ids(tok, "no") + [tok.eos_token_id]  # short rows untouched

    cfg = _cfg(tmp_path, tiny_model_dir, max_length=12)  # no max_prompt_length: the long prompt fills max_length
    stats = Stats()
    recs = encode_preference_rows(cfg, tok, rows, stats)
    assert len(recs) == 1 and stats.dropped == {"prompt alone fills max_length": 1}


def test_kto_unpairs_preference_rows_and_reads_labelled_rows(tok, tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, tiny_model_dir, method="kto")
    rows = [("preference", Row({"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}, "d:1")),
            ("kto", Row({"prompt": PROMPT, "completion": REJECTED, "label": False}, "d:2"))]
    recs = encode_preference_rows(cfg, tok, rows, Stats())
    p, c = encode_side(Encoder(tok), PROMPT, CHOSEN)
    _, r = encode_side(Encoder(tok), PROMPT, REJECTED)
    assert recs == [{"prompt_ids": p, "completion_ids": c, "label": True},
                    {"prompt_ids": p, "completion_ids": r, "label": False},
                    {"prompt_ids": p, "completion_ids": r, "label": False}]


def test_prepare_split_caches_pairs_and_rejects_sft_rows(tmp_path, tiny_model_dir, tok, lmforge_cache):
    write_jsonl(tmp_path / "d.jsonl", preference_rows(6, 0))
    cfg = _cfg(tmp_path, tiny_model_dir)
    ds, stats, path = prepare_split(cfg, tok, "train", packed=False)
    assert set(ds.column_names) == {"prompt_ids", "chosen_ids", "rejected_ids"} and len(ds) == 6
    assert stats.samples == 6 and stats.loss_tokens == sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in ds)
    ds2, _, path2 = prepare_split(cfg, tok, "train", packed=False)
    assert path2 == path and ds2["chosen_ids"] == ds["chosen_ids"]
    other = _cfg(tmp_path, tiny_model_dir, max_prompt_length=8)
    assert prepare_split(other, tok, "train", packed=False)[2] != path  # max_prompt_length is in the cache key

    write_jsonl(tmp_path / "d.jsonl", [{"messages": CHOSEN}])
    with pytest.raises(DataError, match="cannot train method 'dpo'"):
        prepare_split(cfg, tok, "train", packed=False)


def test_bad_preference_row_names_file_and_line(tmp_path, tiny_model_dir, tok, lmforge_cache):
    write_jsonl(tmp_path / "d.jsonl", preference_rows(2, 0) + [{"prompt": "p", "chosen": "c"}])
    with pytest.raises(DataError, match=r"d.jsonl:3.*rejected"):
        prepare_split(_cfg(tmp_path, tiny_model_dir), tok, "train", packed=False)


def test_inspect_shows_prompt_chosen_rejected_marked(tmp_path, tiny_model_dir, lmforge_cache):
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}])
    tree = base_config(tiny_model_dir, tmp_path / "d.jsonl", tmp_path / "run", method="dpo")
    cfg = write_config(tmp_path / "cfg.yaml", tree)
    out = subprocess.run([sys.executable, "-m", "lmforge", "inspect", str(cfg), "--n", "1"], capture_output=True,
                         text=True, env={**__import__("os").environ, "LMFORGE_CACHE": str(lmforge_cache)})
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "1 pairs" in text and "prompt:" in text and "chosen:" in text and "rejected:" in text
    assert '[[{"name":"Alice Adler"}' in text and "[[The person is Alice." in text
    assert "[[<|im_start|>user" not in text  # the prompt carries no loss
