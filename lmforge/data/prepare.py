"""From config to training-ready data: read, validate, mix, tokenise, mask, truncate, pack, cache.

``prepare_split`` is what ``lmforge prepare`` runs and what ``train`` reuses: the result is cached under a
fingerprint of the data files (path, size, mtime; or their content with ``data.cache_fingerprint: content``), the
tokenizer and the settings, so a second call stats the files and memory-maps the cached Arrow data
(``datasets.load_from_disk``) without reading its rows.

What a sample is depends on what the model trains on (``plan.layout``): a causal LM gets ids with aligned labels
(packed or not), an encoder-decoder (T5) gets encoder ids and the decoder's labels, an encoder-only model (BERT)
gets framed text blocks that its collator masks anew each step. The layers before (reading, mixing) and after
(caching, ``prepare``/``inspect``) are the same for all of them.

Many rows are tokenised in forked worker processes (``PARALLEL_MIN_ROWS``); bad rows are found before that,
while reading, so they keep their file:line. Samples travel as flat int32 numpy arrays, are packed on their
lengths alone, and become Arrow list columns without a Python list per sample.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import random
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lmforge.config import Config, DataSource
from lmforge.data.preference import PREFERENCE_METHODS
from lmforge.data.preference import VERSION as PREFERENCE_VERSION
from lmforge.data.prompts import VERSION as PROMPTS_VERSION
from lmforge.data.rows import RowChecks
from lmforge.data.sources import BadRow, Row, has_split, is_saved_dataset, iter_source_rows, resolve_files
from lmforge.data.tokenize import (
    COMPOSED, FAST, IGNORE, MASK_PATHS, PER_PREFIX, PIECEWISE, Encoder, chunk, encoder_decoder_pairs, text_blocks,
)
from lmforge.cache import cache_root
from lmforge.plan import CAUSAL, MLM, PROMPTS, SEQ2SEQ

CACHE_VERSION = "4"  # 3: causal splits built in bounded memory (data/bounded.py); 4: with their origins

_NOT_COMPOSED = "not-composed"  # Stats.masks key: why a source's fast rows were not composed
_NOT_PIECEWISE = "not-piecewise"  # Stats.masks key: why a source's composed rows were not tokenised by message


def _new_mask_counts() -> dict:
    """A source's chat rows per mask path (``tokenize.MASK_PATHS``) and why the faster paths were not taken."""
    return dict.fromkeys(MASK_PATHS, 0) | {"reason": "", _NOT_COMPOSED: "", _NOT_PIECEWISE: ""}


