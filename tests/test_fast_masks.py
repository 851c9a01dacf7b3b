"""Chat masks from one rendering per conversation (the fast path) and from rows composed without rendering
equal the per-prefix masks and hand-built ones on ChatML, Llama-3-style and Zephyr-style templates; the composed
text is the template's; a template the fast path or the composition cannot handle falls back and says so;
rows tokenised message by message give the whole text's tokens and masks, and a tokenizer or row that does not
allow it is tokenised whole; the one check every fast path goes through asks the reference for the first rows and
falls back to it, for good, when a proposal disagrees; tokenising in several processes gives the same data; a cached
re-run does not re-tokenise."""

import os
import random
from functools import partial

import pytest
from transformers import AutoTokenizer

from conftest import CHATML_TEMPLATE, base_config, chat_rows, write_jsonl
from lmforge.cli import main
from lmforge.config import load_config
from lmforge.data import prepare, split
from lmforge.data.fast_masks import VERIFY_ROWS, FastPath, OneRendering, Piecewise
from lmforge.data.tokenize import COMPOSED, FAST, IGNORE, PER_PREFIX, PIECEWISE, Encoder
from lmforge.models import finalize_tokenizer

LLAMA3 = (
    "{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim"
    " + eos_token }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
ZEPHYR = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ '<|user|>\n' + m['content'] + eos_token + '\n' }}"
    "{% elif m['role'] == 'system' %}{{ '<|system|>\n' + m['content'] + eos_token + '\n' }}"
    "{% elif m['role'] == 'tool' %}{{ '<|tool|>\n' + m['content'] + eos_token + '\n' }}"
    "{% else %}{{ '<|assistant|>\n' + m['content'] + eos_token + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
# Prefix-consistent, but each turn carries its number: the text before an assistant turn is never the same
# twice, so spans cannot be found from one rendering by a fixed layout.
NUMBERED = (
    "{% for m in messages %}{{ '[' ~ loop.index ~ '] ' + m['role'] + ':\n' + m['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '[' ~ (messages | length + 1) ~ '] assistant:\n' }}{% endif %}"
)

CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "name the fox"},
    {"role": "assistant", "content": "the quick fox"},
    {"role": "tool", "content": "fox: 7"},
    {"role": "assistant", "content": "a lazy dog"},
    {"role": "user", "content": "city"},
    {"role": "assistant", "content": "Lyon"},
]
# Hand-written renderings of CHAT as (text, carries loss) segments; {eos} is the tokenizer's EOS.
SEGMENTS = {
    "chatml": [
        ("<|im_start|>system\nbe brief{eos}\n<|im_start|>user\nname the fox{eos}\n<|im_start|>assistant\n", False),
        ("the quick fox{eos}", True),
        ("\n<|im_start|>tool\nfox: 7{eos}\n<|im_start|>assistant\n", False),
        ("a lazy dog{eos}", True),
        ("\n<|im_start|>user\ncity{eos}\n<|im_start|>assistant\n", False),
        ("Lyon{eos}", True),
        ("\n", False),
    ],
    "llama3": [
        ("<|start_header_id|>system<|end_header_id|>\n\nbe brief{eos}<|start_header_id|>user<|end_header_id|>\n\n"
         "name the fox{eos}<|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("the quick fox{eos}", True),
        ("<|start_header_id|>tool<|end_header_id|>\n\nfox: 7{eos}<|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("a lazy dog{eos}", True),
        ("<|start_header_id|>user<|end_header_id|>\n\ncity{eos}<|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("Lyon{eos}", True),
    ],
    "zephyr": [
        ("<|system|>\nbe brief{eos}\n<|user|>\nname the fox{eos}\n<|assistant|>\n", False),
        ("the quick fox{eos}", True),
        ("\n<|tool|>\nfox: 7{eos}\n<|assistant|>\n", False),
        ("a lazy dog{eos}", True),
        ("\n<|user|>\ncity{eos}\n<|assistant|>\n", False),
        ("Lyon{eos}", True),
        ("\n", False),
    ],
    "numbered": [
        ("[1] system:\nbe brief{eos}\n[2] user:\nname the fox{eos}\n[3] assistant:\n", False),
        ("the quick fox{eos}", True),
        ("\n[4] tool:\nfox: 7{eos}\n[5] assistant:\n", False),
        ("a lazy dog{eos}", True),
        ("\n[6] user:\ncity{eos}\n[7] assistant:\n", False),
        ("Lyon{eos}", True),
        ("\n", False),
    ],
}
# SmolLM2-135M-Instruct's own template: a default system prompt when the conversation has none.
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>'"
    " + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen2.5-style tool results: consecutive tool messages share one user turn, so the text between two messages
# depends on both neighbours' roles.
GROUPED_TOOLS = (
    "{% for m in messages %}{% if m['role'] == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{ '<|im_start|>user' }}{% endif %}"
    "{{ '\n<tool_response>\n' + m['content'] + '\n</tool_response>' }}"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{ eos_token + '\n' }}{% endif %}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + eos_token + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Assistant turns are always framed alike (the fast path works) but user turns carry their number: the text
# between messages is not a function of the roles, so rows cannot be composed.
NUMBERED_USERS = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ 'Assistant: ' + m['content'] + eos_token + '\n' }}"
    "{% else %}{{ m['role'] ~ ' ' ~ loop.index ~ ': ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)
# Rewrites contents (escapes ampersands): composing the raw contents would not give the template's text.
ESCAPING = CHATML_TEMPLATE.replace("message['content']", "(message['content'] | replace('&', '&amp;'))")
# Reacts to what a content says: probes cannot see it, the check of the first real row does.
CONTENT_DEPENDENT = CHATML_TEMPLATE.replace(
    "message['content']", "(message['content'] + (' [urgent]' if 'asap' in message['content'] else ''))")
TEMPLATES = {"chatml": CHATML_TEMPLATE, "llama3": LLAMA3, "zephyr": ZEPHYR, "numbered": NUMBERED}
COMPOSABLE = {"chatml": CHATML_TEMPLATE, "smollm2": SMOLLM2, "llama3": LLAMA3, "zephyr": ZEPHYR,
              "grouped_tools": GROUPED_TOOLS}


def _tok(path, template):
    tok = finalize_tokenizer(AutoTokenizer.from_pretrained(path))
    tok.chat_template = template
    return tok


def _hand_built(tok, segments):
    ids, labels = [], []
    for text, loss in segments:
        seg = tok(text.format(eos=tok.eos_token), add_special_tokens=False).input_ids
        ids += seg
        labels += seg if loss else [IGNORE] * len(seg)
    labels[0] = IGNORE
    return ids, labels


def _random_chats(n, seed=0):
    """Multi-turn conversations with optional system prompts and tool turns; contents include the role names
    and markers a careless search would mistake for the template's own."""
    rng = random.Random(seed)
    words = "the fox assistant user system tool [3] : <|im_start|> <|assistant|> \n jumps over a lazy dog".split(" ")
    say = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(1, 8))).strip() or "ok"  # noqa: E731
    chats = []
    for _ in range(n):
        msgs = [{"role": "system", "content": say()}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 4)):
            msgs.append({"role": "user", "content": say()})
            msgs.append({"role": "assistant", "content": say()})
            if rng.random() < 0.3:
                msgs.append({"role": "tool", "content": say()})
                msgs.append({"role": "assistant", "content": say()})
        chats.append(msgs)
    return chats


@pytest.mark.parametrize("name", ["chatml", "llama3", "zephyr", "numbered"])
def test_masks_equal_hand_built_and_per_prefix(tiny_tokenizer_dir, name):
    tok = _tok(tiny_tokenizer_dir, TEMPLATES[name])
    enc = Encoder(tok)
    ids, labels = _hand_built(tok, SEGMENTS[name])
    for got in (enc.chat(CHAT), enc.encode_batch([({"messages": CHAT}, "chat")])[0], enc.chat_per_prefix(CHAT)):
        assert got.input_ids == ids
        assert got.labels == labels
    assert labels[-1 if name == "llama3" else -2] == tok.eos_token_id  # EOS ends the last turn and carries loss
    assert enc.chat_path()[0] == (PER_PREFIX if name == "numbered" else FAST)
    assert enc.mask_counts[FAST] == (0 if name == "numbered" else 2)  # chat() and encode_batch() took the fast path
    assert enc.mask_counts[COMPOSED] == (0 if name == "numbered" else 2)  # ... composed without rendering


