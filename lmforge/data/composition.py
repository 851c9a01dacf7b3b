"""What a chat template does with a conversation, learned from renderings of placeholder conversations.

- ``ChatLayout``: where the template puts an assistant turn's loss span relative to its content (the text just before
  the span, between the span start and the content, and after the content up to the span end). The fast path that
  learns it from ``PROBES`` is ``fast_masks.OneRendering``.
- ``Composition``: how the template builds a conversation from its messages, so that a row can be built by
  concatenation, with every content's character span known, instead of rendered (``fast_masks.Composed``).

Nothing here is trusted on its own: the fast paths check what they build from it against the reference masker.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from lmforge.data.masks import Spans

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

Gaps = tuple[str, ...]  # the texts around a role sequence's messages: preamble, between each two, ending
_UNSEEN = object()


@dataclass(frozen=True)
class ChatLayout:
    """Where a template puts an assistant turn's loss span relative to its content (learned from probes)."""

    anchor: str  # rendered just before the span: the generation prompt
    gap: str  # between the span start and the content
    tail: str  # after the content, still in the span (e.g. the end-of-turn token)
    append_eos: bool  # the span has no EOS: one is appended after the last assistant turn


class NotComposable(Exception):
    """The template builds conversations in a way ``Composition`` does not capture (the reason is the message)."""


class Composition:
    """How a chat template builds a conversation from its messages, learned from placeholder renderings.

    A rendering of n messages is gap_0 + content_0 + gap_1 + ... + content_{n-1} + gap_n, where gap_k (gap_0 is the
    preamble, gap_n the ending) depends only on the roles of messages k-1 and k and on whether message k is the
    last one: enough for system preambles that change with the first role, default system prompts, separators that
    depend on the neighbouring roles (grouped tool results) and a last turn of its own. A gap learned twice must be
    the same text (a turn number in it is not: ``NotComposable``). Each assistant content's loss span follows from
    the layout: it starts ``len(layout.gap)`` before the content and ends ``len(layout.tail)`` after it, and every
    gap around an assistant message is checked to frame it so.
    """

    def __init__(self, render, layout: ChatLayout, specials: list[str]):
        self._render = render
        self.layout = layout
        self._specials = {t for t in specials if t.strip()}  # whitespace-only added tokens change nothing
        self._gaps: dict[tuple, str] = {}
        self._plans: dict[tuple, Gaps | None] = {}  # role sequence -> its gaps (None: the template refuses it)
        self._marker = None
        self.trims = False  # the template strips contents: rows with edge whitespace are rendered
        learned = [roles for roles in COMPOSE_ROLES if self.plan(roles) is not None]
        if not learned:
            raise NotComposable("no placeholder conversation renders")
        for roles in learned:
            padded = [f"\n {_P}{i}w \n" for i in range(len(roles))]
            if self._render(_messages(roles, padded)) != self._join(self._plans[roles], padded):
                self.trims = True
            odd = [f"{_VERBATIM}{i}" for i in range(len(roles))]
            if self._render(_messages(roles, odd)) != self._join(self._plans[roles], odd):
                raise NotComposable("the template does not copy message contents verbatim "
                                    "(it escapes or rewrites them)")

    @staticmethod
    def _join(gaps, contents) -> str:
        return "".join(itertools.chain.from_iterable(zip(gaps, contents))) + gaps[-1]

    @staticmethod
    def _keys(roles: tuple[str, ...]) -> list[tuple]:
        n = len(roles)
        return [(roles[k - 1] if k else None, roles[k] if k < n else None, k == n - 1) for k in range(n + 1)]

    def plan(self, roles: tuple[str, ...]) -> Gaps | None:
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
                    raise NotComposable("the template does not render each message's content once, in order")
                gaps.append(text[pos:k])
                pos = k + len(c)
            gaps.append(text[pos:])
            for key, gap in zip(keys, gaps):
                if self._gaps.setdefault(key, gap) != gap:
                    raise NotComposable("the text between two messages depends on more than their roles "
                                        "(e.g. on the turn number)")
                self._check_frame(key, gap)
            self._marker = None
        plan = self._plans[roles] = tuple(self._gaps[k] for k in keys)
        return plan

    def _check_frame(self, key: tuple, gap: str) -> None:
        before, after, _ = key
        lay = self.layout
        if (after == "assistant" and not gap.endswith(lay.anchor + lay.gap)) or (
                before == "assistant" and not gap.startswith(lay.tail)):
            raise NotComposable("an assistant turn is framed differently after or before some roles")

    def _compile_marker(self):
        """One search for any text a template could react to: special and added tokens, and the learned gaps."""
        texts = self._specials | {g.strip() for g in self._gaps.values() if g.strip()}
        texts = sorted(texts, key=len, reverse=True)
        if not texts:
            return lambda _: None
        return re.compile("|".join(map(re.escape, texts))).search

    def accepts(self, messages: list[dict]) -> Gaps | None:
        """The gaps of a row this composition builds; None when the row must be rendered."""
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

    def compose(self, messages: list[dict]) -> Spans | None:
        """(text, spans, needs_eos) built by concatenation; None when this row must be rendered."""
        gaps = self.accepts(messages)
        if gaps is None:
            return None
        head, tail = len(self.layout.gap), len(self.layout.tail)
        parts, spans, pos = [], [], 0
        for gap, m in zip(gaps, messages):
            c = m["content"]
            parts += (gap, c)
            pos += len(gap)
            if m["role"] == "assistant":
                spans.append((pos - head, pos + len(c) + tail))
            pos += len(c)
        parts.append(gaps[-1])
        return "".join(parts), spans, bool(spans) and self.layout.append_eos


def _messages(roles, contents) -> list[dict]:
    return [{"role": r, "content": c} for r, c in zip(roles, contents)]