@dataclass
class Stats:
    rows: int = 0
    bad_rows: int = 0
    samples: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    truncated: int = 0
    prompt_truncated: int = 0  # preference methods: prompts cut to data.max_prompt_length
    split: int = 0
    dropped: dict = field(default_factory=dict)
    packed_rows: int = 0
    formats: dict = field(default_factory=dict)
    # chat source -> {fast: rows, per-prefix: rows, composed: rows (also in fast), piecewise: rows (also in composed),
    #                 reason: why not fast, not-composed: why rows were not composed, not-piecewise: why composed rows
    #                 were not tokenised by message} (``_new_mask_counts``)
    masks: dict = field(default_factory=dict)
    processes: int = 1  # tokenising processes
    layout: str = "causal"  # what a sample is: see plan.layout

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def lines(self) -> list[str]:
        out = [f"rows read: {self.rows} ({', '.join(f'{k}: {v}' for k, v in self.formats.items())})"]
        if self.bad_rows:
            out.append(f"bad rows skipped: {self.bad_rows}")
        if self.layout == SEQ2SEQ:
            out.append(f"samples (input/target pairs): {self.samples}  input tokens: {self.tokens - self.loss_tokens}"
                       f"  target tokens (all carry loss): {self.loss_tokens}")
            out.append(f"inputs or targets truncated to max_length: {self.truncated}")
        elif self.layout == MLM:
            out.append(f"samples (text blocks): {self.samples}  tokens: {self.tokens}  maskable tokens: "
                       f"{self.loss_tokens} (data.mlm_probability of them are masked, drawn anew each step)")
        else:
            out.append(f"samples: {self.samples}  tokens: {self.tokens}  loss tokens: {self.loss_tokens}")
            out.append(f"truncated to max_length: {self.truncated}")
        if self.prompt_truncated:
            out.append(f"prompts truncated to max_prompt_length: {self.prompt_truncated}")
        if self.split:
            out.append(f"long documents split into max_length pieces: {self.split}")
        for reason, n in self.dropped.items():
            out.append(f"dropped ({reason}): {n}")
        if self.packed_rows:
            out.append(f"packed rows: {self.packed_rows}")
        for name, m in self.masks.items():
            fast, slow, composed = m.get(FAST, 0), m.get(PER_PREFIX, 0), m.get(COMPOSED, 0)
            if not slow:
                line = f"chat masks, {name}: fast path (one template rendering per conversation) for all {fast} rows"
            elif not fast:
                line = f"chat masks, {name}: per-prefix rendering for all {slow} rows (fast path off: {m.get('reason')})"
            else:
                why = m.get("reason") or "the turns could not be located unambiguously in one rendering"
                line = f"chat masks, {name}: fast path for {fast} rows, per-prefix rendering for {slow} ({why})"
            if composed:
                line += f"; {composed} of the fast rows composed from the template's layout without rendering"
                piecewise = m.get(PIECEWISE, 0)
                if piecewise:
                    line += f", {piecewise} of them tokenised message by message (template text tokenised once)"
                elif m.get(_NOT_PIECEWISE):
                    line += f", none tokenised message by message ({m[_NOT_PIECEWISE]})"
            elif fast and m.get(_NOT_COMPOSED):
                line += f"; none composed ({m[_NOT_COMPOSED]})"
            out.append(line)
        if self.processes > 1:
            out.append(f"tokenised in {self.processes} processes")
        return out


# ----------------------------------------------------------------------------------------------- rows
def sources_for(cfg: Config, role: str) -> list[DataSource]:
    """Sources of a role; with no eval sources, a train directory's val split is used if it has one."""
    if role == "train" or cfg.data.eval:
        return getattr(cfg.data, role)
    return [DataSource(path=s.path, format=s.format, input_format=s.input_format, output_format=s.output_format)
            for s in cfg.data.train if s.path and has_split(s.path, "eval") and has_split(s.path, "train")]


def load_rows(cfg: Config, role: str) -> tuple[list[tuple[str, list[Row]]], list[BadRow], Stats]:
    """Read and check every source of a role (rows.RowChecks). Bad rows stop here (exit 2) unless on_bad_rows is
    skip; returns the good rows per source with their format, every bad row in file order, and the counts."""
    checks = RowChecks(cfg, role)
    per_source: list[tuple[str, list[Row]]] = []
    bad_all: list[BadRow] = []
    for src in sources_for(cfg, role):
        rows = list(iter_source_rows(src, role))
        check = checks.add_source(src, rows)
        checked = [check.check(r) for r in rows]
        good = [r for r in checked if isinstance(r, Row)]
        bad = [r for r in checked if isinstance(r, BadRow)]
        checks.count(check.index, len(rows), len(good))
        checks.add_bad(bad)
        bad_all += bad
        per_source.append((check.fmt, good))
    return per_source, bad_all, Stats(**checks.finish())