@pytest.mark.parametrize("name", ["chatml", "llama3", "zephyr"])
def test_fast_path_equals_per_prefix_on_many_conversations(tiny_tokenizer_dir, name):
    tok = _tok(tiny_tokenizer_dir, TEMPLATES[name])
    enc = Encoder(tok)
    chats = _random_chats(60)
    fast = enc.encode_batch([({"messages": c}, "chat") for c in chats])
    ref = [enc.chat_per_prefix(c) for c in chats]
    assert [(e.input_ids, e.labels) for e in fast] == [(e.input_ids, e.labels) for e in ref]
    assert enc.chat_path() == (FAST, "")
    # rows whose content holds the template's own markers are masked by the per-prefix method; the rest fast
    assert enc.mask_counts[FAST] > 20 and enc.mask_counts[FAST] + enc.mask_counts[PER_PREFIX] == 60


def _composed_or_none(enc, chat):
    return enc._composed.composition.compose(chat)


@pytest.mark.parametrize("name", sorted(COMPOSABLE))
def test_composed_rows_are_the_templates_text_and_masks(tiny_tokenizer_dir, name):
    """Every row the composition builds is exactly the template's rendering, with the per-prefix spans; rows it
    declines (markers in contents, edge whitespace under a trimming template) are rendered and masked the same."""
    tok = _tok(tiny_tokenizer_dir, COMPOSABLE[name])
    enc = Encoder(tok)
    chats = [CHAT, CHAT[1:], CHAT[1:3], [CHAT[1], CHAT[2], CHAT[3], CHAT[3], CHAT[4]]] + _random_chats(80, seed=1)
    fast = enc.encode_batch([({"messages": c}, "chat") for c in chats])
    assert enc.composition() == (True, "")
    assert [(e.input_ids, e.labels) for e in fast] == [
        (e.input_ids, e.labels) for e in (enc.chat_per_prefix(c) for c in chats)]
    composed = 0
    for chat in chats:  # past the first rows and role sequences too, where nothing checks a row at run time
        got = _composed_or_none(enc, chat)
        if got is not None:
            composed += 1
            assert got[:3] == enc.assistant_spans(chat)
    assert composed == enc.mask_counts[COMPOSED] > 15  # many random contents hold markers on purpose
    assert enc.mask_counts[FAST] + enc.mask_counts[PER_PREFIX] == len(chats)


def test_default_system_prompt_is_composed_only_without_a_system_message(tiny_tokenizer_dir):
    enc = Encoder(_tok(tiny_tokenizer_dir, SMOLLM2))
    with_system, without = enc.chat_spans(CHAT)[0], enc.chat_spans(CHAT[1:])[0]
    assert enc.mask_counts[COMPOSED] == 2
    assert "named SmolLM" in without and "named SmolLM" not in with_system
    assert without == enc.render(CHAT[1:]) and with_system == enc.render(CHAT)


def test_trimming_template_renders_rows_with_edge_whitespace(tiny_tokenizer_dir):
    enc = Encoder(_tok(tiny_tokenizer_dir, LLAMA3))
    chat = [{"role": "user", "content": "  name the fox\n"}, {"role": "assistant", "content": "the quick fox \n"}]
    got = enc.chat(chat)
    assert enc.composition()[0] and enc._composed.composition.trims
    assert enc.mask_counts[COMPOSED] == 0  # rendered (the trimmed content is not in the text: per-prefix spans)
    ref = enc.chat_per_prefix(chat)
    assert (got.input_ids, got.labels) == (ref.input_ids, ref.labels)
    ids, labels = _hand_built(enc.tok, [
        ("<|start_header_id|>user<|end_header_id|>\n\nname the fox{eos}<|start_header_id|>assistant<|end_header_id|>"
         "\n\n", False), ("the quick fox{eos}", True)])
    assert (got.input_ids, got.labels) == (ids, labels)
    chatml = Encoder(_tok(tiny_tokenizer_dir, CHATML_TEMPLATE))
    assert chatml.composition()[0] and not chatml._composed.composition.trims


