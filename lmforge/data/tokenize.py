"""Tokenisation with loss masks, written once for every method.

``labels`` are unshifted, HF style (label[t] is the token at t; the loss shifts). Positions that carry no
loss are ``IGNORE``. Label 0 of every sample is always IGNORE: nothing precedes it, and this keeps packed
rows from training the last token of one sample to predict the first of the next.

Chat masks do not depend on ``{% generation %}`` markers in the template. The reference method renders the
conversation prefix by prefix: an assistant turn's loss span starts where the prefix before it, rendered with
the generation prompt, ends, and ends at the EOS closing the turn. That costs 2k+1 renderings for k assistant
turns, so it is used once per template, on probe conversations, to learn the template's *layout*: the text
just before each loss span (the generation prompt), between the span start and the content, and after the
content up to the span end. Every conversation is then rendered once and its spans located by searching that
layout around each assistant content, checked against the per-prefix method on the probes and on the first
real rows. Templates whose layout is not constant (or rows where the search is ambiguous) fall back to the
per-prefix method, and ``Encoder.mask_counts`` says how many rows took which path. Character spans become
token labels through the fast tokenizer's offsets.

Rendering even once per row costs more than tokenising it, so where the template allows, rows are not rendered
at all: ``_Composition`` learns from placeholder conversations how the template builds a conversation from its
messages (the text between two messages, the preamble and the ending, each a function of the roles around it),
then builds each row by concatenation with every content's character span known. It must give exactly the
template's text: it is checked against the template (and the per-prefix spans) on the probes, on the first row
of every role sequence and on the first ``VERIFY_ROWS`` rows, and any disagreement turns it off; rows whose
contents could change what the template does (special-token or learned separator text, edge whitespace where
the template trims, empty contents, fields other than role and content) are rendered.

Tokenising even the composed text costs most of a row's time, and the template's own text (a default system prompt,
the role headers) is a large share of it. With a GPT-2-style byte-level tokenizer, a composed row is tokenised
message by message (``PIECEWISE``): each text between two messages is tokenised once per role sequence, and only
the contents per row. That gives the tokens of the whole text when no pre-token can span a content's edges, which
holds (see ``_piecewise_refusal``) when the content starts with a non-whitespace character after a line break or
an added token, and ends where an added token starts (the tokenizer splits at those before anything else). Such
rows are checked against tokenising the whole text on the first row of every role sequence and the first
``VERIFY_ROWS`` rows; any disagreement turns it off.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import numpy as np

from lmforge.errors import DataError

IGNORE = -100
# How a chat row's loss spans were found. COMPOSED rows (built without rendering) are also counted as FAST: both
# are one pass per row, and the summary's counts of FAST vs PER_PREFIX stay whole for readers that know only those.
FAST, PER_PREFIX, COMPOSED = "fast", "per-prefix", "composed"
# PIECEWISE rows (composed, then tokenised message by message) are also counted as COMPOSED and FAST.
PIECEWISE = "piecewise"
MASK_PATHS = (FAST, PER_PREFIX, COMPOSED, PIECEWISE)
VERIFY_ROWS = 8  # real conversations per encoder checked against the per-prefix method before trusting the layout

# Probe conversations for learning a template's layout: contents are distinct, untrimmed-safe words, so the
# template cannot confuse them with its own markers; roles in the orders real data has.
_P = "lmforgeprobe"
PROBES = [
    [{"role": "user", "content": f"{_P} u1 alpha"}, {"role": "assistant", "content": f"{_P} a1 beta"}],
    [{"role": "system", "content": f"{_P} s1 gamma"}, {"role": "user", "content": f"{_P} u2 delta"},
     {"role": "assistant", "content": f"{_P} a2 epsilon"}, {"role": "user", "content": f"{_P} u3 zeta"},
     {"role": "assistant", "content": f"{_P} a3 eta"}],
    [{"role": "user", "content": f"{_P} u4 theta"}, {"role": "assistant", "content": f"{_P} a4 iota"},
     {"role": "tool", "content": f"{_P} t1 kappa"}, {"role": "assistant", "content": f"{_P} a5 lambda"}],
]

# Role sequences whose placeholder renderings teach a template's composition up front (real rows' other sequences
# are learned when first seen). Repeated role pairs at different positions expose turn-numbered templates.
COMPOSE_ROLES = [
    ("user", "assistant"),
    ("system", "user", "assistant"),
    ("user", "assistant", "user", "assistant", "user", "assistant"),
    ("system", "user", "assistant", "user", "assistant", "user", "assistant"),
    ("user", "assistant", "tool", "assistant", "user", "assistant"),
    ("system", "user", "assistant", "tool", "tool", "assistant", "user", "assistant"),
]
# Content a composable template must copy verbatim: quotes, backslash, markup, Jinja-like braces, non-ASCII, inner
# whitespace (a template that escapes or rewrites contents cannot be composed).
_VERBATIM = _P + " \"q\" 'a' \\ & <b> {{x}} {%y%} é 中\n\t z"


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class ChatLayout:
    """Where a template puts an assistant turn's loss span relative to its content (learned from probes)."""

    anchor: str  # rendered just before the span: the generation prompt
    gap: str  # between the span start and the content
    tail: str  # after the content, still in the span (e.g. the end-of-turn token)
    append_eos: bool  # the span has no EOS: one is appended after the last assistant turn


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
        self._added = tuple(t.content for t in tokenizer.added_tokens_decoder.values() if t.content)
        self._layout: ChatLayout | None = None
        self._layout_reason: str | None = None  # why the fast path is off (None: not decided yet)
        self._verified = 0
        self._composition: _Composition | None = None
        self._composition_reason: str | None = None  # why rows are not composed (None: not decided yet)
        self._composed = 0
        self._piecewise_reason: str | None = None  # why composed rows are not tokenised by message ("": they are)
        self._piecewise = 0
        self.mask_counts = dict.fromkeys(MASK_PATHS, 0)  # chat rows masked by each path (see COMPOSED, PIECEWISE)

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
            return self.chat(self._pc_messages(prompt, completion))
        p = self.bos + self._ids(prompt)
        c = self._ids(completion) + [self.eos_id]
        return self._finish(p + c, [IGNORE] * len(p) + c)

    @staticmethod
    def _pc_messages(prompt: str, completion: str) -> list[dict]:
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]

    # ----------------------------------------------------------------------------------------- chat spans
    def assistant_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]], bool]:
        """The reference (per-prefix) method: render the chat; return the text, the character spans that carry
        loss, and whether EOS is missing."""
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

    def _learn_layout(self) -> None:
        """Learn the template's layout from the probes (per-prefix spans), then check it reproduces them."""
        layouts = set()
        try:
            cases = []
            for probe in PROBES:
                try:
                    cases.append((probe, self.assistant_spans(probe)))
                except DataError as e:  # e.g. not prefix-consistent: the per-prefix method will say so per row
                    raise _NoLayout(str(e)) from None
                except Exception:  # the template refuses this role order (e.g. no tool role): not probed
                    continue
            for probe, (text, spans, needs_eos) in cases:
                turns = [i for i, m in enumerate(probe) if m["role"] == "assistant"]
                for i, (s, e) in zip(turns, spans):
                    content = probe[i]["content"]
                    c = text.find(content, s)
                    if c < 0 or c + len(content) > e:
                        raise _NoLayout("the assistant content is not inside its loss span")
                    gen = self.render(probe[:i], add_generation_prompt=True)  # i > 0: every probe opens with a user
                    plain = self.render(probe[:i])
                    anchor = gen[len(plain):] if gen.startswith(plain) else ""
                    layouts.add(ChatLayout(anchor, text[s:c], text[c + len(content):e], needs_eos))
            if len(layouts) != 1:
                raise _NoLayout("the text around assistant turns varies between turns" if layouts
                                else "no probe conversation renders")
            layout = layouts.pop()
            if not layout.anchor:
                raise _NoLayout("the template has no generation prompt to anchor assistant turns")
            for probe, ref in cases:
                if self._fast_spans(probe, layout, ref[0]) != ref[1:]:
                    raise _NoLayout("one rendering does not reproduce the per-prefix spans")
        except _NoLayout as e:
            self._layout, self._layout_reason = None, str(e)
            return
        self._layout, self._layout_reason = layout, ""

    def _fast_spans(self, messages: list[dict], layout: ChatLayout, text: str):
        """Spans located in one rendering by the layout; None when the search is not unambiguous for this row."""
        spans = []
        cursor = 0
        eos = self.eos_text or "\0"
        for m in messages:
            content = m["content"]
            if layout.anchor in content or eos in content:
                return None  # the content could fake a marker: let the per-prefix method decide
            if m["role"] != "assistant":
                continue
            k = text.find(layout.anchor + layout.gap + content, cursor)
            if k < 0:
                return None
            start = k + len(layout.anchor)
            end = start + len(layout.gap) + len(content)
            if not text.startswith(layout.tail, end):
                return None
            end += len(layout.tail)
            spans.append((start, end))
            cursor = end
        return spans, layout.append_eos

    def chat_path(self) -> tuple[str, str]:
        """(path, reason): which method masks chat rows under this tokenizer's template, and why not the fast one."""
        if self._layout_reason is None:
            self._learn_layout()
        return (FAST, "") if self._layout is not None else (PER_PREFIX, self._layout_reason or "")

    def composition(self) -> tuple[bool, str]:
        """(on, reason): whether chat rows are composed without rendering, and why not."""
        if self._composition_reason is None:
            self._build_composition()
        return self._composition is not None, self._composition_reason or ""

    def _build_composition(self) -> None:
        path, why = self.chat_path()
        if path != FAST:
            self._composition_reason = f"no fixed layout of assistant turns ({why})"
            return
        specials = list(self.tok.all_special_tokens) + [t.content for t in self.tok.added_tokens_decoder.values()]
        try:
            comp = _Composition(self.render, self._layout, specials)
            for probe in PROBES:  # real contents: the composition must give the template's text and spans
                got = comp.compose(probe)
                if got is not None and got[:3] != self.assistant_spans(probe):
                    raise _NotComposable("composing a probe conversation differed from the template's rendering")
        except _NotComposable as e:
            self._composition_reason = str(e)
            return
        self._composition, self._composition_reason = comp, ""

    def _composition_off(self, reason: str) -> None:
        self._composition, self._composition_reason = None, reason

    def _composed_spans(self, messages: list[dict]):
        """The row built without rendering, checked against the reference where it must be; None: render it."""
        try:
            got = self._composition.compose(messages)
        except _NotComposable as e:  # a new role sequence the composition does not capture
            self._composition_off(str(e))
            return None
        if got is None:
            return None
        text, spans, needs_eos, plan = got
        if not plan.verified or self._composed < VERIFY_ROWS:
            ref = self.assistant_spans(messages)
            if ref != (text, spans, needs_eos):
                roles = ", ".join(m["role"] for m in messages)
                self._composition_off(f"a composed row ({roles}) differed from the template's rendering or spans")
                self.mask_counts[PER_PREFIX] += 1
                return ref
            plan.verified = True
        self._composed += 1
        self.mask_counts[COMPOSED] += 1
        self.mask_counts[FAST] += 1
        return text, spans, needs_eos

    def chat_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]], bool]:
        """Like ``assistant_spans``: composed without rendering, or with one rendering, whenever the template allows."""
        if self._composition_reason is None:
            self._build_composition()
        if self._composition is not None:
            got = self._composed_spans(messages)
            if got is not None:
                return got
        if self.chat_path()[0] == FAST:
            text = self.render(messages)
            found = self._fast_spans(messages, self._layout, text)
            if found is not None and self._verified < VERIFY_ROWS:
                self._verified += 1
                ref = self.assistant_spans(messages)
                if ref != (text, *found):
                    self._layout, self._layout_reason = None, "one rendering disagreed with the per-prefix spans on a real row"
                    self.mask_counts[PER_PREFIX] += 1
                    return ref
            if found is not None:
                self.mask_counts[FAST] += 1
                return (text, *found)
        self.mask_counts[PER_PREFIX] += 1
        return self.assistant_spans(messages)

    @staticmethod
    def _labels(ids: list[int], offsets, spans: list[tuple[int, int]]) -> list[int]:
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

    def _chat_encoded(self, ids: list[int], offsets, spans, needs_eos: bool) -> Encoded:
        ids = list(ids)
        labels = self._labels(ids, offsets, spans)
        if needs_eos:
            # The template does not end assistant turns with EOS: append it so the model learns to stop.
            ids.append(self.eos_id)
            labels.append(self.eos_id)
        return self._finish(ids, labels)

    def chat(self, messages: list[dict]) -> Encoded:
        text, spans, needs_eos = self.chat_spans(messages)
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return self._chat_encoded(enc.input_ids, enc.offset_mapping, spans, needs_eos)

    def chat_per_prefix(self, messages: list[dict]) -> Encoded:
        """The reference method, kept callable for tests and comparisons."""
        text, spans, needs_eos = self.assistant_spans(messages)
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return self._chat_encoded(enc.input_ids, enc.offset_mapping, spans, needs_eos)

    # ----------------------------------------------------------------------------------------- by message
    def piecewise(self) -> tuple[bool, str]:
        """(on, reason): whether composed rows are tokenised message by message, and why not."""
        if self._piecewise_reason is None:
            on, why = self.composition()
            self._piecewise_reason = _piecewise_refusal(self.tok) if on else f"rows are not composed ({why})"
        return not self._piecewise_reason, self._piecewise_reason

    def _pieces_of(self, messages: list[dict]) -> _Plan | None:
        """The plan of a row that is tokenised message by message (its ``pieces`` set); None: tokenise its whole
        text. Rows are composed and checked on the whole-text path first (``_composed_spans``)."""
        if self._composition is None or self._composed < VERIFY_ROWS or not self.piecewise()[0]:
            return None
        plan = self._composition.accepts(messages)
        if plan is None or not plan.verified:
            return None
        if plan.pieces is _UNSEEN:
            self._pieces(plan, tuple(m["role"] for m in messages))
        if plan.pieces is None or any(m["content"][0].isspace() for m in messages):
            return None
        return plan

    def _pieces(self, plan: _Plan, roles: tuple[str, ...]) -> list[tuple[list[int], list[int]]] | None:
        """A role sequence's gaps tokenised once as (ids, labels), each in the context it has in a row (followed
        by a content's first, non-whitespace character); None when a content's edge is not a place where the
        tokenizer must split: the text before a content must end with a line break or an added token, the text
        after it must start with an added token."""
        plan.pieces = None
        hard = self._added
        lay = self._layout
        n = len(roles)
        pieces = []
        for k, gap in enumerate(plan.gaps):
            last = k == n
            if k and not (gap.startswith(hard) or (last and not gap)):
                return None
            if not last and gap and not (gap.endswith("\n") or gap.endswith(hard)):
                return None
            enc = self.tok.backend_tokenizer.encode(gap if last else gap + "x", add_special_tokens=False)
            ids, offsets = enc.ids, enc.offsets
            if not last:  # "x" stands for the content: it must start a token of its own right after the gap
                if offsets[-1] != (len(gap), len(gap) + 1):
                    return None
                ids, offsets = ids[:-1], offsets[:-1]
            head = len(gap) - len(lay.gap) if not last and roles[k] == "assistant" else len(gap) + 1
            tail = len(lay.tail) if k and roles[k - 1] == "assistant" else 0
            # the rule of ``_labels``: a token carries loss when its first character lies in a span
            labels = [i if (a >= head or a < tail) and b > a else IGNORE for i, (a, b) in zip(ids, offsets)]
            pieces.append((ids, labels))
        plan.pieces = pieces
        return pieces

    def _encode_by_message(self, rows: list[tuple[int, list[dict], _Plan]], out: list) -> None:
        """Encode rows from their tokenised gaps and contents (one batched call for every content); the first
        rows of each role sequence and of this encoder are checked against tokenising the whole text."""
        tokens = self.tok.backend_tokenizer
        encode = getattr(tokens, "encode_batch_fast", tokens.encode_batch)  # no offsets needed
        # A row's contents joined by EOS, an added token, which the tokenizer splits at before anything else: one
        # string per row costs less than one per message, and gives the same tokens with EOS between them.
        joined = encode([self.eos_text.join(m["content"] for m in msgs) for _, msgs, _ in rows],
                        add_special_tokens=False)
        for (k, msgs, plan), enc in zip(rows, joined):
            pieces = plan.pieces
            parts = _split_at(enc.ids, self.eos_id, len(msgs))
            if parts is None or not self.piecewise()[0]:  # BPE made an EOS id; or turned off by an earlier row
                out[k] = self.chat(msgs)
                continue
            ids, labels = [], []
            assistant = False
            for (gap_ids, gap_labels), m, c in zip(pieces, msgs, parts):
                ids += gap_ids
                ids += c
                labels += gap_labels
                if m["role"] == "assistant":
                    labels += c
                    assistant = True
                else:
                    labels += [IGNORE] * len(c)
            ids += pieces[-1][0]
            labels += pieces[-1][1]
            if assistant and self._layout.append_eos:
                ids.append(self.eos_id)
                labels.append(self.eos_id)
            got = self._finish(ids, labels)
            if self._piecewise < VERIFY_ROWS or not plan.pieces_verified:
                ref = self.chat(msgs)  # counted as a composed row there
                if (ref.input_ids, ref.labels) != (got.input_ids, got.labels):
                    roles = ", ".join(m["role"] for m in msgs)
                    self._piecewise_reason = f"a row ({roles}) tokenised by message differed from its whole text"
                    out[k] = ref
                    continue
                plan.pieces_verified = True
            else:
                self._composed += 1
                self.mask_counts[FAST] += 1
                self.mask_counts[COMPOSED] += 1
            self._piecewise += 1
            self.mask_counts[PIECEWISE] += 1
            out[k] = got

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
                plan = self._pieces_of(msgs)
                if plan is not None:
                    by_message.append((k, msgs, plan))
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
                out[k] = self._chat_encoded(e.ids, e.offsets, spans, needs_eos)
        if texts:
            ids = self.tok([t for _, t in texts], add_special_tokens=False).input_ids
            for (k, _), i in zip(texts, ids):
                full = self.bos + i + [self.eos_id]
                out[k] = self._finish(full, list(full))
        if pcs:
            ps = self.tok([p for _, p, _ in pcs], add_special_tokens=False).input_ids
            cs = self.tok([c for _, _, c in pcs], add_special_tokens=False).input_ids
            for (k, _, _), p, c in zip(pcs, ps, cs):
                p, c = self.bos + p, c + [self.eos_id]
                out[k] = self._finish(p + c, [IGNORE] * len(p) + c)
        return out  # type: ignore[return-value]


