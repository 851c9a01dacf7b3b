"""Build (or load from the cache) one split of the training data: the data layer's entry point.

``prepare_split`` picks the builder for the plan's sample layout (``plan.layout``): causal-LM rows go through the
bounded-memory pipeline (``bounded.py``: workers, spilled tokens, packing), preference pairs, encoder-decoder
pairs and masked-LM blocks are built in memory from ``prepare.py``'s rows and encoders. The result is cached
under a key of everything it depends on (``prepare.fingerprint``), written to a temporary directory and renamed
into place, so a crash never leaves a half-built cache that a later run would read.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from lmforge.config import Config
from lmforge.data.bounded import build_causal
from lmforge.data.prepare import (
    Stats, cache_dir, encode_mlm_rows, encode_seq2seq_rows, fingerprint, load_rows, sources_for, split_rows, to_table,
)
from lmforge.data.preference import encode_preference_rows
from lmforge.data.prompts import encode_prompt_rows
from lmforge.distributed.ranks import main_process_first
from lmforge.errors import DataError
from lmforge.plan import CAUSAL, PAIRS, PROMPTS, SEQ2SEQ, layout as sample_layout


@main_process_first  # with several processes: built once per node, then read by the other ranks
def prepare_split(cfg: Config, tokenizer, role: str, packed: bool, architecture: str = "decoder"):
    """Return (datasets.Dataset or None, Stats, cache path). Builds and caches on a miss.

    The dataset's columns depend on ``plan.layout``: ``input_ids``, ``labels`` and ``seq_lens`` (samples per row)
    for causal LMs and masked-LM text blocks; ``input_ids`` and ``labels`` for encoder-decoder pairs; the preference
    columns for preference methods. ``architecture`` is ``models.architecture(cfg)``: the kind of model trained.
    """
    from datasets import load_from_disk

    if not sources_for(cfg, role):
        return None, None, None
    layout = sample_layout(cfg, architecture)
    packed = packed and layout == CAUSAL
    target = cache_dir(cfg) / fingerprint(cfg, tokenizer, role, packed, layout)
    if (target / "stats.json").exists():
        stats = Stats(**json.loads((target / "stats.json").read_text()))
        return load_from_disk(str(target / "data")), stats, target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        if layout == CAUSAL:  # the scale case: rows streamed through workers, never all in memory (data/bounded.py)
            stats = build_causal(cfg, tokenizer, role, packed, tmp / "data",
                                 [s.path or s.loader for s in sources_for(cfg, role)])
        else:
            ds, stats = _build_in_memory(cfg, tokenizer, role, layout)
            ds.save_to_disk(str(tmp / "data"))
        stats.layout = layout
        (tmp / "stats.json").write_text(json.dumps(asdict(stats)))
        try:
            os.replace(tmp, target)
        except OSError:  # another process built it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_from_disk(str(target / "data")), stats, target


def _build_in_memory(cfg: Config, tokenizer, role: str, layout: str):
    """Preference pairs, encoder-decoder pairs and masked-LM blocks: (datasets.Dataset, Stats), built from the rows
    in memory."""
    from datasets import Dataset
    from datasets.table import InMemoryTable

    per_source, _, stats = load_rows(cfg, role)
    stats.layout = layout
    if layout == SEQ2SEQ:
        for (fmt, rows), src in zip(per_source, sources_for(cfg, role)):
            if fmt != "prompt_completion":
                raise DataError(f"{src.path or src.loader}: encoder-decoder SFT needs input/output (prompt/completion) "
                                f"rows, got {fmt}")
    rows = split_rows(cfg, role, per_source)
    if layout in (PAIRS, PROMPTS):  # prompt/chosen/rejected ids (data/preference.py); prompts (data/prompts.py)
        encode = encode_preference_rows if layout == PAIRS else encode_prompt_rows
        samples = encode(cfg, tokenizer, rows, stats)
        if not samples:
            raise DataError(f"no {role} samples left after tokenisation ({stats.dropped or 'all rows were bad'})")
        return Dataset.from_list(samples), stats
    if layout == SEQ2SEQ:
        ds = Dataset(InMemoryTable(encode_seq2seq_rows(cfg, tokenizer, rows, stats)))
        if not len(ds):
            raise DataError(f"no {role} samples: all rows were bad")
        return ds, stats
    tokens = encode_mlm_rows(cfg, tokenizer, rows, stats)
    if not len(tokens.lengths):
        raise DataError(f"no {role} text left after tokenisation")
    return Dataset(InMemoryTable(to_table(tokens, None))), stats