def test_row_with_a_marker_in_its_content_is_rendered_and_masked_right(tiny_tokenizer_dir):
    tok = _tok(tiny_tokenizer_dir, CHATML_TEMPLATE)
    enc = Encoder(tok)
    enc.chat(CHAT)  # a clean row first: composed
    chat = [{"role": "user", "content": "what ends a turn?"},
            {"role": "assistant", "content": f"this: {tok.eos_token}\n<|im_start|>user\nno"}]
    got = enc.chat(chat)
    assert enc.mask_counts[COMPOSED] == 1 and enc.mask_counts[FAST] + enc.mask_counts[PER_PREFIX] == 2
    ids, labels = _hand_built(tok, [
        ("<|im_start|>user\nwhat ends a turn?{eos}\n<|im_start|>assistant\n", False),
        ("this: {eos}\n<|im_start|>user\nno{eos}", True), ("\n", False)])
    assert (got.input_ids, got.labels) == (ids, labels)


@pytest.mark.parametrize("template, path, reason", [
    (NUMBERED, PER_PREFIX, "no fixed layout of assistant turns (the text around assistant turns varies"),
    (NUMBERED_USERS, FAST, "depends on more than their roles"),
    (ESCAPING, FAST, "does not copy message contents verbatim"),
])
def test_template_that_cannot_be_composed_falls_back_and_says_so(tiny_tokenizer_dir, template, path, reason):
    enc = Encoder(_tok(tiny_tokenizer_dir, template))
    chats = [CHAT] + _random_chats(20, seed=2)
    got = enc.encode_batch([({"messages": c}, "chat") for c in chats])
    on, why = enc.composition()
    assert not on and reason in why
    assert enc.chat_path()[0] == path and enc.mask_counts[COMPOSED] == 0
    assert [(e.input_ids, e.labels) for e in got] == [
        (e.input_ids, e.labels) for e in (enc.chat_per_prefix(c) for c in chats)]


def test_composition_that_disagrees_with_a_real_row_turns_off(tiny_tokenizer_dir):
    enc = Encoder(_tok(tiny_tokenizer_dir, CONTENT_DEPENDENT))
    assert enc.composition() == (True, "")  # the probes cannot see it
    chat = [{"role": "user", "content": "reply asap"}, {"role": "assistant", "content": "on it"}]
    got = enc.chat(chat)
    on, why = enc.composition()
    assert not on and "a composed row (user, assistant) differed" in why
    assert enc.render(chat).count("[urgent]") == 1
    ref = enc.chat_per_prefix(chat)
    assert (got.input_ids, got.labels) == (ref.input_ids, ref.labels)
    assert enc.mask_counts[COMPOSED] == 0


# Contents whose edges a tokenizer could merge with the template's text: leading whitespace (tokenised whole),
# punctuation, digits, a contraction, inner blank lines.
EDGES = [" leading space", "  two spaces", "\n\n two lines", "\nleading newline", "'s a contraction", "42 is a number", "...and dots", "tab\there",
         "two\n\nlines\n", "trailing space "]


def _clean_chats(n, edges_after=None, seed=4):
    """Conversations in a few role sequences whose contents hold no marker (so that they are composed); past row
    ``edges_after``, a third of the contents start with one of ``EDGES``."""
    rng = random.Random(seed)
    words = "the fox jumps over a lazy dog , 7 : ! \n".split(" ")
    say = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(1, 9))).strip() or "ok"  # noqa: E731
    chats = []
    for k in range(n):
        roles = ["system"] * (k % 3 == 0) + ["user", "assistant"] * (1 + k % 2) + ["tool", "assistant"] * (k % 5 == 0)
        edge = lambda: rng.choice(EDGES) + " " if edges_after is not None and k >= edges_after and rng.random() < 0.3 \
            else ""  # noqa: E731
        chats.append([{"role": r, "content": edge() + say()} for r in roles])
    return chats


@pytest.fixture(scope="module")
def edge_tokenizer_dir(tmp_path_factory):
    """A tokenizer with merges across the edges in ``EDGES`` (a line break and the spaces after it, as SmolLM2's
    has): there, tokenising a content apart from the line break before it would give other tokens."""
    from conftest import corpus
    from lmforge.models import train_bpe_tokenizer

    out = tmp_path_factory.mktemp("edge-tok")
    texts = corpus() + [f"{w}\n{e} {w}" for w in ("fox", "dog", "the") for e in EDGES] * 20
    train_bpe_tokenizer(texts, vocab_size=500, min_frequency=2, out_dir=out)
    return out


