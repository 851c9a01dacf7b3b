"""Prompt rows for online RL (method ``grpo``): the prompt as token ids ready for generation, and what the reward
functions are handed back.

A message-list prompt goes through the chat template with the generation prompt opened (``add_generation_prompt``),
as TRL renders conversational prompts; a string prompt is raw text after BOS (as a prompt/completion row's prompt),
or a user turn through the template with ``data.apply_chat_template``. A prompt longer than
``data.max_prompt_length`` keeps its last tokens (the generation prompt must stay at the end).

Each record keeps the prompt as the user wrote it and the row's other columns (JSON: columns may hold any JSON
value, which an Arrow column of mixed types could not), and the row's origin (file:line), so a reward function
gets TRL's arguments and an error in one names the row.
"""

from __future__ import annotations

import json

from lmforge.data.tokenize import Encoder
from lmforge.errors import DataError

VERSION = "1"  # part of the cache fingerprint: bump when the encoding below changes


def prompt_ids(enc: Encoder, prompt, apply_chat_template: bool) -> list[int]:
    """The token ids a completion of ``prompt`` (a string or a message list) is sampled after."""
    if isinstance(prompt, list) or apply_chat_template:
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        return enc._ids(enc.render(messages, add_generation_prompt=True))
    return enc.bos + enc._ids(prompt)


def encode_prompt_rows(cfg, tokenizer, rows, stats) -> list[dict]:
    """Canonical prompt rows (with origins) -> records {prompt_ids, prompt, columns, origin}; fills ``stats``."""
    enc = Encoder(tokenizer, apply_chat_template=cfg.data.apply_chat_template)
    most = cfg.data.max_prompt_length
    records = []
    for _, row in rows:
        try:
            ids = prompt_ids(enc, row.data["prompt"], cfg.data.apply_chat_template)
        except DataError as e:
            raise DataError(f"{row.origin}: {e}") from None
        if most and len(ids) > most:
            ids = ids[-most:]
            stats.prompt_truncated += 1
        if len(ids) >= cfg.data.max_length:
            stats.drop("prompt alone fills max_length")
            continue
        records.append({"prompt_ids": ids, "prompt": json.dumps(row.data["prompt"]),
                        "columns": json.dumps(row.data["columns"]), "origin": str(row.origin)})
        stats.tokens += len(ids)
    stats.samples = len(records)
    return records
