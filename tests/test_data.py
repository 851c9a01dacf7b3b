"""Data: every bad-row kind is reported as file:line with exit 2; skip mode; formats; sources; mixing."""

import json

import pytest
from transformers import AutoTokenizer

from conftest import base_config, chat_rows, write_config, write_jsonl
from lmforge.cli import main
from lmforge.config import DataSource, load_config
from lmforge.data.formats import detect_format
from lmforge.data.prepare import load_rows, mix
from lmforge.data.split import prepare_split
from lmforge.data.sources import Row
from lmforge.data.streaming import PackedStream
from lmforge.errors import DataError
from lmforge.models import finalize_tokenizer

GOOD = {"prompt": "a", "completion": "b"}
BAD_ROWS = [
    ("{not json", "invalid JSON"),
    ('["a", "list"]', "must be a JSON object"),
    ({"prompt": "only a prompt"}, "missing key 'completion'"),
    ({"prompt": "p", "completion": 5}, "'completion' must be a string"),
    ({"prompt": "p", "completion": "   "}, "'completion' is empty"),
]


@pytest.mark.parametrize("bad,reason", BAD_ROWS, ids=[r for _, r in BAD_ROWS])
def test_bad_prompt_completion_row(tmp_path, tiny_model_dir, lmforge_cache, capsys, bad, reason):
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, bad, GOOD])
    cfg = write_config(tmp_path / "c.yaml", base_config(tiny_model_dir, data, tmp_path / "out"))
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"{data}:3" in err and reason in err
    assert not (tmp_path / "out" / "checkpoint-2").exists()  # stopped before training