@pytest.mark.parametrize("name", ["chatml", "smollm2", "zephyr", "llama3"])
def test_rows_tokenised_by_message_equal_the_whole_text(edge_tokenizer_dir, name):
    tok = _tok(edge_tokenizer_dir, COMPOSABLE[name])
    assert len(tok("\n  two", add_special_tokens=False).input_ids) < len(tok("  two").input_ids) + 1  # a merge
    enc = Encoder(tok)
    chats = _clean_chats(150, edges_after=60)  # after the checked rows: nothing compares those at run time
    got = enc.encode_batch([({"messages": c}, "chat") for c in chats])
    ref = Encoder(tok)
    assert [(e.input_ids, e.labels) for e in got] == [
        (e.input_ids, e.labels) for e in (ref.chat_per_prefix(c) for c in chats)]
    assert enc.piecewise() == (True, "")
    assert 80 < enc.mask_counts[PIECEWISE] < enc.mask_counts[COMPOSED]  # leading whitespace: tokenised whole


def test_tokenizer_that_normalises_is_not_tokenised_by_message(tiny_tokenizer_dir):
    from tokenizers import normalizers

    tok = _tok(tiny_tokenizer_dir, CHATML_TEMPLATE)
    tok.backend_tokenizer.normalizer = normalizers.NFKC()
    enc = Encoder(tok)
    chats = _clean_chats(30)
    got = enc.encode_batch([({"messages": c}, "chat") for c in chats])
    assert enc.piecewise() == (False, "the tokenizer normalises text")
    assert enc.mask_counts[PIECEWISE] == 0 and enc.mask_counts[COMPOSED] > VERIFY_ROWS
    assert [(e.input_ids, e.labels) for e in got] == [
        (e.input_ids, e.labels) for e in (Encoder(tok).chat_per_prefix(c) for c in chats)]


def test_row_tokenised_by_message_that_differs_turns_it_off(tiny_tokenizer_dir, monkeypatch):
    """The check of the first rows catches pieces that do not add up to the whole text (made wrong here on purpose)."""
    tok = _tok(tiny_tokenizer_dir, CHATML_TEMPLATE)
    real = Piecewise._tokenise_gaps

    def wrong(self, gaps, roles):
        pieces = real(self, gaps, roles)
        ids, labels = pieces[0]
        pieces[0] = (ids[1:], labels[1:])
        return pieces

    monkeypatch.setattr(Piecewise, "_tokenise_gaps", wrong)
    enc = Encoder(tok)
    chat = [{"role": "user", "content": "name the fox"}, {"role": "assistant", "content": "the quick fox"}]
    got = enc.encode_batch([({"messages": chat}, "chat")] * (VERIFY_ROWS + 4))
    on, why = enc.piecewise()
    assert not on and why == "a row (user, assistant) tokenised by message differed from its whole text"
    ref = Encoder(tok).chat_per_prefix(chat)
    assert all((e.input_ids, e.labels) == (ref.input_ids, ref.labels) for e in got)
    assert enc.mask_counts[PIECEWISE] == 0 and enc.mask_counts[COMPOSED] == VERIFY_ROWS + 4


def test_the_shared_check_asks_the_reference_for_the_first_rows_and_each_new_role_sequence():
    """``FastPath.check``, the one check of every fast path, worked by hand on a stub path: the first VERIFY_ROWS
    rows and the first row of a new role sequence go to the reference, later rows do not; a disagreement gives the
    reference's row and turns the path off, naming the row."""
    class Stub(FastPath):
        name = COMPOSED
        differs = "a row ({roles}) differed"

        def _refusal(self):
            return ""

    path, asked = Stub(), []

    def reference(row):
        asked.append(row)
        return row, PER_PREFIX

    two = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    three = two + [{"role": "tool", "content": "t"}]
    for k in range(VERIFY_ROWS + 2):
        assert path.check(k, two, partial(reference, k)) == (k, COMPOSED)
    assert asked == list(range(VERIFY_ROWS))
    assert path.check("proposed", two, partial(reference, "other")) == ("proposed", COMPOSED)  # trusted: not asked
    assert path.check("proposed", three, lambda: ("reference", PER_PREFIX)) == ("reference", PER_PREFIX)
    assert path.state() == (False, "a row (user, assistant, tool) differed")


