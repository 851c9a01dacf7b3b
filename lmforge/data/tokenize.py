"""Tokenisation with loss masks, written once for every method.

- ``Encoder`` turns canonical rows into token ids and labels; ``chunk``, ``encoder_decoder_pairs`` and
  ``text_blocks`` serve pretraining and the other architectures.
- What carries loss, and the reference chat masker, are in ``masks``: the reference renders a conversation prefix
  by prefix, 2k+1 renderings for k assistant turns.
- The fast paths to a chat row's mask are in ``fast_masks``. They exist because the reference is slow, and so,
  measured, was each cheaper step that replaced it: one rendering per row (``OneRendering``) still costs more than
  tokenising the row, so where the template allows, rows are built from what ``composition`` learned of the template
  instead of rendered (``Composed``); tokenising even the composed text costs most of a row's time, and the
  template's own text (a default system prompt, the role headers) is a large share of it, so with a GPT-2-style
  byte-level tokenizer that text is tokenised once per role sequence and only the contents per row (``Piecewise``).
  Each path is a strategy that proposes a row; one check (``FastPath.check``) compares its first rows with the
  reference and, on a disagreement, uses the reference's row and turns the path off.
- ``Encoder.mask_counts`` counts the rows each path masked, and ``chat_path``, ``composition`` and ``piecewise``
  say why a faster path was not taken (``lmforge prepare`` prints both).
"""

from __future__ import annotations

from functools import partial

from lmforge.data.fast_masks import COMPOSED, PIECEWISE  # noqa: F401 (data/prepare.py imports them here)
from lmforge.data.fast_masks import (
    COUNTED_AS, FAST, MASK_PATHS, PER_PREFIX, Composed, OneRendering, Pieces, Piecewise,
)
from lmforge.data.masks import IGNORE, Encoded, Spans, chat_sample, finish, per_prefix_spans
from lmforge.errors import DataError