class _NoLayout(Exception):
    """The template's assistant turns cannot be located from one rendering (the reason is the message)."""


class _NotComposable(Exception):
    """The template builds conversations in a way ``_Composition`` does not capture (the reason is the message)."""


class _Plan:
    """The texts between the messages of one role sequence, and whether a real row of it was checked."""

    __slots__ = ("gaps", "verified", "pieces", "pieces_verified")

    def __init__(self, gaps: tuple[str, ...]):
        self.gaps = gaps
        self.verified = False
        self.pieces = _UNSEEN  # its gaps' tokens and labels (``Encoder._pieces``); None: not tokenised by message
        self.pieces_verified = False


_UNSEEN = object()


class _Composition:
    """How a chat template builds a conversation from its messages, learned from placeholder renderings.

    A rendering of n messages is gap_0 + content_0 + gap_1 + ... + content_{n-1} + gap_n, where gap_k (gap_0 is the
    preamble, gap_n the ending) depends only on the roles of messages k-1 and k and on whether message k is the
    last one: enough for system preambles that change with the first role, default system prompts, separators that
    depend on the neighbouring roles (grouped tool results) and a last turn of its own. A gap learned twice must be
    the same text (a turn number in it is not: ``_NotComposable``). Each assistant content's loss span follows from
    the layout: it starts ``len(layout.gap)`` before the content and ends ``len(layout.tail)`` after it, and every
    gap around an assistant message is checked to frame it so.
    """

    def __init__(self, render, layout: ChatLayout, specials: list[str]):
        self._render = render
        self._layout = layout
        self._specials = {t for t in specials if t.strip()}  # whitespace-only added tokens change nothing
        self._gaps: dict[tuple, str] = {}
        self._plans: dict[tuple, _Plan | None] = {}  # role sequence -> its gaps (None: the template refuses it)
        self._marker = None
        self.trims = False  # the template strips contents: rows with edge whitespace are rendered
        learned = [roles for roles in COMPOSE_ROLES if self.plan(roles) is not None]
        if not learned:
            raise _NotComposable("no placeholder conversation renders")
        for roles in learned:
            padded = [f"\n {_P}{i}w \n" for i in range(len(roles))]
            if self._render(_messages(roles, padded)) != self._join(self._plans[roles].gaps, padded):
                self.trims = True
            odd = [f"{_VERBATIM}{i}" for i in range(len(roles))]
            if self._render(_messages(roles, odd)) != self._join(self._plans[roles].gaps, odd):
                raise _NotComposable("the template does not copy message contents verbatim (it escapes or rewrites them)")

    @staticmethod
    def _join(gaps, contents) -> str:
        return "".join(itertools.chain.from_iterable(zip(gaps, contents))) + gaps[-1]

    @staticmethod
    def _keys(roles: tuple[str, ...]) -> list[tuple]:
        n = len(roles)
        return [(roles[k - 1] if k else None, roles[k] if k < n else None, k == n - 1) for k in range(n + 1)]

    def plan(self, roles: tuple[str, ...]) -> _Plan | None:
        """The gaps of a role sequence, learned from one placeholder rendering when any of them is new."""
        keys = self._keys(roles)
        if any(k not in self._gaps for k in keys):
            contents = [f"{_P}{i}q" for i in range(len(roles))]
            try:
                text = self._render(_messages(roles, contents))
            except Exception:  # the template refuses this role sequence: its rows are rendered (and refused there)
                self._plans[roles] = None
                return None
            gaps, pos = [], 0
            for c in contents:
                k = text.find(c, pos)
                if k < 0 or text.count(c) != 1:
                    raise _NotComposable("the template does not render each message's content once, in order")
                gaps.append(text[pos:k])
                pos = k + len(c)
            gaps.append(text[pos:])
            for key, gap in zip(keys, gaps):
                if self._gaps.setdefault(key, gap) != gap:
                    raise _NotComposable("the text between two messages depends on more than their roles "
                                         "(e.g. on the turn number)")
                self._check_frame(key, gap)
            self._marker = None
        plan = self._plans[roles] = _Plan(tuple(self._gaps[k] for k in keys))
        return plan

    def _check_frame(self, key: tuple, gap: str) -> None:
        before, after, _ = key
        lay = self._layout
        if (after == "assistant" and not gap.endswith(lay.anchor + lay.gap)) or (
                before == "assistant" and not gap.startswith(lay.tail)):
            raise _NotComposable("an assistant turn is framed differently after or before some roles")

    def _compile_marker(self):
        """One search for any text a template could react to: special and added tokens, and the learned gaps."""
        texts = self._specials | {g.strip() for g in self._gaps.values() if g.strip()}
        texts = sorted(texts, key=len, reverse=True)
        if not texts:
            return lambda _: None
        return re.compile("|".join(map(re.escape, texts))).search

    def accepts(self, messages: list[dict]) -> _Plan | None:
        """The plan of a row this composition builds; None when the row must be rendered."""
        roles = tuple(m["role"] for m in messages)
        plan = self._plans.get(roles, _UNSEEN)
        if plan is _UNSEEN:
            plan = self.plan(roles)
        if plan is None:
            return None
        if self._marker is None:
            self._marker = self._compile_marker()
        marker, trims = self._marker, self.trims
        for m in messages:
            c = m["content"]
            if (len(m) != 2 or type(c) is not str or not c or marker(c) is not None
                    or (trims and (c[0].isspace() or c[-1].isspace()))):
                return None  # other fields, or a content that could change what the template does
        return plan

    def compose(self, messages: list[dict]):
        """(text, spans, needs_eos, plan) built by concatenation; None when this row must be rendered."""
        plan = self.accepts(messages)
        if plan is None:
            return None
        head, tail = len(self._layout.gap), len(self._layout.tail)
        parts, spans, pos = [], [], 0
        for gap, m in zip(plan.gaps, messages):
            c = m["content"]
            parts += (gap, c)
            pos += len(gap)
            if m["role"] == "assistant":
                spans.append((pos - head, pos + len(c) + tail))
            pos += len(c)
        parts.append(plan.gaps[-1])
        return "".join(parts), spans, bool(spans) and self._layout.append_eos, plan