def test_one_rendering_that_disagrees_with_a_real_row_turns_off(tiny_tokenizer_dir, monkeypatch):
    """The fast path's proposal is made wrong on purpose (one character short): the check of the first row catches
    it, that row and the rest are masked by the per-prefix method, and the reason says so."""
    real = OneRendering.propose

    def wrong(self, messages):
        text, spans, needs_eos = real(self, messages)
        return text, [(spans[0][0], spans[0][1] - 1)] + spans[1:], needs_eos

    monkeypatch.setattr(OneRendering, "propose", wrong)
    enc = Encoder(_tok(tiny_tokenizer_dir, NUMBERED_USERS))  # a layout, but no composition: one rendering a row
    chats = [CHAT] + _random_chats(10, seed=3)
    got = enc.encode_batch([({"messages": c}, "chat") for c in chats])
    assert enc.chat_path() == (PER_PREFIX, "one rendering disagreed with the per-prefix spans on a real row")
    assert enc.mask_counts[FAST] == 0 and enc.mask_counts[PER_PREFIX] == len(chats)
    assert [(e.input_ids, e.labels) for e in got] == [
        (e.input_ids, e.labels) for e in (enc.chat_per_prefix(c) for c in chats)]


def test_template_without_eos_gets_it_appended_on_the_fast_path(tiny_tokenizer_dir):
    tok = _tok(tiny_tokenizer_dir, ZEPHYR.replace(" + eos_token", ""))
    enc = Encoder(tok)
    got = enc.chat(CHAT[:3])
    assert enc.chat_path()[0] == FAST and enc.mask_counts[COMPOSED] == 1
    assert (got.input_ids, got.labels) == (enc.chat_per_prefix(CHAT[:3]).input_ids, enc.chat_per_prefix(CHAT[:3]).labels)
    assert got.input_ids[-1] == tok.eos_token_id and got.labels[-1] == tok.eos_token_id


def test_unsupported_template_falls_back_and_says_so(tmp_path, tiny_model_dir, lmforge_cache):
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}] * 3)
    cfg = load_config(None, tree=base_config(tiny_model_dir, data, tmp_path / "out", data={"max_length": 512}))
    tok = _tok(tiny_model_dir, NUMBERED)
    ds, stats, _ = split.prepare_split(cfg, tok, "train", packed=False)
    lines = "\n".join(stats.lines())
    assert f"chat masks, {data}: per-prefix rendering for all 3 rows" in lines
    assert "varies between turns" in lines
    ids, labels = _hand_built(tok, SEGMENTS["numbered"])
    assert ds[0]["input_ids"] == ids and ds[0]["labels"] == labels
    tok = _tok(tiny_model_dir, CHATML_TEMPLATE)
    _, stats, _ = split.prepare_split(cfg, tok, "train", packed=False)
    lines = "\n".join(stats.lines())
    assert f"chat masks, {data}: fast path (one template rendering per conversation) for all 3 rows; 3 of the fast " \
           "rows composed from the template's layout without rendering" in lines
    _, stats, _ = split.prepare_split(cfg, _tok(tiny_model_dir, ESCAPING), "train", packed=False)
    lines = "\n".join(stats.lines())
    assert f"chat masks, {data}: fast path (one template rendering per conversation) for all 3 rows; none composed (" \
           in lines and "does not copy message contents verbatim" in lines


def test_prepare_says_how_many_rows_were_tokenised_by_message(tmp_path, tiny_model_dir, lmforge_cache):
    from tokenizers import normalizers

    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(48))
    cfg = load_config(None, tree=base_config(tiny_model_dir, data, tmp_path / "out", data={"max_length": 512}))
    tok = _tok(tiny_model_dir, CHATML_TEMPLATE)
    by_message, stats, _ = split.prepare_split(cfg, tok, "train", packed=False)
    assert f"48 of the fast rows composed from the template's layout without rendering, {48 - VERIFY_ROWS} of them " \
           "tokenised message by message (template text tokenised once)" in "\n".join(stats.lines())
    tok.backend_tokenizer.normalizer = normalizers.NFKC()  # changes nothing in these rows, but is not proven safe
    cfg.data.cache_dir = str(tmp_path / "other-cache")
    whole, stats, _ = split.prepare_split(cfg, tok, "train", packed=False)
    assert "48 of the fast rows composed from the template's layout without rendering, none tokenised message by " \
           "message (the tokenizer normalises text)" in "\n".join(stats.lines())
    assert whole.to_dict() == by_message.to_dict()


