"""Causal-LM data prepared in bounded memory (data/bounded.py): the same samples as the rows-in-memory pipeline,
bad rows still named by file:line across the workers' byte ranges, and a peak RSS that does not follow the data."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest
import yaml

from lmforge.cli import main
from lmforge.config import load_config
from lmforge.data import bounded
from lmforge.data.packing import pack_bins
from lmforge.data.tokenize import IGNORE
from lmforge.data.prepare import Stats, encode_rows, load_rows, split_rows, to_table
from lmforge.data.split import prepare_split
from lmforge.models import load_tokenizer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda the quick brown fox jumps".split()


def _say(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _chat_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"messages": [{"role": "user", "content": _say(rng, rng.randint(2, 30))},
                          {"role": "assistant", "content": _say(rng, rng.randint(1, 60))}]} for _ in range(n)]


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _reference_table(cfg, tok, role: str, packed: bool):
    """What the rows-in-memory pipeline (read all, mix, encode, pack, table) makes of the same config."""
    per_source, _, _ = load_rows(cfg, role)
    rows = split_rows(cfg, role, per_source)
    tokens = encode_rows(cfg, tok, rows, Stats())
    bins = pack_bins(tokens.lengths, cfg.data.max_length, cfg.train.seed) if packed else None
    return to_table(tokens, bins)


@pytest.mark.parametrize("packed", [True, False])
def test_mixed_sources_give_the_same_samples_as_the_in_memory_pipeline(tmp_path, tiny_model_dir, lmforge_cache,
                                                                       monkeypatch, packed):
    monkeypatch.setattr(bounded, "TASK_BYTES", 2000)  # many byte ranges per file: the workers' task boundaries
    monkeypatch.setattr(bounded, "TASK_ROWS", 7)
    a = _write(tmp_path / "a.jsonl", _chat_rows(300, 1))
    b = tmp_path / "b.json"
    b.write_text(json.dumps(_chat_rows(40, 2)))  # read here, in chunks of rows
    text = _write(tmp_path / "t.jsonl", [{"text": _say(random.Random(k), 150)} for k in range(20)])  # split rows
    cfg = load_config(None, tree={
        "method": "sft", "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": [{"path": a, "weight": 2.0}, {"path": str(b), "weight": 1.0}, {"path": text}],
                 "eval": [{"path": str(b)}, {"path": a}], "max_length": 64, "num_samples": 500},
        "train": {"output_dir": str(tmp_path / "out"), "seed": 3}})
    tok = load_tokenizer(cfg.model, tiny_model_dir)
    for role in ("train", "eval"):
        ds, stats, _ = prepare_split(cfg, tok, role, packed)
        ref = _reference_table(cfg, tok, role, packed)
        got = ds.data.table
        for column in ("input_ids", "labels", "seq_lens"):
            assert got.column(column).to_pylist() == ref.column(column).to_pylist(), (role, column)
        assert stats.samples == sum(map(len, ref.column("seq_lens").to_pylist()))
        assert stats.tokens == sum(map(len, ref.column("input_ids").to_pylist()))
        assert stats.loss_tokens == sum(sum(x != IGNORE for x in row) for row in ref.column("labels").to_pylist())


def test_bad_rows_in_later_byte_ranges_keep_their_line_numbers(tmp_path, tiny_model_dir, lmforge_cache,
                                                                monkeypatch, capsys):
    monkeypatch.setattr(bounded, "TASK_BYTES", 500)
    rows = [json.dumps(r) for r in _chat_rows(200, 4)]
    rows[120] = '{"messages": [{"role": "user", "content": "x"}'  # line 121: cut short
    rows[170] = json.dumps({"messages": [{"role": "user", "content": "only a question"}]})  # line 171
    rows.insert(60, "")  # a blank line shifts the later ones: now lines 122 and 172
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(rows) + "\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"method": "sft", "model": {"name_or_path": str(tiny_model_dir)},
                                   "data": {"train": [{"path": str(data)}], "max_length": 64},
                                   "train": {"output_dir": str(tmp_path / "out")}}))
    assert main(["prepare", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "2 bad row(s)" in err
    assert f"{data}:122: invalid JSON" in err
    assert f"{data}:172: " in err and "assistant" in err


@pytest.mark.parametrize("packed", [True, False])
def test_every_prepared_row_names_the_source_lines_of_its_samples(tmp_path, tiny_model_dir, lmforge_cache,
                                                                  monkeypatch, packed):
    """``origins.of_rows`` (what the NaN stop names) against the rows' own text: each sample of a prepared row,
    decoded, holds the tag written into the source line it names (mixed sources, byte ranges, a blank line)."""
    import re

    from lmforge.data.origins import of_rows

    monkeypatch.setattr(bounded, "TASK_BYTES", 500)  # many byte ranges per file
    monkeypatch.setattr(bounded, "TASK_ROWS", 7)
    rng = random.Random(5)

    def tagged(tag: str) -> dict:
        return {"messages": [{"role": "user", "content": f"{_say(rng, rng.randint(1, 12))} tag {tag} end"},
                             {"role": "assistant", "content": _say(rng, rng.randint(1, 20))}]}

    lines = [json.dumps(tagged(f"a{i}")) for i in range(60)]
    lines.insert(25, "")  # the rows after it are one line further down
    a = tmp_path / "a.jsonl"
    a.write_text("\n".join(lines) + "\n")
    b = tmp_path / "b.json"
    b.write_text(json.dumps([tagged(f"b{i}") for i in range(15)]))  # read here, in chunks of rows
    expected = {f"a{i}": f"{a}:{i + 1 + (i >= 25)}" for i in range(60)}  # tag -> the origin it must get
    expected |= {f"b{i}": f"{b}:row {i + 1}" for i in range(15)}
    cfg = load_config(None, tree={
        "method": "sft", "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": [{"path": str(a), "weight": 2.0}, {"path": str(b), "weight": 1.0}], "max_length": 96},
        "train": {"output_dir": str(tmp_path / "out"), "seed": 3}})
    tok = load_tokenizer(cfg.model, tiny_model_dir)
    ds, stats, _ = prepare_split(cfg, tok, "train", packed)
    assert stats.samples == 75 and (len(ds) < 75) == packed
    named = set()
    for r in range(len(ds)):
        ids, lens = ds[r]["input_ids"], ds[r]["seq_lens"]
        starts = np.cumsum([0] + lens[:-1])
        tags = [re.search(r"tag (\w+) end", tok.decode(ids[s:s + n]))[1] for s, n in zip(starts, lens)]
        assert of_rows(ds, [r]) == list(dict.fromkeys(expected[t] for t in tags)), r  # in order, each once
        named |= set(of_rows(ds, [r]))
    assert len(named) > 40 and {o.rsplit(":", 1)[0] for o in named} == {str(a), str(b)}
    assert of_rows(ds, [0, 1]) == list(dict.fromkeys(of_rows(ds, [0]) + of_rows(ds, [1])))


SCRIPT = """
import json, resource, sys
from lmforge.cli import main
code = main(["prepare", sys.argv[1]])
# VmHWM, not ru_maxrss: the latter keeps the high-water mark of the process that forked this one (pytest) across exec
hwm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM:"))
print("RESULT " + json.dumps({"code": code, "main": hwm,
                              "workers": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_rows(tmp_path, tiny_model_dir):
    """N and 4N rows (the same rows four times): four times the samples and tokens, and a peak RSS that grows by far
    less than the extra data. Holding the rows or their tokens in memory would add at least 16 bytes per extra token
    (ids and labels, int32, before and after the gather that orders them); measured: main 483 -> 548 MB for 315 MB
    of extra tokens at that rate."""
    rng = random.Random(0)
    base = [json.dumps({"text": _say(rng, rng.randint(80, 160))}) + "\n" for _ in range(24_000)]
    results = {}
    for scale in (1, 4):
        data = tmp_path / f"d{scale}.jsonl"
        data.write_text("".join(base) * scale)
        cfg = tmp_path / f"c{scale}.yaml"
        cfg.write_text(yaml.safe_dump({
            "method": "pretrain", "model": {"name_or_path": str(tiny_model_dir)},
            "data": {"train": [{"path": str(data)}], "max_length": 256, "cache_dir": str(tmp_path / f"cache{scale}")},
            "train": {"output_dir": str(tmp_path / "out")}}))
        proc = subprocess.run([sys.executable, "-c", SCRIPT, str(cfg)], capture_output=True, text=True, timeout=900)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        assert line, proc.stderr[-3000:]
        res = json.loads(line[7:])
        assert res["code"] == 0
        (cache,) = (tmp_path / f"cache{scale}").iterdir()
        res["stats"] = json.loads((cache / "stats.json").read_text())
        results[scale] = res
    print({k: (v["main"] // 1024, v["workers"] // 1024) for k, v in results.items()})
    one, four = results[1]["stats"], results[4]["stats"]
    assert four["rows"] == 4 * one["rows"] == 4 * 24_000
    assert four["samples"] == 4 * one["samples"] and four["tokens"] == 4 * one["tokens"]
    assert four["loss_tokens"] == 4 * one["loss_tokens"]
    assert four["processes"] == one["processes"] == 2
    extra_tokens_mb = 3 * one["tokens"] * 16 / 2**20  # what holding the extra tokens (ids + labels, int64) would cost
    for who in ("main", "workers"):
        grew_mb = (results[4][who] - results[1][who]) / 1024
        assert results[4][who] < 1.5 * results[1][who], (who, results)
        assert grew_mb < 0.4 * extra_tokens_mb, (who, grew_mb, extra_tokens_mb, results)


def test_a_second_prepare_in_the_same_process_uses_its_own_tokenizer(tmp_path, tiny_model_dir, lmforge_cache):
    """The in-process encoder is per call: a later prepare with another chat template must not reuse the first's."""
    from lmforge.data.tokenize import Encoder

    data = _write(tmp_path / "d.jsonl", _chat_rows(20, 5))
    cfg = load_config(None, tree={"method": "sft", "model": {"name_or_path": str(tiny_model_dir)},
                                  "data": {"train": [{"path": data}], "max_length": 1024, "packing": False},
                                  "train": {"output_dir": str(tmp_path / "out")}})
    first = load_tokenizer(cfg.model, tiny_model_dir)
    second = load_tokenizer(cfg.model, tiny_model_dir)
    second.chat_template = "{{ 'fox jumps ' }}" + second.chat_template  # a different rendering of every row
    rows = [json.loads(x)["messages"] for x in open(data)]
    for tok in (first, second):
        ds, _, _ = prepare_split(cfg, tok, "train", packed=False)
        want = [Encoder(tok).chat(m).input_ids for m in rows]
        assert ds.data.table.column("input_ids").to_pylist() == want
