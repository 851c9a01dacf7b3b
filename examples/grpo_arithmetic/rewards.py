"""The example's rewards, verifiable in a few lines each. TRL's signature: they work unchanged in TRL's GRPOTrainer.

``completions`` are [{"role": "assistant", "content": text}] lists because the prompts are message lists;
``answer`` is the data rows' column of that name.
"""

import re


def _text(completion) -> str:
    return completion[0]["content"] if isinstance(completion, list) else completion


def correct(prompts, completions, answer, **kwargs) -> list[float]:
    """1 when the first number in the answer is the right sum."""
    out = []
    for completion, expected in zip(completions, answer):
        numbers = re.findall(r"-?\d+", _text(completion))
        out.append(1.0 if numbers and numbers[0] == expected else 0.0)
    return out


def just_the_number(prompts, completions, **kwargs) -> list[float]:
    """1 when the answer is a number and nothing else, as the prompt asks."""
    return [1.0 if re.fullmatch(r"\s*-?\d+\.?\s*", _text(c)) else 0.0 for c in completions]
