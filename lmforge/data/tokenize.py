"""Tokenisation with loss masks, written once for every method.

``labels`` are unshifted, HF style (label[t] is the token at t; the loss shifts). Positions that carry no
loss are ``IGNORE``. Label 0 of every sample is always IGNORE: nothing precedes it, and this keeps packed
rows from training the last token of one sample to predict the first of the next.

Chat masks come from rendering the conversation prefix by prefix and mapping character spans to tokens
through the fast tokenizer's offsets, so they do not depend on ``{% generation %}`` markers in the template.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.errors import DataError

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


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

    # ----------------------------------------------------------------------------------------- helpers
    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        if not self.tok.chat_template:
            raise DataError("chat rows need a tokenizer with a chat template (model.tokenizer has none)")
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    @staticmethod
    def _finish(ids: list[int], labels: list[int]) -> Encoded:
        if labels:
            labels[0] = IGNORE
        return Encoded(ids, labels)

    # ----------------------------------------------------------------------------------------- formats
    def text(self, text: str) -> Encoded:
        ids = self.bos + self._ids(text) + [self.eos_id]
        return self._finish(ids, list(ids))

    def prompt_completion(self, prompt: str, completion: str) -> Encoded:
        if self.apply_chat_template:
            return self.chat([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}])
        p = self.bos + self._ids(prompt)
        c = self._ids(completion) + [self.eos_id]
        return self._finish(p + c, [IGNORE] * len(p) + c)

    def assistant_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]], bool]:
        """Render the chat; return the text, the character spans that carry loss, and whether EOS is missing."""
        text = self.render(messages)
        spans = []
        needs_eos = False
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True) if i else ""
            upto = self.render(messages[: i + 1])
            if not (text.startswith(before) and text.startswith(upto)):
                raise DataError(
                    "the chat template renders a conversation prefix differently from the whole conversation, so "
                    "assistant turns cannot be located; use a prefix-consistent template"
                )
            end = len(upto)
            k = text.rfind(self.eos_text, len(before), end) if self.eos_text else -1
            if k >= 0:
                end = k + len(self.eos_text)  # the EOS ends the turn and carries loss; what follows it does not
            elif i == len(messages) - 1 or all(m["role"] != "assistant" for m in messages[i + 1:]):
                needs_eos = True
            spans.append((len(before), end))
        return text, spans, needs_eos

    def chat(self, messages: list[dict]) -> Encoded:
        text, spans, needs_eos = self.assistant_spans(messages)
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc.input_ids)
        labels = [IGNORE] * len(ids)
        j = 0
        for t, (a, b) in enumerate(enc.offset_mapping):
            while j < len(spans) and a >= spans[j][1]:
                j += 1
            if j < len(spans) and spans[j][0] <= a < spans[j][1] and b > a:
                labels[t] = ids[t]
        if needs_eos:
            # The template does not end assistant turns with EOS: append it so the model learns to stop.
            ids.append(self.eos_id)
            labels.append(self.eos_id)
        return self._finish(ids, labels)

    def encode(self, row: dict, fmt: str) -> Encoded:
        if fmt == "text":
            return self.text(row["text"])
        if fmt == "prompt_completion":
            return self.prompt_completion(row["prompt"], row["completion"])
        if fmt == "chat":
            return self.chat(row["messages"])
        raise DataError(f"format {fmt!r} is not used for language-model training (method needs another format)")


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