class Encoder:
    """Turns canonical rows (see ``formats``) into token ids and labels."""

    def __init__(self, tokenizer, apply_chat_template: bool = False):
        if not getattr(tokenizer, "is_fast", False):
            raise DataError("the tokenizer must be a fast (Rust) tokenizer: lmforge maps loss spans by offsets")
        self.tok = tokenizer
        self.eos_id = tokenizer.eos_token_id
        self.eos_text = tokenizer.eos_token
        probe = tokenizer("a").input_ids
        bos = tokenizer.bos_token_id
        self.bos = [bos] if bos is not None and probe and probe[0] == bos else []
        self.apply_chat_template = apply_chat_template
        # the fast paths to a chat row's spans (tried in this order) and to its tokens, each checked against its
        # reference (``fast_masks``)
        self._one_rendering = OneRendering(self.render, self.assistant_spans, self.eos_text)
        self._composed = Composed(self.render, self.assistant_spans, self._one_rendering, tokenizer)
        self._span_paths = (self._composed, self._one_rendering)
        self._piecewise = Piecewise(tokenizer, self._composed)
        self.mask_counts = dict.fromkeys(MASK_PATHS, 0)  # chat rows masked by each path (see fast_masks.COUNTED_AS)

    # ----------------------------------------------------------------------------------------- helpers
    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        if not self.tok.chat_template:
            raise DataError("chat rows need a tokenizer with a chat template (model.tokenizer has none)")
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    # ----------------------------------------------------------------------------------------- formats
    def text(self, text: str) -> Encoded:
        ids = self.bos + self._ids(text) + [self.eos_id]
        return finish(ids, list(ids))

    def prompt_completion(self, prompt: str, completion: str) -> Encoded:
        if self.apply_chat_template:
            return self.chat(self._pc_messages(prompt, completion))
        p = self.bos + self._ids(prompt)
        c = self._ids(completion) + [self.eos_id]
        return finish(p + c, [IGNORE] * len(p) + c)

    @staticmethod
    def _pc_messages(prompt: str, completion: str) -> list[dict]:
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]

    def chat(self, messages: list[dict]) -> Encoded:
        return self._tokenised(*self.chat_spans(messages))

    # ----------------------------------------------------------------------------------------- chat spans
    def assistant_spans(self, messages: list[dict]) -> Spans:
        """The reference (per-prefix) method: render the chat; return the text, the character spans that carry
        loss, and whether EOS is missing."""
        return per_prefix_spans(self.render, self.eos_text, messages)

    def chat_per_prefix(self, messages: list[dict]) -> Encoded:
        """The reference method, kept callable for tests and comparisons."""
        return self._tokenised(*self.assistant_spans(messages))

    def chat_spans(self, messages: list[dict]) -> Spans:
        """Like ``assistant_spans``: composed without rendering, or with one rendering, whenever the template allows."""
        spans, by = self._spans(messages)
        self._count(by)
        return spans

    def _spans(self, messages: list[dict]) -> tuple[Spans, str]:
        """A row's spans and the path that gave them: the first fast path that proposes any, checked; else the
        reference."""
        reference = partial(self._per_prefix, messages)
        for path in self._span_paths:
            if path.on():
                proposal = path.propose(messages)
                if proposal is not None:
                    return path.check(proposal, messages, reference)
        return reference()

    def _per_prefix(self, messages: list[dict]) -> tuple[Spans, str]:
        return self.assistant_spans(messages), PER_PREFIX

    def _whole_text(self, messages: list[dict]) -> tuple[Encoded, str]:
        """A chat row tokenised whole, and the path that gave its spans: the reference of ``Piecewise``."""
        spans, by = self._spans(messages)
        return self._tokenised(*spans), by

    def _tokenised(self, text: str, spans: list[tuple[int, int]], needs_eos: bool) -> Encoded:
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return chat_sample(enc.input_ids, enc.offset_mapping, spans, needs_eos, self.eos_id)

    def _count(self, by: str) -> None:
        for path in COUNTED_AS[by]:
            self.mask_counts[path] += 1

    # ----------------------------------------------------------------------------------------- which path, and why
    def chat_path(self) -> tuple[str, str]:
        """(path, reason): which method masks chat rows under this tokenizer's template, and why not the fast one."""
        on, why = self._one_rendering.state()
        return (FAST, "") if on else (PER_PREFIX, why)

    def composition(self) -> tuple[bool, str]:
        """(on, reason): whether chat rows are composed without rendering, and why not."""
        return self._composed.state()

    def piecewise(self) -> tuple[bool, str]:
        """(on, reason): whether composed rows are tokenised message by message, and why not."""
        return self._piecewise.state()

    # ----------------------------------------------------------------------------------------- rows
    def encode(self, row: dict, fmt: str) -> Encoded:
        if fmt == "text":
            return self.text(row["text"])
        if fmt == "prompt_completion":
            return self.prompt_completion(row["prompt"], row["completion"])
        if fmt == "chat":
            return self.chat(row["messages"])
        raise DataError(f"format {fmt!r} is not used for language-model training (method needs another format)")

    def encode_batch(self, rows: list[tuple[dict, str]]) -> list[Encoded]:
        """``encode`` for many rows, with one batched call of the fast tokenizer per format (same results)."""
        out: list[Encoded | None] = [None] * len(rows)
        chat, texts, pcs, by_message = [], [], [], []
        for k, (row, fmt) in enumerate(rows):
            if fmt == "chat" or (fmt == "prompt_completion" and self.apply_chat_template):
                msgs = row["messages"] if fmt == "chat" else self._pc_messages(row["prompt"], row["completion"])
                pieces = self._piecewise.pieces_of(msgs)
                if pieces is not None:
                    by_message.append((k, msgs, pieces))
                else:
                    chat.append((k, self.chat_spans(msgs)))
            elif fmt == "text":
                texts.append((k, row["text"]))
            elif fmt == "prompt_completion":
                pcs.append((k, row["prompt"], row["completion"]))
            else:
                self.encode(row, fmt)  # raises the format error
        if by_message:
            self._encode_by_message(by_message, out)
        if chat:
            # the Rust tokenizer directly: what tok(texts, add_special_tokens=False) calls, without converting
            # every offset pair into a BatchEncoding
            encs = self.tok.backend_tokenizer.encode_batch([t for _, (t, _, _) in chat], add_special_tokens=False)
            for (k, (_, spans, needs_eos)), e in zip(chat, encs):
                out[k] = chat_sample(e.ids, e.offsets, spans, needs_eos, self.eos_id)
        if texts:
            ids = self.tok([t for _, t in texts], add_special_tokens=False).input_ids
            for (k, _), i in zip(texts, ids):
                full = self.bos + i + [self.eos_id]
                out[k] = finish(full, list(full))
        if pcs:
            ps = self.tok([p for _, p, _ in pcs], add_special_tokens=False).input_ids
            cs = self.tok([c for _, _, c in pcs], add_special_tokens=False).input_ids
            for (k, _, _), p, c in zip(pcs, ps, cs):
                p, c = self.bos + p, c + [self.eos_id]
                out[k] = finish(p + c, [IGNORE] * len(p) + c)
        return out  # type: ignore[return-value]

    def _encode_by_message(self, rows: list[tuple[int, list[dict], Pieces]], out: list) -> None:
        """Chat rows tokenised message by message (``Piecewise``), each checked against its whole text where the
        check must; a row whose contents' tokens do not come apart again is tokenised whole."""
        path = self._piecewise
        for (k, msgs, _), proposal in zip(rows, path.propose([(msgs, pieces) for _, msgs, pieces in rows])):
            if proposal is None or not path.on():  # BPE made an EOS id; or turned off by an earlier row
                out[k] = self.chat(msgs)
                continue
            out[k], by = path.check(proposal, msgs, partial(self._whole_text, msgs))
            self._count(by)