@pytest.mark.parametrize("bad,reason", [
    ({"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "unknown role 'wizard'"),
    ({"messages": "hello"}, "must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
], ids=["unknown-role", "not-a-list", "no-assistant"])
def test_bad_chat_row(tmp_path, tiny_model_dir, lmforge_cache, capsys, bad, reason):
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(2) + [bad])
    cfg = write_config(tmp_path / "c.yaml", base_config(tiny_model_dir, data, tmp_path / "out"))
    assert main(["prepare", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"{data}:3" in err and reason in err


def test_preference_row_missing_side(tmp_path, tiny_model_dir, lmforge_cache, capsys):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a"}])
    tree = base_config(tiny_model_dir, data, tmp_path / "out", method="dpo")
    cfg = load_config(None, tree=tree)
    with pytest.raises(Exception) as e:
        load_rows(cfg, "train")
    assert f"{data}:2" in str(e.value) and "rejected" in str(e.value)


def test_empty_source(tmp_path, tiny_model_dir, lmforge_cache, capsys):
    data = tmp_path / "empty.jsonl"
    data.write_text("\n")
    cfg = write_config(tmp_path / "c.yaml", base_config(tiny_model_dir, data, tmp_path / "out"))
    assert main(["prepare", str(cfg)]) == 2
    assert "empty" in capsys.readouterr().err


def test_skip_bad_rows_counts_them(tmp_path, tiny_model_dir, lmforge_cache, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD, "{oops", GOOD, {"prompt": 1, "completion": "x"}])
    tree = base_config(tiny_model_dir, data, tmp_path / "out", data={"on_bad_rows": "skip"})
    assert main(["prepare", str(write_config(tmp_path / "c.yaml", tree))]) == 0
    out = capsys.readouterr().out
    assert "bad rows skipped: 2" in out


def test_formats_and_aliases_detected():
    assert detect_format({"text"}) == "text"
    assert detect_format({"title", "content"}) == "text"
    assert detect_format({"input", "output"}) == "prompt_completion"
    assert detect_format({"prompt", "generation"}) == "prompt_completion"
    assert detect_format({"instruction", "input", "output"}) == "prompt_completion"
    assert detect_format({"conversations"}) == "chat"
    assert detect_format({"prompt", "chosen", "rejected"}) == "preference"


def test_templates_alpaca_sharegpt_and_sources(tmp_path, tiny_model_dir, lmforge_cache):
    d = tmp_path / "dir"
    write_jsonl(d / "a.jsonl", [{"instruction": "say hi", "input": "to bob", "output": "hi bob"}])
    write_jsonl(d / "b.jsonl", [{"input": "x", "target": "y"}])
    (d / "c.json").write_text(json.dumps([{"input": "u", "output": "v"}]))
    tree = base_config(tiny_model_dir, d, tmp_path / "out")
    tree["data"]["train"] = [
        {"path": str(d / "a.jsonl")},
        {"path": str(d / "*.json"), "input_format": "Q: __input__\nA:", "output_format": " __output__"},
        {"path": str(d / "b.jsonl")},
    ]
    cfg = load_config(None, tree=tree)
    per_source, _, _ = load_rows(cfg, "train")
    assert per_source[0][1][0].data == {"prompt": "say hi\n\nto bob", "completion": "hi bob"}
    assert per_source[1][1][0].data == {"prompt": "Q: u\nA:", "completion": " v"}
    assert per_source[2][1][0].data == {"prompt": "x", "completion": "y"}
    sg = write_jsonl(tmp_path / "sg.jsonl", [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}])
    cfg = load_config(None, tree=base_config(tiny_model_dir, sg, tmp_path / "o2"))
    rows = load_rows(cfg, "train")[0][0][1]
    assert rows[0].data["messages"] == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def test_train_val_layout_and_cache_reuse(tmp_path, tiny_model_dir, lmforge_cache):
    d = tmp_path / "ds"
    write_jsonl(d / "train.jsonl", chat_rows(6))
    write_jsonl(d / "val.jsonl", chat_rows(2, seed=9))
    cfg = load_config(None, tree=base_config(tiny_model_dir, d, tmp_path / "out"))
    tok = finalize_tokenizer(AutoTokenizer.from_pretrained(tiny_model_dir))
    train, stats, path = prepare_split(cfg, tok, "train", packed=True)
    evals, estats, _ = prepare_split(cfg, tok, "eval", packed=True)
    assert stats.rows == 6 and estats.rows == 2
    again, _, path2 = prepare_split(cfg, tok, "train", packed=True)
    assert path2 == path and again["input_ids"] == train["input_ids"]
    (path / "marker").write_text("x")  # a cache hit does not rebuild the directory
    prepare_split(cfg, tok, "train", packed=True)
    assert (path / "marker").exists()


def test_custom_loader(tmp_path, tiny_model_dir, lmforge_cache, monkeypatch):
    mod = tmp_path / "my_rows.py"
    mod.write_text("def rows():\n    return [{'text': 'alpha beta gamma'}, {'text': 'delta'}]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    tree = base_config(tiny_model_dir, tmp_path, tmp_path / "out", method="pretrain")
    tree["data"]["train"] = [{"loader": "my_rows:rows"}]
    per_source, _, _ = load_rows(load_config(None, tree=tree), "train")
    assert [r.data["text"] for r in per_source[0][1]] == ["alpha beta gamma", "delta"]


def test_mixing_follows_weights_within_sampling_error():
    a = [Row({"text": f"a{i}"}, f"a:{i}") for i in range(100)]
    b = [Row({"text": f"b{i}"}, f"b:{i}") for i in range(100)]
    n = 4000
    out = mix([("text", a), ("text", b)], [3.0, 1.0], seed=1, n=n)
    share = sum(r.data["text"].startswith("a") for _, r in out) / n
    sigma = (0.75 * 0.25 / n) ** 0.5
    assert abs(share - 0.75) < 4 * sigma
    assert out == mix([("text", a), ("text", b)], [3.0, 1.0], seed=1, n=n)  # deterministic under the seed
    assert out != mix([("text", a), ("text", b)], [3.0, 1.0], seed=2, n=n)


def test_inspect_marks_loss_tokens(tmp_path, tiny_model_dir, lmforge_cache, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "name the fox:", "completion": " the quick fox"}])
    cfg = write_config(tmp_path / "c.yaml", base_config(tiny_model_dir, data, tmp_path / "out"))
    assert main(["inspect", str(cfg), "--n", "1"]) == 0
    out = capsys.readouterr().out
    assert "[[ the quick fox<|endoftext|>]]" in out and "name the fox:" in out


def test_source_options_are_validated():
    with pytest.raises(Exception) as e:
        load_config(None, tree={"model": {"name_or_path": "x"}, "data": {"train": [{"path": "a", "wieght": 2}]}})
    assert "data.train[0].wieght" in str(e.value) or "wieght" in str(e.value)
    assert DataSource().weight is None  # a training source without a weight mixes with weight 1


def _numbered(path, tag, n):
    return write_jsonl(path, [{"prompt": f"{tag} {i}:", "completion": f" {tag} row {i}"} for i in range(n)])


def test_eval_sources_are_concatenated_in_order_never_resampled(tmp_path, tiny_model_dir, lmforge_cache):
    """Every eval row once, sources in config order, rows in file order, whatever data.num_samples says (it
    draws training rows); the training split of the same config is still mixed."""
    a, b = _numbered(tmp_path / "a.jsonl", "alpha", 5), _numbered(tmp_path / "b.jsonl", "beta", 3)
    tree = base_config(tiny_model_dir, a, tmp_path / "out", data={"num_samples": 20})
    tree["data"]["train"] = [{"path": str(a), "weight": 3.0}, {"path": str(b)}]
    tree["data"]["eval"] = [{"path": str(b)}, {"path": str(a)}]
    cfg = load_config(None, tree=tree)
    tok = finalize_tokenizer(AutoTokenizer.from_pretrained(tiny_model_dir))
    evals, stats, _ = prepare_split(cfg, tok, "eval", packed=False)
    prompts = [tok.decode([i for i, lab in zip(r["input_ids"], r["labels"]) if lab == -100]).strip() for r in evals]
    assert prompts == [f"beta {i}:" for i in range(3)] + [f"alpha {i}:" for i in range(5)]
    assert stats.samples == 8
    assert len(prepare_split(cfg, tok, "train", packed=False)[0]) == 20


def test_weight_on_an_eval_source_is_refused(tmp_path, tiny_model_dir, lmforge_cache, capsys):
    a = _numbered(tmp_path / "a.jsonl", "alpha", 2)
    tree = base_config(tiny_model_dir, a, tmp_path / "out")
    tree["data"]["eval"] = [{"path": str(a), "weight": 2.0}]
    assert main(["prepare", str(write_config(tmp_path / "c.yaml", tree))]) == 2
    err = capsys.readouterr().err
    assert "data.eval[0].weight" in err and "once" in err and "Traceback" not in err


@pytest.mark.parametrize("how", ["stat", "content"])
def test_cache_fingerprint_stat_misses_a_same_size_same_mtime_edit_content_catches_it(
        tmp_path, tiny_model_dir, lmforge_cache, how):
    """An edit that keeps the file's size and mtime: data.cache_fingerprint stat reuses the stale cache (the known
    limit of the default), content rebuilds with the new rows."""
    import os

    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "name the fox:", "completion": " the quick fox"}])
    tree = base_config(tiny_model_dir, data, tmp_path / "out", data={"cache_fingerprint": how})
    cfg = load_config(None, tree=tree)
    tok = finalize_tokenizer(AutoTokenizer.from_pretrained(tiny_model_dir))
    before, _, path = prepare_split(cfg, tok, "train", packed=False)
    st = data.stat()
    data.write_text(data.read_text().replace("quick fox", "lazy dogs"))  # same length
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert data.stat().st_size == st.st_size and data.stat().st_mtime_ns == st.st_mtime_ns
    after, _, path2 = prepare_split(cfg, tok, "train", packed=False)
    text = tok.decode(after[0]["input_ids"])
    if how == "stat":
        assert path2 == path and "quick fox" in text
    else:
        assert path2 != path and "lazy dogs" in text and "quick fox" in tok.decode(before[0]["input_ids"])