def mix_indices(counts: list[int], weights: list[float], seed: int, n: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Draw rows from several sources in proportion to their weights, deterministically under the seed: returns
    (source, row within that source) of each draw, as two arrays.

    Each draw picks a source with probability weight/sum(weights); within a source rows come in a seeded
    permutation, cycling (oversampling) when a source is drawn more often than it has rows. ``n`` draws
    (data.num_samples), or by default every row of every source once.
    """
    rng = random.Random(seed)
    total = n if n is not None else sum(counts)
    picks = np.asarray(rng.choices(range(len(counts)), weights=weights, k=total), dtype=np.int64)
    rows = np.zeros(total, dtype=np.int64)
    for s, count in enumerate(counts):
        order = list(range(count))
        rng.shuffle(order)
        at = np.flatnonzero(picks == s)
        if count:
            rows[at] = np.asarray(order, dtype=np.int64)[np.arange(len(at)) % count]
    keep = np.asarray(counts, dtype=np.int64)[picks] > 0  # a draw of an empty source gives nothing
    return picks[keep], rows[keep]


def mix(per_source: list[tuple[str, list[Row]]], weights: list[float], seed: int, n: int | None) -> list[tuple[str, Row]]:
    """``mix_indices`` on rows in memory; a single source without ``n`` keeps file order."""
    if len(per_source) == 1 and n is None:
        fmt, rows = per_source[0]
        return [(fmt, r) for r in rows]
    picks, rows = mix_indices([len(r) for _, r in per_source], weights, seed, n)
    return [(per_source[s][0], per_source[s][1][i]) for s, i in zip(picks.tolist(), rows.tolist())]


def concat(per_source: list[tuple[str, list[Row]]]) -> list[tuple[str, Row]]:
    """Eval rows: every row of every source once, sources in config order, rows in file order (never resampled)."""
    return [(fmt, r) for fmt, rows in per_source for r in rows]


def split_rows(cfg: Config, role: str, per_source: list[tuple[str, list[Row]]]) -> list[tuple[str, Row]]:
    """The rows a split trains or evaluates on: training sources mixed by weight (``data.num_samples`` draws),
    eval sources concatenated."""
    if role == "eval":
        return concat(per_source)
    weights = [1.0 if s.weight is None else s.weight for s in sources_for(cfg, role)]
    return mix(per_source, weights, cfg.train.seed, cfg.data.num_samples)


# ----------------------------------------------------------------------------------------------- layouts
# ----------------------------------------------------------------------------------------------- tokens
PARALLEL_MIN_ROWS = 20_000  # fewer rows are tokenised in this process: starting workers would cost more
_BATCH = 1000  # rows per call of the fast tokenizer


@dataclass
class Tokens:
    """Every sample of a split, flat: sample k is ``ids[starts[k]:starts[k] + lengths[k]]`` (and its labels)."""

    ids: np.ndarray  # (N,) int32
    labels: np.ndarray  # (N,) int32
    lengths: np.ndarray  # (samples,) int64

    @property
    def starts(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)


@dataclass
class RowCounts:
    """Per row of a chunk (in order): samples it gave, whether it was truncated or split, pieces dropped; and per
    sample, its loss-carrying tokens. What a mixed selection of rows needs to recount its statistics."""

    samples: np.ndarray  # (rows,) int32
    truncated: np.ndarray  # (rows,) int8
    split: np.ndarray  # (rows,) int8
    dropped: np.ndarray  # (rows,) int32
    loss: np.ndarray  # (samples,) int32


DROP_NO_LOSS = "no loss-carrying tokens within max_length"


def _encode_chunk(cfg: Config, enc: Encoder, rows: list[tuple[str, Row]]) -> tuple[Tokens, dict, dict, RowCounts]:
    """Tokenise, truncate (or split) and count one chunk of rows; returns its tokens, counts, mask paths and
    per-row counts."""
    pretraining = cfg.method in ("pretrain", "mlm")
    max_len = cfg.data.max_length
    counts = {"tokens": 0, "loss_tokens": 0, "truncated": 0, "split": 0, "dropped": {}}
    masks: dict[int, dict] = {}
    ids_out, labels_out, lengths, loss = [], [], [], []
    per_row = np.zeros((4, len(rows)), dtype=np.int32)  # samples, truncated, split, dropped
    for lo in range(0, len(rows), _BATCH):
        batch = rows[lo:lo + _BATCH]
        encoded = [None] * len(batch)
        for source in sorted({r.source for _, r in batch}):  # per source, to report each source's mask path
            idx = [k for k, (_, r) in enumerate(batch) if r.source == source]
            before = dict(enc.mask_counts)
            for k, e in zip(idx, enc.encode_batch([(batch[k][1].data, batch[k][0]) for k in idx])):
                encoded[k] = e
            m = masks.setdefault(source, _new_mask_counts())
            for path in MASK_PATHS:
                m[path] += enc.mask_counts[path] - before[path]
            if m[FAST] or m[PER_PREFIX]:
                m["reason"] = enc.chat_path()[1] or m["reason"]
            if m[FAST] and not m[COMPOSED]:
                m[_NOT_COMPOSED] = enc.composition()[1] or m[_NOT_COMPOSED]
            if m[COMPOSED] and not m[PIECEWISE]:
                m[_NOT_PIECEWISE] = enc.piecewise()[1] or m[_NOT_PIECEWISE]
        for j, ((fmt, _), e) in enumerate(zip(batch, encoded), start=lo):
            if pretraining or fmt == "text":
                pieces = chunk(e, max_len)
                per_row[2, j] = len(pieces) > 1
            else:
                if len(e.input_ids) > max_len:
                    per_row[1, j] = 1
                    e.input_ids, e.labels = e.input_ids[:max_len], e.labels[:max_len]
                pieces = [e]
            for p in pieces:
                n_loss = len(p.labels) - p.labels.count(IGNORE)
                if n_loss == 0:
                    per_row[3, j] += 1
                    continue
                ids_out.append(p.input_ids)
                labels_out.append(p.labels)
                lengths.append(len(p.input_ids))
                loss.append(n_loss)
                per_row[0, j] += 1
    total = sum(lengths)
    counts.update(tokens=total, loss_tokens=sum(loss), truncated=int(per_row[1].sum()), split=int(per_row[2].sum()))
    if per_row[3].any():
        counts["dropped"][DROP_NO_LOSS] = int(per_row[3].sum())
    flat = lambda parts: np.fromiter(itertools.chain.from_iterable(parts), dtype=np.int32, count=total)  # noqa: E731
    row_counts = RowCounts(per_row[0], per_row[1].astype(np.int8), per_row[2].astype(np.int8), per_row[3],
                           np.asarray(loss, dtype=np.int32))
    return Tokens(flat(ids_out), flat(labels_out), np.asarray(lengths, dtype=np.int64)), counts, masks, row_counts


# Set before forking the tokenising workers, which inherit it instead of receiving the rows by pickle.
_JOB: tuple | None = None
_WORKER_ENCODER: Encoder | None = None


def _encode_range(bounds: tuple[int, int]):
    global _WORKER_ENCODER
    cfg, tokenizer, rows = _JOB
    if _WORKER_ENCODER is None:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already; no threads inside them
        _WORKER_ENCODER = Encoder(tokenizer, apply_chat_template=cfg.data.apply_chat_template)
    return _encode_chunk(cfg, _WORKER_ENCODER, rows[bounds[0]:bounds[1]])


def tokenising_processes(n_rows: int) -> int:
    if n_rows < PARALLEL_MIN_ROWS:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, n_rows // (PARALLEL_MIN_ROWS // 2)))


def add_counts(stats: Stats, counts: dict, masks: dict, source_names: list[str] | None) -> None:
    """Add one chunk's counts and mask paths (``_encode_chunk``) to ``stats``."""
    stats.tokens += counts["tokens"]
    stats.loss_tokens += counts["loss_tokens"]
    stats.truncated += counts["truncated"]
    stats.split += counts["split"]
    for reason, n in counts["dropped"].items():
        stats.dropped[reason] = stats.dropped.get(reason, 0) + n
    for source, m in masks.items():
        if not m[FAST] and not m[PER_PREFIX]:
            continue
        name = source_names[source] if source_names else f"source {source}"
        acc = stats.masks.setdefault(name, _new_mask_counts())
        for key in MASK_PATHS:
            acc[key] += m[key]
        for key in ("reason", _NOT_COMPOSED, _NOT_PIECEWISE):
            acc[key] = acc[key] or m[key]


def encode_rows(cfg: Config, tokenizer, rows: list[tuple[str, Row]], stats: Stats,
                source_names: list[str] | None = None) -> Tokens:
    """Tokenise and mask every row (in several processes when there are many), filling ``stats``."""
    global _JOB
    procs = tokenising_processes(len(rows))
    size = max(_BATCH, min(20 * _BATCH, -(-len(rows) // (procs * 8))))
    bounds = [(lo, min(lo + size, len(rows))) for lo in range(0, len(rows), size)]
    if procs == 1:
        enc = Encoder(tokenizer, apply_chat_template=cfg.data.apply_chat_template)
        results = [_encode_chunk(cfg, enc, rows[a:b]) for a, b in bounds]
    else:
        _JOB = (cfg, tokenizer, rows)
        try:  # fork: the workers share the parsed rows and the tokenizer with this process
            with multiprocessing.get_context("fork").Pool(procs) as pool:
                results = list(pool.imap(_encode_range, bounds))
        finally:
            _JOB = None
    stats.processes = procs
    for _, counts, masks, _ in results:
        add_counts(stats, counts, masks, source_names)
    parts = [t for t, _, _, _ in results]
    tokens = Tokens(np.concatenate([t.ids for t in parts]) if parts else np.zeros(0, np.int32),
                    np.concatenate([t.labels for t in parts]) if parts else np.zeros(0, np.int32),
                    np.concatenate([t.lengths for t in parts]) if parts else np.zeros(0, np.int64))
    stats.samples = len(tokens.lengths)
    return tokens


def encode_seq2seq_rows(cfg: Config, tokenizer, rows: list[tuple[str, Row]], stats: Stats):
    """Encoder-decoder samples as an Arrow table: ``input_ids`` (encoder) and ``labels`` (decoder), one row each."""
    import pyarrow as pa

    pairs = encoder_decoder_pairs(tokenizer, [(r.data["prompt"], r.data["completion"]) for _, r in rows],
                                  cfg.data.max_length)
    stats.samples = len(pairs)
    stats.loss_tokens = sum(len(t) for _, t, _ in pairs)
    stats.tokens = stats.loss_tokens + sum(len(i) for i, _, _ in pairs)
    stats.truncated = sum(cut for _, _, cut in pairs)
    ids = pa.list_(pa.int32())
    return pa.table({"input_ids": pa.array([i for i, _, _ in pairs], type=ids),
                     "labels": pa.array([t for _, t, _ in pairs], type=ids)})


def encode_mlm_rows(cfg: Config, tokenizer, rows: list[tuple[str, Row]], stats: Stats) -> Tokens:
    """Masked-LM samples: every text cut into framed blocks of at most max_length tokens (tokenize.text_blocks)."""
    per_text = text_blocks(tokenizer, [r.data["text"] for _, r in rows], cfg.data.max_length)
    blocks = [b for bs in per_text for b in bs]
    stats.split = sum(len(bs) > 1 for bs in per_text)
    stats.samples = len(blocks)
    stats.tokens = sum(len(b.input_ids) for b in blocks)
    stats.loss_tokens = sum(len(b.labels) - b.labels.count(IGNORE) for b in blocks)
    def flat(parts):
        return np.fromiter(itertools.chain.from_iterable(parts), dtype=np.int32, count=stats.tokens)

    return Tokens(flat(b.input_ids for b in blocks), flat(b.labels for b in blocks),
                  np.fromiter((len(b.input_ids) for b in blocks), dtype=np.int64, count=len(blocks)))


def _list_array(offsets: np.ndarray, values: np.ndarray):
    import pyarrow as pa

    if offsets[-1] < 2**31:
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))
    return pa.LargeListArray.from_arrays(pa.array(offsets.astype(np.int64)), pa.array(values))


def spans(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(s, s + c)`` for every (s, c): a gather index of many slices at once."""
    ends = np.cumsum(counts)
    return np.repeat(starts - (ends - counts), counts) + np.arange(int(ends[-1]) if len(ends) else 0, dtype=np.int64)


def to_table(tokens: Tokens, bins: list[list[int]] | None):
    """Arrow rows input_ids, labels, seq_lens: one per bin of samples (packed), or one per sample."""
    import pyarrow as pa

    n = len(tokens.lengths)
    if bins is None:
        order, per_row = np.arange(n, dtype=np.int64), np.ones(n, dtype=np.int64)
    else:
        order = np.fromiter(itertools.chain.from_iterable(bins), dtype=np.int64, count=n)
        per_row = np.fromiter((len(b) for b in bins), dtype=np.int64, count=len(bins))
    lens = tokens.lengths[order]
    out_ends = np.cumsum(lens)
    gather = spans(tokens.starts[order], lens)  # for each output position, where it sits in the flat arrays
    sample_bounds = np.concatenate([[0], np.cumsum(per_row)])
    token_bounds = np.concatenate([[0], out_ends])[sample_bounds]
    return pa.table({
        "input_ids": _list_array(token_bounds, tokens.ids[gather]),
        "labels": _list_array(token_bounds, tokens.labels[gather]),
        "seq_lens": _list_array(sample_bounds, lens),
    })


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(tokenizer.get_vocab())).encode())
    h.update(str(tokenizer.chat_template).encode())
    h.update(str(tokenizer.special_tokens_map).encode())
    return h.hexdigest()


def _source_files(src: DataSource, role: str) -> list[Path]:
    if src.loader:
        return []  # a loader's rows have no files to fingerprint: see fingerprint()
    p = Path(src.path).expanduser()
    if is_saved_dataset(p):
        return sorted(f for f in p.rglob("*") if f.is_file())
    return resolve_files(src, role)


def _file_identity(f: Path, how: str) -> list:
    """A data file as the cache key sees it (``data.cache_fingerprint``): path, size and mtime (``stat``), or path,
    size and a SHA-256 of its bytes (``content``: an edit that keeps size and mtime, e.g. a copy with ``cp -p`` or
    a tool that restores times, still rebuilds)."""
    st = f.stat()
    if how == "content":
        with open(f, "rb") as fh:
            return [str(f.resolve()), st.st_size, hashlib.file_digest(fh, "sha256").hexdigest()]
    return [str(f.resolve()), st.st_size, st.st_mtime_ns]


def fingerprint(cfg: Config, tokenizer, role: str, packed: bool, layout: str = CAUSAL) -> str:
    files = []
    for src in sources_for(cfg, role):
        for f in _source_files(src, role):
            files.append(_file_identity(f, cfg.data.cache_fingerprint))
        files.append(asdict(src))
        if src.loader:  # a custom loader may return different rows each call: never reuse a cache for it
            files.append(uuid.uuid4().hex)
    d = cfg.data
    key = {
        "v": CACHE_VERSION, "role": role, "method": cfg.method, "files": files, "tok": tokenizer_fingerprint(tokenizer),
        "max_length": d.max_length, "packed": packed, "chat": d.apply_chat_template, "bad": d.on_bad_rows,
        "n": d.num_samples if role == "train" else None, "seed": cfg.train.seed,
    }
    if layout in (SEQ2SEQ, MLM):  # (absent for the others, whose caches stay valid)
        key["layout"] = layout
    if cfg.method in PREFERENCE_METHODS:
        key.update(max_prompt_length=d.max_prompt_length, preference=PREFERENCE_VERSION)
    if layout == PROMPTS:
        key.update(layout=layout, max_prompt_length=d.max_prompt_length, prompts=PROMPTS_VERSION)
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cache_dir(cfg: Config) -> Path:
    return Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else cache_root() / "data"


def training_texts_key(cfg: Config) -> str:
    """What ``training_texts`` reads, as a key: every training source's settings and its files' identities."""
    parts = []
    for src in sources_for(cfg, "train"):
        parts.append(asdict(src))
        for f in _source_files(src, "train"):
            parts.append(_file_identity(f, cfg.data.cache_fingerprint))
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def training_texts(cfg: Config):
    """Texts for training a tokenizer from scratch: every string in the validated training rows."""
    per_source, _, _ = load_rows(cfg, "train")
    for _, rows in per_source:
        for r in rows:
            for v in r.data.values():
                if isinstance(v, str):
                    yield v
                elif isinstance(v, list):
                    yield from (m["content"] for m in v if isinstance(m, dict))