def chunk(enc: Encoded, max_length: int) -> list[Encoded]:
    """Pretraining: split a long document into max_length pieces instead of dropping its tail."""
    out = []
    for start in range(0, len(enc.input_ids), max_length):
        ids = enc.input_ids[start:start + max_length]
        labels = enc.labels[start:start + max_length]
        if len(ids) >= 2:
            labels = list(labels)
            labels[0] = IGNORE
            out.append(Encoded(ids, labels))
    return out


# --------------------------------------------------------------------------------------------- other architectures
def encoder_decoder_pairs(tok, pairs: list[tuple[str, str]], max_length: int
                          ) -> list[tuple[list[int], list[int], bool]]:
    """Encoder-decoder rows: (encoder input ids, decoder labels, truncated) per (prompt, completion).

    Both sides end with EOS (T5 tokenizers add it themselves; byte-level BPE ones do not) and are cut to
    ``max_length`` keeping that EOS. The decoder's target is the completion alone, so every label carries loss.
    """
    eos = tok.eos_token_id

    def fit(ids: list[int]) -> tuple[list[int], bool]:
        if not ids or ids[-1] != eos:
            ids = ids + [eos]
        return (ids[: max_length - 1] + [eos], True) if len(ids) > max_length else (ids, False)

    out = []
    for lo in range(0, len(pairs), 1000):
        batch = pairs[lo:lo + 1000]
        inputs = tok([p for p, _ in batch], add_special_tokens=True).input_ids
        targets = tok([c for _, c in batch], add_special_tokens=True).input_ids
        for i, t in zip(inputs, targets):
            (i, cut_i), (t, cut_t) = fit(i), fit(t)
            out.append((i, t, cut_i or cut_t))
    return out


def text_blocks(tok, texts: list[str], max_length: int) -> list[list[Encoded]]:
    """Masked-LM: each text cut into blocks of at most ``max_length`` tokens framed by [CLS] ... [SEP] (or BOS/EOS).

    A block's labels are its ids where the masked-LM collator may mask them and IGNORE on special tokens (the frame),
    which it never masks; which of them carry loss is drawn anew for every batch (``data.mlm_probability``).
    """
    start = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
    end = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
    head, tail = [start] if start is not None else [], [end] if end is not None else []
    width = max_length - len(head) - len(tail)
    special = set(tok.all_special_ids)
    out = []
    for lo in range(0, len(texts), 1000):
        for ids in tok(texts[lo:lo + 1000], add_special_tokens=False).input_ids:
            blocks = []
            for i in range(0, len(ids), width):
                block = head + ids[i:i + width] + tail
                blocks.append(Encoded(block, [IGNORE if t in special else t for t in block]))
            out.append(blocks)
    return out