def _prepare_cfg(tmp_path, tiny_model_dir, n=48):
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(n))
    return data, load_config(None, tree=base_config(tiny_model_dir, data, tmp_path / "out"))


def test_parallel_tokenising_gives_the_same_data(tmp_path, tiny_model_dir, lmforge_cache, monkeypatch):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two cores")
    data, cfg = _prepare_cfg(tmp_path, tiny_model_dir)
    tok = finalize_tokenizer(AutoTokenizer.from_pretrained(tiny_model_dir))
    serial, s_stats, _ = split.prepare_split(cfg, tok, "train", packed=True)
    monkeypatch.setattr(prepare, "PARALLEL_MIN_ROWS", 8)
    monkeypatch.setattr(prepare, "_BATCH", 5)
    cfg.data.cache_dir = str(tmp_path / "other-cache")
    par, p_stats, _ = split.prepare_split(cfg, tok, "train", packed=True)
    assert s_stats.processes == 1 and p_stats.processes == 2
    assert par.to_dict() == serial.to_dict()
    assert (p_stats.tokens, p_stats.loss_tokens, p_stats.masks) == (s_stats.tokens, s_stats.loss_tokens, s_stats.masks)


def test_bad_rows_keep_file_and_line_when_parallel(tmp_path, tiny_model_dir, lmforge_cache, monkeypatch, capsys):
    monkeypatch.setattr(prepare, "PARALLEL_MIN_ROWS", 8)
    rows = chat_rows(30)
    rows[17] = {"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    from conftest import write_config

    cfg = write_config(tmp_path / "c.yaml", base_config(tiny_model_dir, data, tmp_path / "out"))
    assert main(["prepare", str(cfg)]) == 2
    assert f"{data}:18" in capsys.readouterr().err


def test_cached_rerun_does_not_tokenise(tmp_path, tiny_model_dir, lmforge_cache, monkeypatch):
    data, cfg = _prepare_cfg(tmp_path, tiny_model_dir)
    tok = finalize_tokenizer(AutoTokenizer.from_pretrained(tiny_model_dir))
    calls = []
    real = Encoder.encode_batch
    monkeypatch.setattr(Encoder, "encode_batch", lambda self, rows: calls.append(len(rows)) or real(self, rows))
    first, _, path = split.prepare_split(cfg, tok, "train", packed=True)
    assert sum(calls) == 48
    again, stats, path2 = split.prepare_split(cfg, tok, "train", packed=True)
    assert sum(calls) == 48 and path2 == path and stats.rows == 48
    assert again.to_dict() == first.to_dict()
    assert again.cache_files  # memory-mapped from the cache's Arrow files, not loaded into memory
    os.utime(data, ns=(os.stat(data).st_atime_ns, os.stat(data).st_mtime_ns + 10**9))  # the file changed: rebuild
    _, _, path3 = split.prepare_split(cfg, tok, "train", packed=True)
    assert sum(calls) == 96 and path3 != path


@pytest.mark.parametrize("chat_template", [False, True])
def test_batched_encoding_equals_one_row_at_a_time(tiny_tokenizer_dir, chat_template):
    tok = _tok(tiny_tokenizer_dir, CHATML_TEMPLATE)
    rows = [({"text": "the quick brown fox"}, "text"), ({"prompt": "name the fox:", "completion": " the quick fox"},
            "prompt_completion"), ({"messages": CHAT}, "chat"), ({"text": "a lazy dog"}, "text")]
    batched = Encoder(tok, apply_chat_template=chat_template).encode_batch(rows)
    one = Encoder(tok, apply_chat_template=chat_template)
    assert batched == [one.encode(row, fmt) for row, fmt in rows]
