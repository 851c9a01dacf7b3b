"""What carries loss in a sample, and the reference chat masker that every faster path is checked against.

``labels`` are unshifted, HF style (label[t] is the token at t; the loss shifts). Positions that carry no
loss are ``IGNORE``. Label 0 of every sample is always IGNORE: nothing precedes it, and this keeps packed
rows from training the last token of one sample to predict the first of the next.

Chat masks do not depend on ``{% generation %}`` markers in the template. The reference method
(``per_prefix_spans``) renders the conversation prefix by prefix: an assistant turn's loss span starts where the
prefix before it, rendered with the generation prompt, ends, and ends at the EOS closing the turn. Character spans
become token labels through the fast tokenizer's offsets (``span_labels``). The reference costs 2k+1 renderings for
k assistant turns; the faster paths, and how each is checked against this one, are in ``fast_masks``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from lmforge.errors import DataError

IGNORE = -100

Spans = tuple[str, list[tuple[int, int]], bool]  # a chat row's text, its loss spans (in characters), EOS missing?


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


def finish(ids: list[int], labels: list[int]) -> Encoded:
    """The sample, with label 0 set to IGNORE (see the module docstring)."""
    if labels:
        labels[0] = IGNORE
    return Encoded(ids, labels)


def per_prefix_spans(render, eos_text: str | None, messages: list[dict]) -> Spans:
    """The reference: render the chat (``render(messages, add_generation_prompt=...)`` gives the template's text);
    return the text, the character spans that carry loss, and whether EOS is missing."""
    text = render(messages)
    spans = []
    needs_eos = False
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = render(messages[:i], add_generation_prompt=True) if i else ""
        upto = render(messages[: i + 1])
        if not (text.startswith(before) and text.startswith(upto)):
            raise DataError(
                "the chat template renders a conversation prefix differently from the whole conversation, so "
                "assistant turns cannot be located; use a prefix-consistent template"
            )
        end = len(upto)
        k = text.rfind(eos_text, len(before), end) if eos_text else -1
        if k >= 0:
            end = k + len(eos_text)  # the EOS ends the turn and carries loss; what follows it does not
        elif i == len(messages) - 1 or all(m["role"] != "assistant" for m in messages[i + 1:]):
            needs_eos = True
        spans.append((len(before), end))
    return text, spans, needs_eos


def span_labels(ids: list[int], offsets, spans: list[tuple[int, int]]) -> list[int]:
    """Tokens whose first character lies in a span (and that cover any character) carry loss."""
    n = len(ids)
    if not n or not spans:
        return [IGNORE] * n
    off = np.fromiter(itertools.chain.from_iterable(offsets), dtype=np.int64, count=2 * n).reshape(n, 2)
    a, b = off[:, 0], off[:, 1]
    sp = np.asarray(spans, dtype=np.int64)
    j = np.minimum(np.searchsorted(sp[:, 1], a, side="right"), len(sp) - 1)  # the first span ending after a
    inside = (sp[j, 0] <= a) & (a < sp[j, 1]) & (b > a)
    return np.where(inside, np.asarray(ids, dtype=np.int64), IGNORE).tolist()


def chat_sample(ids: list[int], offsets, spans: list[tuple[int, int]], needs_eos: bool, eos_id: int) -> Encoded:
    """A chat row's sample from its tokens, their character offsets and its loss spans."""
    ids = list(ids)
    labels = span_labels(ids, offsets, spans)
    if needs_eos:
        # The template does not end assistant turns with EOS: append it so the model learns to stop.
        ids.append(eos_id)
        labels.append(eos_id)
    return finish(ids, labels)
