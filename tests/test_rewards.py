"""GRPO's rewards (``lmforge/training/rewards.py``): functions loaded from a module or a file and called with TRL's
arguments, None -> NaN, the weighted nansum total, async functions run concurrently, every bad value or spec
stopped with the function's name and the data row, and a reward model scoring as ``score_sequences`` does."""

from __future__ import annotations

import asyncio
import math
import textwrap

import pytest
import torch

from lmforge.config import GrpoReward
from lmforge.data.preference import encode_side
from lmforge.data.tokenize import Encoder
from lmforge.errors import ConfigError, DataError
from lmforge.inference.score import conversation_ids, score_sequences
from lmforge.training.rewards import Rewards

ORIGINS = ["train.jsonl:1", "train.jsonl:1", "train.jsonl:2", "train.jsonl:2"]
COLUMNS = [{"answer": "5"}, {"answer": "5"}, {"answer": "7", "level": 2}, {"answer": "7", "level": 2}]
PROMPTS = ["2+3=", "2+3=", "3+4=", "3+4="]
COMPLETIONS = ["5", "six", "7!", ""]
IDS = [[10], [11, 12], [13, 14], []]


def _write(path, source: str):
    path.write_text(textwrap.dedent(source))
    return path


def _score(rewards: Rewards, prompts=PROMPTS, completions=COMPLETIONS):
    return rewards.score(prompts, completions, IDS, COLUMNS, ORIGINS)


@pytest.fixture()
def module_dir(tmp_path, monkeypatch):
    """A module ``rw_<test>`` importable as 'rw_<test>:fn' and the same source as a file, for one test."""
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_functions_from_a_module_and_a_file_weights_names_and_none(module_dir):
    _write(module_dir / "rw_basic.py", """
        def exact(completions, answer, **kwargs):
            return [float(c == a) for c, a in zip(completions, answer)]
    """)
    _write(module_dir / "file_rewards.py", """
        def length(completions, **kwargs):  # None: does not apply to an empty completion
            return [len(c) if c else None for c in completions]

        exact = length
    """)
    specs = [GrpoReward(function="rw_basic:exact", weight=2.0),
             GrpoReward(function="file_rewards.py:length", weight=0.5),
             GrpoReward(function=str(module_dir / "file_rewards.py") + ":exact")]  # absolute path, a clashing name
    rewards = Rewards(specs, tokenizer=None, base_dir=module_dir)
    assert rewards.names == ["exact", "length", "length_2"]
    assert rewards.weights.dtype == torch.float64 and rewards.weights.tolist() == [2.0, 0.5, 1.0]
    per = _score(rewards)
    assert per.dtype == torch.float64 and per.shape == (4, 3)
    assert per[:, 0].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert per[:3, 1].tolist() == [1.0, 3.0, 2.0] and math.isnan(per[3, 1]) and math.isnan(per[3, 2])
    assert rewards.total(per).tolist() == [2.0 + 0.5 + 1.0, 1.5 + 3.0, 1.0 + 2.0, 0.0]


def test_total_is_the_weighted_nansum_and_nan_only_where_every_reward_is_nan(module_dir):
    _write(module_dir / "rw_total.py", "def a(**kw): return []\ndef b(**kw): return []\n")
    rewards = Rewards([GrpoReward(function="rw_total:a", weight=2.0), GrpoReward(function="rw_total:b", weight=-1.0)],
                      None, module_dir)
    nan = math.nan
    per = torch.tensor([[1.0, 3.0], [nan, 3.0], [0.5, nan], [nan, nan]], dtype=torch.float64)
    total = rewards.total(per)
    assert total.dtype == torch.float64
    assert total[:3].tolist() == [2.0 - 3.0, -3.0, 1.0] and math.isnan(total[3])


def test_columns_arrive_as_lists_and_chat_completions_as_assistant_messages(module_dir):
    _write(module_dir / "rw_seen.py", """
        SEEN = {}

        def record(prompts, completions, completion_ids, trainer_state, **columns):
            SEEN.update(prompts=prompts, completions=completions, completion_ids=completion_ids,
                        trainer_state=trainer_state, columns=columns)
            return [0.0] * len(prompts)
    """)
    import rw_seen

    rewards = Rewards([GrpoReward(function="rw_seen:record")], None, module_dir)
    _score(rewards)
    assert rw_seen.SEEN["prompts"] == PROMPTS and rw_seen.SEEN["completions"] == COMPLETIONS
    assert rw_seen.SEEN["completion_ids"] == IDS and rw_seen.SEEN["trainer_state"] is None
    assert rw_seen.SEEN["columns"] == {"answer": ["5", "5", "7", "7"], "level": [None, None, 2, 2]}

    chat = [[{"role": "user", "content": p}] for p in PROMPTS]
    _score(rewards, prompts=chat)
    assert rw_seen.SEEN["prompts"] == chat
    assert rw_seen.SEEN["completions"] == [[{"role": "assistant", "content": c}] for c in COMPLETIONS]


def test_async_functions_run_concurrently(module_dir):
    # A waits for an event only B sets: run one after the other, A would time out (and the test fail)
    _write(module_dir / "rw_async.py", """
        import asyncio

        EVENT = None

        async def waits(completions, **kwargs):
            await asyncio.wait_for(EVENT.wait(), 5)
            return [1.0] * len(completions)

        async def sets(completions, **kwargs):
            await asyncio.sleep(0)
            EVENT.set()
            return [2.0] * len(completions)

        def plain(completions, **kwargs):
            return [3.0] * len(completions)
    """)
    import rw_async

    rw_async.EVENT = asyncio.Event()
    rewards = Rewards([GrpoReward(function=f"rw_async:{n}") for n in ("waits", "plain", "sets")], None, module_dir)
    assert _score(rewards).tolist() == [[1.0, 3.0, 2.0]] * 4