# ----------------------------------------------------------------------------- one row check, three readers
READERS = ("in-memory", "bounded", "stream")  # prepare.load_rows, bounded.build_causal, streaming.PackedStream


def _read(reader: str, tree: dict, tok) -> tuple[int, int]:
    """The training rows of ``tree`` read as ``reader`` reads them: (rows read, bad rows counted), or its DataError.
    A stream reads on ahead of what it hands out: its counts are those of the rows read so far."""
    if reader == "stream":
        tree = {**tree, "data": {**tree["data"], "streaming": True, "shuffle_buffer": 1}}
    cfg = load_config(None, tree=tree)
    if reader == "in-memory":
        stats = load_rows(cfg, "train")[2]
        return stats.rows, stats.bad_rows
    if reader == "bounded":
        stats = prepare_split(cfg, tok, "train", packed=False)[1]
        return stats.rows, stats.bad_rows
    stream = PackedStream(cfg, tok, packed=False)
    assert all(r["input_ids"] for r in stream.take(4))
    counts = stream.state_dict()["counts"]
    return counts["rows"], counts["bad_rows"]


@pytest.mark.parametrize("reader", READERS)
def test_each_reader_checks_rows_alike(tmp_path, tiny_model_dir, lmforge_cache, reader):
    """The row checks (data/rows.py) as each reader of rows meets them: every kind of bad row named by file:line with
    its reason; bad rows skipped and counted with data.on_bad_rows: skip; rows the method cannot train, a format
    that cannot be told (named by the row its keys come from) and an empty source (format detected or set) refused."""
    tok = finalize_tokenizer(AutoTokenizer.from_pretrained(tiny_model_dir))
    files = iter(range(100))

    def read(rows, fmt: str = "auto", method: str = "sft", on_bad_rows: str = "error"):
        path = write_jsonl(tmp_path / f"d{next(files)}.jsonl", rows)
        tree = base_config(tiny_model_dir, path, tmp_path / "out", method=method,
                           data={"train": [{"path": str(path), "format": fmt}], "on_bad_rows": on_bad_rows})
        return path, lambda: _read(reader, tree, tok)

    def error(rows, **kw):
        path, go = read(rows, **kw)
        with pytest.raises(DataError) as e:
            go()
        return path, str(e.value)

    for bad, reason in BAD_ROWS:
        path, err = error([GOOD, bad, GOOD])
        assert f"{path}:2: " in err and reason in err, (bad, err)
    path, go = read([GOOD, "{oops", GOOD, {"prompt": 1, "completion": "x"}], on_bad_rows="skip")
    rows, bad = go()
    if reader == "stream":  # every other row read is bad
        assert rows >= 4 and bad == rows // 2
    else:
        assert (rows, bad) == (4, 2)
    path, err = error([{"prompt": "p", "chosen": "a", "rejected": "b"}])
    assert f"{path}: preference rows cannot train method 'sft' (expected prompt_completion or chat or text)" in err
    path, err = error(["{oops", {"foo": 1}, GOOD])
    assert f"{path}:2: cannot tell the data format from the keys ['foo']" in err
    for fmt in ("auto", "prompt_completion"):
        path, err = error([], fmt=fmt)
        assert err == f"{path}: the source is empty"
