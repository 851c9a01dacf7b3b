"""The fast paths to a chat row's loss mask: each one proposes, and one check holds it to the reference it replaces.

The reference (``masks.per_prefix_spans``) renders a conversation 2k+1 times for k assistant turns. Three faster
paths stand in for it where the template and the tokenizer allow; each is a ``FastPath``:

- ``OneRendering`` (``FAST``): the reference is used once per template, on probe conversations, to learn the
  template's *layout* (``composition.ChatLayout``). Every conversation is then rendered once and its spans located
  by searching that layout around each assistant content. Templates whose layout is not constant (or rows where
  the search is ambiguous) are left to the reference.
- ``Composed`` (``COMPOSED``): rendering even once per row costs more than tokenising it, so where the template
  allows, rows are not rendered at all: each is built by concatenation from the template's ``Composition`` (the
  text between two messages, the preamble and the ending, each a function of the roles around it), with every
  content's character span known. It must give exactly the template's text; it is checked on the probes when it
  is learned. Rows whose contents could change what the template does (special-token or learned separator text,
  edge whitespace where the template trims, empty contents, fields other than role and content) are rendered.
- ``Piecewise`` (``PIECEWISE``): tokenising even the composed text costs most of a row's time, and the template's
  own text (a default system prompt, the role headers) is a large share of it. With a GPT-2-style byte-level
  tokenizer, a composed row is tokenised message by message: each text between two messages is tokenised once per
  role sequence, and only the contents per row. That gives the tokens of the whole text when no pre-token can span
  a content's edges, which holds (see ``_tokenizer_refusal``) when the content starts with a non-whitespace
  character after a line break or an added token, and ends where an added token starts (the tokenizer splits at
  those before anything else). Its reference is the row's whole text tokenised.

A path decides once whether it can be used (``FastPath.on``; ``reason`` says why not, and ``lmforge prepare``
prints it). ``FastPath.check`` is the one check of every path: the first ``VERIFY_ROWS`` rows a path gives (and,
for the composed paths, the first row of every role sequence) are compared with the reference; on a disagreement
the path turns off for good, its reason naming the row, and the reference's row is used. ``COUNTED_AS`` says under
which ``MASK_PATHS`` a row is counted by the path that gave it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from operator import itemgetter

from lmforge.data.composition import PROBES, ChatLayout, Composition, Gaps, NotComposable
from lmforge.data.masks import IGNORE, Encoded, Spans, finish
from lmforge.errors import DataError

# How a chat row's loss spans were found. COMPOSED rows (built without rendering) are also counted as FAST: both
# are one pass per row, and the summary's counts of FAST vs PER_PREFIX stay whole for readers that know only those.
FAST, PER_PREFIX, COMPOSED = "fast", "per-prefix", "composed"
# PIECEWISE rows (composed, then tokenised message by message) are also counted as COMPOSED and FAST.
PIECEWISE = "piecewise"
MASK_PATHS = (FAST, PER_PREFIX, COMPOSED, PIECEWISE)
# the keys a row is counted under in ``Encoder.mask_counts``, by the path that gave it
COUNTED_AS = {PER_PREFIX: (PER_PREFIX,), FAST: (FAST,), COMPOSED: (COMPOSED, FAST),
              PIECEWISE: (PIECEWISE, COMPOSED, FAST)}
Pieces = list[tuple[list[int], list[int]]]  # a role sequence's gaps, each as (ids, labels)
_UNSEEN = object()
VERIFY_ROWS = 8  # real rows per encoder that each fast path checks against its reference before trusting itself


_ROLE = itemgetter("role")


def _roles(messages: list[dict]) -> tuple[str, ...]:
    return tuple(map(_ROLE, messages))


class FastPath(ABC):
    """A faster way to a chat row's spans or tokens, held to its reference by ``check``.

    A subclass says once why it cannot be used (``_refusal``: "" when it can) and proposes rows (``propose``: a
    row's spans, or for ``Piecewise`` the samples of a batch of rows it chose with ``pieces_of``; None for a row it
    declines). It never decides alone that a proposal is right: the caller passes each one through ``check``."""

    name = ""  # its key in MASK_PATHS
    differs = ""  # its reason when a row disagrees with the reference ("{roles}": that row's roles)
    each_role_sequence = True  # also check the first row of every role sequence, past the first VERIFY_ROWS rows

    def __init__(self):
        self.reason: str | None = None  # None: not decided yet; "": on; otherwise why it is off
        self.rows = 0  # rows it gave that the check let through
        self._checked: set[tuple[str, ...]] = set()  # role sequences of a row that agreed with the reference

    @abstractmethod
    def _refusal(self) -> str:
        """Why this path cannot be used, or "" when it can."""

    def on(self) -> bool:
        if self.reason is None:
            self.reason = self._refusal()
        return not self.reason

    def state(self) -> tuple[bool, str]:
        """(on, reason): whether the path is used, and why not."""
        return self.on(), self.reason

    def turn_off(self, reason: str) -> None:
        self.reason = reason

    def trusts(self, roles: tuple[str, ...]) -> bool:
        """Whether ``check`` lets a row of these roles through without asking the reference."""
        return self.rows >= VERIFY_ROWS and (not self.each_role_sequence or roles in self._checked)

    def check(self, proposal, messages: list[dict], reference) -> tuple[object, str]:
        """The one check of every fast path: (row, the path that gave it). That is the proposal when this path is
        trusted for the row or the proposal equals what ``reference()`` gives; otherwise it is the reference's row
        (``reference()`` returns it with the path that gave it), and this path turns off for good, its reason
        naming the row's roles."""
        roles = _roles(messages)
        if not self.trusts(roles):
            expected, by = reference()
            if expected != proposal:
                self.turn_off(self.differs.format(roles=", ".join(roles)))
                return expected, by
            self._checked.add(roles)
        self.rows += 1
        return proposal, self.name