BAD_FUNCTIONS = {
    "raises": ("def raises(completions, **kw):\n    raise KeyError('no such answer')\n",
               "raised KeyError: 'no such answer'", "train.jsonl:1, train.jsonl:1, train.jsonl:2 and 1 more"),
    "short": ("def short(completions, **kw):\n    return [1.0] * 3\n",
              "returned 3 values for 4 completions", "train.jsonl:1"),
    "text": ("def text(completions, **kw):\n    return [1.0, 1.0, 'abc', 1.0]\n",
             "returned 'abc' (str) for completion 2", "row train.jsonl:2"),
    "flag": ("def flag(completions, **kw):\n    return [True, 1.0, 1.0, 1.0]\n",
             "returned True (bool) for completion 0", "row train.jsonl:1"),
    "nan": ("def nan(completions, **kw):\n    return [1.0, float('nan'), 1.0, 1.0]\n",
            "returned nan for completion 1", "row train.jsonl:1"),
    "inf": ("def inf(completions, **kw):\n    return [1.0, 1.0, 1.0, float('inf')]\n",
            "returned inf for completion 3", "row train.jsonl:2"),
    "scalar": ("def scalar(completions, **kw):\n    return 1.0\n",
               "returned a float, not a list", "train.jsonl:1"),
    "async_raises": ("async def async_raises(completions, **kw):\n    raise ValueError('judge down')\n",
                     "raised ValueError: judge down", "train.jsonl:2"),
}


@pytest.mark.parametrize("name", BAD_FUNCTIONS)
def test_a_bad_function_stops_with_its_name_the_reason_and_the_row(module_dir, name):
    source, reason, rows = BAD_FUNCTIONS[name]
    _write(module_dir / "bad.py", "def fine(completions, **kw):\n    return [0.0] * len(completions)\n\n" + source)
    rewards = Rewards([GrpoReward(function="bad.py:fine"), GrpoReward(function=f"bad.py:{name}")], None, module_dir)
    with pytest.raises(DataError) as e:
        _score(rewards)
    message = str(e.value)
    assert f"grpo.rewards[1] ({name})" in message and reason in message and rows in message
    assert "\n" not in message


@pytest.mark.parametrize("spec, reason", [
    ("missing.py:fn", "missing.py does not exist"),
    ("specs.py:nothing", "specs.py has no attribute 'nothing'"),
    ("specs.py:VALUE", "specs.py:VALUE is not callable (int)"),
    ("specs.py", "must be 'package.module:fn'"),
    ("broken.py:fn", "cannot import broken.py (ZeroDivisionError: division by zero)"),
    ("no_such_module_xyz:fn", "cannot import no_such_module_xyz (ModuleNotFoundError"),
])
def test_a_bad_spec_is_a_config_error_naming_the_key(module_dir, spec, reason):
    _write(module_dir / "specs.py", "VALUE = 3\n")
    _write(module_dir / "broken.py", "1 / 0\n")
    with pytest.raises(ConfigError) as e:
        Rewards([GrpoReward(function=spec)], None, module_dir)
    assert str(e.value).startswith("grpo.rewards[0].function: ") and reason in str(e.value)


# ------------------------------------------------------------------------------------------ reward models
@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny Llama with a one-label score head (untrained: only the scoring path is under test)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1,
                                                               pad_token_id=tok.pad_token_id)
    out = tmp_path_factory.mktemp("runs") / "fox-rm"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_a_reward_model_scores_as_score_sequences_does(reward_model_dir, module_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _write(module_dir / "rw_len.py", "def n(completions, **kw):\n    return [1.0] * len(completions)\n")
    rewards = Rewards([GrpoReward(function="rw_len:n"), GrpoReward(model=reward_model_dir.name, weight=0.5)], None,
                      reward_model_dir.parent)  # a directory relative to base_dir
    assert rewards.names == ["n", "rm_fox-rm"]

    tok = AutoTokenizer.from_pretrained(reward_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir, dtype=torch.float32).eval()
    enc = Encoder(tok)
    chat = [[{"role": "user", "content": p}] for p in PROMPTS]
    completions = ["the quick brown fox", "a dog", "the lazy dog jumps", "fox"]
    for prompts in (PROMPTS, chat):
        if prompts is chat:
            seqs = [conversation_ids(enc, p + [{"role": "assistant", "content": c}])
                    for p, c in zip(prompts, completions)]
        else:
            seqs = [sum(encode_side(enc, p, c), []) for p, c in zip(prompts, completions)]
        expected = score_sequences(model, tok.pad_token_id, seqs)
        per = _score(rewards, prompts, completions)
        assert per[:, 1].tolist() == pytest.approx(expected, abs=1e-5)
        assert len(set(expected)) == 4  # the head tells the completions apart
        assert rewards.total(per).tolist() == pytest.approx([1.0 + 0.5 * x for x in expected], abs=1e-5)


def test_a_generative_model_is_refused_as_a_reward_model(tiny_model_dir):
    with pytest.raises(ConfigError) as e:
        Rewards([GrpoReward(model=str(tiny_model_dir))], None, tiny_model_dir)
    assert str(e.value).startswith("grpo.rewards[0].model: ") and "is not a reward model" in str(e.value)
