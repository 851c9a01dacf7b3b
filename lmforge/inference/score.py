"""Scoring sequences with a reward model (method ``reward``'s output), shared by `lmforge eval --metrics
reward_accuracy` and `lmforge serve`'s ``POST /v1/score``.

Sequences are right padded, as TRL's reward collator pads them in training; the score head reads the last
token that is not padding. A conversation is rendered exactly as reward training renders a prompt + answer
(``data/preference.py``): the messages before the last one are the prompt, the last (an assistant turn) the
answer, ending with EOS.
"""

from __future__ import annotations

import torch

from lmforge.data.preference import encode_side
from lmforge.data.tokenize import Encoder
from lmforge.errors import DataError


def conversation_ids(enc: Encoder, messages: list[dict]) -> list[int]:
    """The token ids reward training scores for ``messages`` (prompt = all but the last, answer = the last)."""
    if not messages or messages[-1].get("role") != "assistant":
        raise DataError("the last message must be the assistant's answer to score")
    prompt, answer = encode_side(enc, messages[:-1], messages[-1:])
    return prompt + answer


@torch.inference_mode()
def score_sequences(model, pad_id: int, seqs: list[list[int]], batch_size: int = 8) -> list[float]:
    """One score per sequence, in the order given; ``batch_size`` sequences per forward, right padded."""
    device = next(model.parameters()).device
    out: list[float] = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in chunk], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk], device=device)
        out += model(input_ids=ids, attention_mask=mask).logits[:, 0].float().tolist()
    return out