class _NoLayout(Exception):
    """The template's assistant turns cannot be located from one rendering (the reason is the message)."""


class OneRendering(FastPath):
    """FAST: one rendering per row, its assistant turns located by the template's layout (learned from the probes)."""

    name = FAST
    differs = "one rendering disagreed with the per-prefix spans on a real row"
    each_role_sequence = False

    def __init__(self, render, reference, eos_text: str | None):
        super().__init__()
        self._render = render
        self._reference = reference  # messages -> Spans, the per-prefix method
        self._eos = eos_text or "\0"
        self.layout: ChatLayout | None = None

    def _refusal(self) -> str:
        try:
            self.layout = self._learn()
        except _NoLayout as e:
            return str(e)
        return ""

    def _learn(self) -> ChatLayout:
        """The template's layout from the probes (reference spans), checked to reproduce them."""
        cases = []
        for probe in PROBES:
            try:
                cases.append((probe, self._reference(probe)))
            except DataError as e:  # e.g. not prefix-consistent: the reference will say so per row
                raise _NoLayout(str(e)) from None
            except Exception:  # the template refuses this role order (e.g. no tool role): not probed
                continue
        layouts = set()
        for probe, (text, spans, needs_eos) in cases:
            turns = [i for i, m in enumerate(probe) if m["role"] == "assistant"]
            for i, (s, e) in zip(turns, spans):
                content = probe[i]["content"]
                c = text.find(content, s)
                if c < 0 or c + len(content) > e:
                    raise _NoLayout("the assistant content is not inside its loss span")
                gen = self._render(probe[:i], add_generation_prompt=True)  # i > 0: every probe opens with a user
                plain = self._render(probe[:i])
                anchor = gen[len(plain):] if gen.startswith(plain) else ""
                layouts.add(ChatLayout(anchor, text[s:c], text[c + len(content):e], needs_eos))
        if len(layouts) != 1:
            raise _NoLayout("the text around assistant turns varies between turns" if layouts
                            else "no probe conversation renders")
        layout = layouts.pop()
        if not layout.anchor:
            raise _NoLayout("the template has no generation prompt to anchor assistant turns")
        for probe, ref in cases:
            if self._locate(probe, layout, ref[0]) != ref[1:]:
                raise _NoLayout("one rendering does not reproduce the per-prefix spans")
        return layout

    def propose(self, messages: list[dict]) -> Spans | None:
        text = self._render(messages)
        found = self._locate(messages, self.layout, text)
        return None if found is None else (text, *found)

    def _locate(self, messages: list[dict], layout: ChatLayout, text: str):
        """(spans, needs_eos) located in one rendering by the layout; None when the search is ambiguous for this row."""
        spans = []
        cursor = 0
        for m in messages:
            content = m["content"]
            if layout.anchor in content or self._eos in content:
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


