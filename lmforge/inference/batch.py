"""`lmforge generate` on files: JSONL prompts in, JSONL completions out, resumable.

Rows are processed in windows of a few batches: inside a window prompts are sorted by length so a batch
wastes little on padding, and the window's results are written back in input order. So the output file
is always a prefix of the input, and a re-run skips the rows already written.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable

from lmforge.config import DataSource
from lmforge.data.formats import RowError, _messages
from lmforge.data.sources import BadRow, Row, read_source
from lmforge.errors import DataError
from lmforge.inference.generate import Completion, GenerationOptions

WINDOW_BATCHES = 16  # batches per sorted window: larger = less padding, smaller = more often flushed


def validate_prompt_row(data) -> dict:
    """A prompt row needs a non-empty string ``prompt`` or a ``messages`` list; other keys pass through."""
    if not isinstance(data, dict):
        raise RowError(f"a row must be a JSON object, got {type(data).__name__}")
    if "messages" in data:
        data = dict(data, messages=_messages(data["messages"], "messages"))
        return data
    if "prompt" not in data:
        raise RowError("missing key 'prompt' (or 'messages')")
    if not isinstance(data["prompt"], str) or not data["prompt"]:
        raise RowError("'prompt' must be a non-empty string")
    return data


def read_prompt_rows(path: str) -> list[Row]:
    """All prompt rows of ``path`` with their file:line origins; any bad row stops here (DataError, exit 2)."""
    rows, bad = read_source(DataSource(path=path), "test")
    good = []
    for r in rows:
        try:
            good.append(Row(validate_prompt_row(r.data), r.origin))
        except RowError as e:
            bad.append(BadRow(r.origin, str(e)))
    if bad:
        bad.sort(key=lambda b: _origin_key(b.origin))
        shown = "\n  ".join(str(b) for b in bad[:10])
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise DataError(f"{len(bad)} bad input row(s):\n  {shown}{more}")
    return good


def _origin_key(origin: str) -> tuple[str, int]:
    """Sort "file:12" and "file:row 12" origins by file, then number."""
    where, _, num = origin.rpartition(":")
    digits = num.removeprefix("row ").strip()
    return where, int(digits) if digits.isdigit() else 0


def completed_rows(output: Path) -> int:
    """How many complete rows ``output`` holds; a torn last line (killed mid-write) is cut off."""
    if not output.exists():
        return 0
    data = output.read_bytes()
    keep = data.rfind(b"\n") + 1  # everything after the last newline is a partial write
    count = 0
    for lineno, line in enumerate(data[:keep].splitlines(), start=1):
        try:
            json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{output}:{lineno}: not a JSON row; is this the output of an earlier run?") from None
        count += 1
    if keep < len(data):
        with output.open("r+b") as fh:
            fh.truncate(keep)
    return count


def output_row(row: dict, c: Completion) -> dict:
    return {**row, "completion": c.text, "finish_reason": c.finish_reason, "completion_tokens": c.completion_tokens}


def generate_file(input_path: str, output_path: str, opts: GenerationOptions, batch_size: int,
                  encode: Callable[[dict], list[int]], generate: Callable[..., list[Completion]],
                  progress: bool = True, max_prompt_tokens: int | None = None) -> tuple[int, int]:
    """Generate for every input row not yet in the output; returns (rows skipped, rows generated)."""
    return generate_rows(read_prompt_rows(input_path), Path(output_path), 0, opts, batch_size, encode, generate,
                         progress, max_prompt_tokens)


def generate_rows(rows: list[Row], out: Path, first: int, opts: GenerationOptions, batch_size: int,
                  encode: Callable[[dict], list[int]], generate: Callable[..., list[Completion]],
                  progress: bool = True, max_prompt_tokens: int | None = None,
                  desc: str = "generate", adapters: dict[str, str] | None = None) -> tuple[int, int]:
    """Append to ``out`` the completions of the ``rows`` it does not hold yet; returns (skipped, generated).

    ``rows[0]`` is input row ``first`` (a shard of a multi-process run starts further on: sharded.py).
    ``generate(prompts, opts, on_row)`` gets a window of ``batch_size * WINDOW_BATCHES`` prompts, batches
    them itself, and calls ``on_row()`` as rows finish. The window's seed is ``opts.seed`` plus the input
    index of its first row, so seeded sampling is reproducible run to run, also when resuming or sharding.
    A prompt longer than ``max_prompt_tokens`` (the model's context) stops the run with its file:line.
    ``adapters`` ({row model name: adapter name or None for the base}, ``for_models``): each row's ``model``
    picks its adapter, passed to ``generate`` as a fourth argument."""
    from dataclasses import replace

    from tqdm import tqdm

    done = completed_rows(out)
    if done > len(rows):
        raise DataError(f"{out}: holds {done} rows but the input has only {len(rows)}; use a new output file")
    out.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(rows), initial=done, unit="row", desc=desc, disable=not progress, file=sys.stderr)
    window = batch_size * WINDOW_BATCHES
    with out.open("a", encoding="utf-8") as fh:
        for start in range(done, len(rows), window):
            chunk = rows[start:start + window]
            prompts = [_encode_row(r, encode, max_prompt_tokens) for r in chunk]
            seeded, tick = replace(opts, seed=opts.seed + first + start), lambda: bar.update(1)
            if adapters is None:
                results = generate(prompts, seeded, tick)
            else:
                results = generate(prompts, seeded, tick, [adapters[r.data["model"]] for r in chunk])
            for r, c in zip(chunk, results):
                fh.write(json.dumps(output_row(r.data, c), ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    bar.close()
    return done, len(rows) - done


def for_models(rows: list[Row], base: str, adapters: list[str]) -> tuple[list[Row], dict[str, str | None]]:
    """``generate --adapter``: a row naming a ``model`` (``base`` or an adapter) is generated by it; a row naming
    none, by the base and then each adapter in turn (one output row each, with its ``model``), to compare them.
    Returns the rows to generate and {model name: adapter name, None for the base}. An unknown name is a
    DataError naming the row."""
    names: dict[str, str | None] = {base: None, **{a: a for a in adapters}}
    out, bad = [], []
    for r in rows:
        model = r.data.get("model")
        if model is None:
            out += [Row({**r.data, "model": name}, r.origin) for name in names]
        elif isinstance(model, str) and model in names:
            out.append(r)
        else:
            bad.append(f"{r.origin}: model {model!r} is neither --model ({base}) nor an --adapter "
                       f"({', '.join(adapters)})")
    if bad:
        raise DataError("\n".join(bad[:10]) + (f"\n... and {len(bad) - 10} more" if len(bad) > 10 else ""))
    return out, names


def _encode_row(row: Row, encode: Callable[[dict], list[int]], max_prompt_tokens: int | None) -> list[int]:
    """The row's prompt ids; a prompt the model cannot take is a DataError naming the row."""
    from jinja2 import TemplateError

    try:
        ids = encode(row.data)
    except TemplateError as e:  # the chat template refused the messages (its raise_exception)
        raise DataError(f"{row.origin}: the chat template cannot render these messages ({e})") from None
    if max_prompt_tokens is not None and len(ids) >= max_prompt_tokens:
        raise DataError(f"{row.origin}: the prompt is {len(ids)} tokens, but the model's context is "
                        f"{max_prompt_tokens} (no room left to generate); shorten it")
    return ids