def _piecewise_refusal(tok) -> str:
    """Why this tokenizer's tokens of a composed row cannot be assembled message by message ("": they can).

    With no normalizer and a GPT-2-style byte-level pre-tokenizer, the text is first cut at added tokens (which must
    not strip the whitespace around them), then split by GPT-2's regex, whose matches never hold a line break next
    to a non-whitespace character: a line break or an added token followed by a content's first (non-whitespace)
    character is always a split, as is an added token right after the content. BPE then works within each piece.
    Offsets are untouched (``_labels`` counts tokens that cover no character as loss-free; trimmed offsets make
    such tokens out of whitespace)."""
    backend = tok.backend_tokenizer
    pre = backend.pre_tokenizer
    if backend.normalizer is not None:
        return "the tokenizer normalises text"
    if type(pre).__name__ != "ByteLevel" or not pre.use_regex or pre.add_prefix_space:
        return "only a GPT-2-style byte-level pre-tokenizer is known to split at every message's edges"
    if type(backend.model).__name__ != "BPE" or backend.model.dropout:
        return "the tokenizer's model is not a deterministic BPE"
    post = backend.post_processor.__getstate__() if backend.post_processor is not None else b""
    if b'"trim_offsets":true' in post:
        return "the tokenizer trims token offsets"
    if any(t.lstrip or t.rstrip for t in tok.added_tokens_decoder.values()):
        return "an added token strips the whitespace next to it"
    eos = [t for t in tok.added_tokens_decoder.values() if t.content == tok.eos_token]
    if not eos or eos[0].single_word:
        return "EOS is not an added token split off wherever it occurs"
    return ""


def _split_at(ids: list[int], sep: int, n: int) -> list[list[int]] | None:
    """``ids`` cut at its n - 1 ``sep`` tokens; None when it holds another number of them."""
    parts, start = [], 0
    for _ in range(n - 1):
        try:
            end = ids.index(sep, start)
        except ValueError:
            return None
        parts.append(ids[start:end])
        start = end + 1
    parts.append(ids[start:])
    return None if sep in parts[-1] else parts


def _messages(roles, contents) -> list[dict]:
    return [{"role": r, "content": c} for r, c in zip(roles, contents)]


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