class Composed(FastPath):
    """COMPOSED: rows built by concatenation from the template's ``Composition``, without rendering."""

    name = COMPOSED
    differs = "a composed row ({roles}) differed from the template's rendering or spans"

    def __init__(self, render, reference, one_rendering: OneRendering, tokenizer):
        super().__init__()
        self._render = render
        self._reference = reference  # messages -> Spans, the per-prefix method
        self._one_rendering = one_rendering  # its layout frames every assistant turn
        self._tok = tokenizer
        self.composition: Composition | None = None

    def _refusal(self) -> str:
        if not self._one_rendering.on():
            return f"no fixed layout of assistant turns ({self._one_rendering.reason})"
        specials = list(self._tok.all_special_tokens) + [t.content for t in self._tok.added_tokens_decoder.values()]
        try:
            comp = Composition(self._render, self._one_rendering.layout, specials)
            for probe in PROBES:  # real contents: the composition must give the template's text and spans
                got = comp.compose(probe)
                if got is not None and got != self._reference(probe):
                    raise NotComposable("composing a probe conversation differed from the template's rendering")
        except NotComposable as e:
            return str(e)
        self.composition = comp
        return ""

    def gaps(self, messages: list[dict]) -> Gaps | None:
        """The texts around this row's messages; None when the row must be rendered."""
        return self._or_off(self.composition.accepts, messages)

    def propose(self, messages: list[dict]) -> Spans | None:
        return self._or_off(self.composition.compose, messages)

    def _or_off(self, step, messages: list[dict]):
        try:
            return step(messages)
        except NotComposable as e:  # a new role sequence the composition does not capture: off for good
            self.turn_off(str(e))
            return None


