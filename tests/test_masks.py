"""Loss masks equal hand-built ones: prompt/completion, and a 3-turn chat under two chat templates."""

import pytest
from transformers import AutoTokenizer

from lmforge.data.tokenize import IGNORE, Encoder
from lmforge.models import finalize_tokenizer

# A template of another family (Zephyr-like): different markers, EOS after every assistant turn only.
ZEPHYR = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ '<|user|>\n' + m['content'] + '\n' }}"
    "{% elif m['role'] == 'system' %}{{ '<|system|>\n' + m['content'] + '\n' }}"
    "{% else %}{{ '<|assistant|>\n' + m['content'] + eos_token + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "name the fox"},
    {"role": "assistant", "content": "the quick fox"},
    {"role": "user", "content": "and the dog"},
    {"role": "assistant", "content": "a lazy dog"},
    {"role": "user", "content": "city"},
    {"role": "assistant", "content": "Lyon"},
]


def _tok(path):
    return finalize_tokenizer(AutoTokenizer.from_pretrained(path))


def test_prompt_completion_mask(tiny_tokenizer_dir):
    tok = _tok(tiny_tokenizer_dir)
    enc = Encoder(tok).prompt_completion("name the fox:", " the quick fox")
    p = tok("name the fox:", add_special_tokens=False).input_ids
    c = tok(" the quick fox", add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert enc.input_ids == p + c
    assert enc.labels == [IGNORE] * len(p) + c
    assert enc.labels[-1] == tok.eos_token_id  # EOS ends the completion and carries loss


def _hand_built_chat(tok, turns_text: list[tuple[str, bool]]):
    """Tokenise segment by segment; segments flagged True carry loss."""
    ids, labels = [], []
    for text, loss in turns_text:
        seg = tok(text, add_special_tokens=False).input_ids
        ids += seg
        labels += seg if loss else [IGNORE] * len(seg)
    labels[0] = IGNORE
    return ids, labels


# Hand-written renderings of CHAT, as (text, carries loss) segments; {eos} stands for the tokenizer's EOS.
CHATML_SEGMENTS = [
    ("<|im_start|>system\nbe brief{eos}\n<|im_start|>user\nname the fox{eos}\n<|im_start|>assistant\n", False),
    ("the quick fox{eos}", True),
    ("\n<|im_start|>user\nand the dog{eos}\n<|im_start|>assistant\n", False),
    ("a lazy dog{eos}", True),
    ("\n<|im_start|>user\ncity{eos}\n<|im_start|>assistant\n", False),
    ("Lyon{eos}", True),
    ("\n", False),
]
ZEPHYR_SEGMENTS = [
    ("<|system|>\nbe brief\n<|user|>\nname the fox\n<|assistant|>\n", False),
    ("the quick fox{eos}", True),
    ("\n<|user|>\nand the dog\n<|assistant|>\n", False),
    ("a lazy dog{eos}", True),
    ("\n<|user|>\ncity\n<|assistant|>\n", False),
    ("Lyon{eos}", True),
    ("\n", False),
]


@pytest.mark.parametrize("template,segments", [(None, CHATML_SEGMENTS), (ZEPHYR, ZEPHYR_SEGMENTS)],
                         ids=["chatml", "zephyr"])
def test_chat_mask_equals_hand_built(tiny_tokenizer_dir, template, segments):
    tok = _tok(tiny_tokenizer_dir)
    if template is not None:
        tok.chat_template = template  # None: our trained tokenizer's ChatML, which ends every turn with EOS
    ids, labels = _hand_built_chat(tok, [(text.format(eos=tok.eos_token), loss) for text, loss in segments])
    enc = Encoder(tok).chat(CHAT)
    assert enc.input_ids == ids
    assert enc.labels == labels


def test_chat_template_without_eos_gets_one_appended(tiny_tokenizer_dir):
    tok = _tok(tiny_tokenizer_dir)
    tok.chat_template = ZEPHYR.replace(" + eos_token", "")
    enc = Encoder(tok).chat(CHAT[:3])
    assert enc.input_ids[-1] == tok.eos_token_id and enc.labels[-1] == tok.eos_token_id
    carried = [i for i, l in zip(enc.input_ids, enc.labels) if l != IGNORE]
    assert tok.decode(carried).startswith("the quick fox")