class Piecewise(FastPath):
    """PIECEWISE: a composed row's tokens put together from its gaps' (tokenised once per role sequence) and its
    contents' tokens."""

    name = PIECEWISE
    differs = "a row ({roles}) tokenised by message differed from its whole text"

    def __init__(self, tokenizer, composed: Composed):
        super().__init__()
        self._tok = tokenizer
        self._eos_id, self._eos_text = tokenizer.eos_token_id, tokenizer.eos_token
        self._composed = composed
        self._added = tuple(t.content for t in tokenizer.added_tokens_decoder.values() if t.content)
        self._pieces: dict[tuple[str, ...], Pieces | None] = {}  # role sequence -> its tokenised gaps; None: cannot

    def _refusal(self) -> str:
        if not self._composed.on():
            return f"rows are not composed ({self._composed.reason})"
        return _tokenizer_refusal(self._tok)

    def pieces_of(self, messages: list[dict]) -> Pieces | None:
        """The tokenised gaps to put this row together with; None when its whole text is tokenised. A row is taken
        when it is a composed row of a role sequence whose composition the check already trusts (rows are composed
        and checked on the whole-text path first), its gaps end where the tokenizer must split, and its contents
        start with a non-whitespace character."""
        composed = self._composed
        if composed.rows < VERIFY_ROWS or not composed.on() or not self.on():
            return None
        gaps = composed.gaps(messages)
        roles = _roles(messages)
        if gaps is None or not composed.trusts(roles):
            return None
        pieces = self._pieces.get(roles, _UNSEEN)
        if pieces is _UNSEEN:
            pieces = self._pieces[roles] = self._tokenise_gaps(gaps, roles)
        return None if pieces is None or any(m["content"][0].isspace() for m in messages) else pieces

    def _tokenise_gaps(self, gaps: Gaps, roles: tuple[str, ...]) -> Pieces | None:
        """A role sequence's gaps tokenised once as (ids, labels), each in the context it has in a row (followed
        by a content's first, non-whitespace character); None when a content's edge is not a place where the
        tokenizer must split: the text before a content must end with a line break or an added token, the text
        after it must start with an added token."""
        hard = self._added
        lay = self._composed.composition.layout
        n = len(roles)
        pieces = []
        for k, gap in enumerate(gaps):
            last = k == n
            if k and not (gap.startswith(hard) or (last and not gap)):
                return None
            if not last and gap and not (gap.endswith("\n") or gap.endswith(hard)):
                return None
            enc = self._tok.backend_tokenizer.encode(gap if last else gap + "x", add_special_tokens=False)
            ids, offsets = enc.ids, enc.offsets
            if not last:  # "x" stands for the content: it must start a token of its own right after the gap
                if offsets[-1] != (len(gap), len(gap) + 1):
                    return None
                ids, offsets = ids[:-1], offsets[:-1]
            head = len(gap) - len(lay.gap) if not last and roles[k] == "assistant" else len(gap) + 1
            tail = len(lay.tail) if k and roles[k - 1] == "assistant" else 0
            # the rule of ``masks.span_labels``: a token carries loss when its first character lies in a span
            labels = [i if (a >= head or a < tail) and b > a else IGNORE for i, (a, b) in zip(ids, offsets)]
            pieces.append((ids, labels))
        return pieces

    def propose(self, rows: list[tuple[list[dict], Pieces]]) -> list[Encoded | None]:
        """Each row's sample from its gaps' tokens (``pieces_of``) and its contents' tokens (one batched call for
        every content); None for a row whose contents' tokens do not come apart again."""
        tokens = self._tok.backend_tokenizer
        encode = getattr(tokens, "encode_batch_fast", tokens.encode_batch)  # no offsets needed
        # A row's contents joined by EOS, an added token, which the tokenizer splits at before anything else: one
        # string per row costs less than one per message, and gives the same tokens with EOS between them.
        eos = self._eos_text
        joined = encode([eos.join(m["content"] for m in msgs) for msgs, _ in rows], add_special_tokens=False)
        return [self._assemble(msgs, pieces, enc.ids) for (msgs, pieces), enc in zip(rows, joined)]

    def _assemble(self, messages: list[dict], pieces: Pieces, content_ids: list[int]) -> Encoded | None:
        eos_id = self._eos_id
        parts = _split_at(content_ids, eos_id, len(messages))
        if parts is None:  # BPE made an EOS id
            return None
        ids, labels = [], []
        assistant = False
        for (gap_ids, gap_labels), m, c in zip(pieces, messages, parts):
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
        if assistant and self._composed.composition.layout.append_eos:
            ids.append(eos_id)
            labels.append(eos_id)
        return finish(ids, labels)


def _tokenizer_refusal(tok) -> str:
    """Why this tokenizer's tokens of a composed row cannot be assembled message by message ("": they can).

    With no normalizer and a GPT-2-style byte-level pre-tokenizer, the text is first cut at added tokens (which must
    not strip the whitespace around them), then split by GPT-2's regex, whose matches never hold a line break next
    to a non-whitespace character: a line break or an added token followed by a content's first (non-whitespace)
    character is always a split, as is an added token right after the content. BPE then works within each piece.
    Offsets are untouched (``masks.span_labels`` counts tokens that cover no character as loss-free; trimmed
    offsets make such tokens out of whitespace)."""
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
