"""The example's rewards, verifiable in a few lines each. TRL's signature: they work unchanged in TRL's GRPOTrainer.

``completions`` are [{"role": "assistant", "content": text}] lists because the prompts are message lists;
``answer`` is the data rows' column of that name. Both rewards need the right sum: a reward for the format alone
(any lone number) is learnt first and then pays for wrong answers.
"""

import re


def _text(completion) -> str:
    return completion[0]["content"] if isinstance(completion, list) else completion


def correct(prompts, completions, answer, **kwargs) -> list[float]:
    """1 when the last number in the answer is the right sum ("12 + 5 = 17" counts)."""
    out = []
    for completion, expected in zip(completions, answer):
        numbers = re.findall(r"-?\d+", _text(completion))
        out.append(1.0 if numbers and numbers[-1] == expected else 0.0)
    return out


def just_the_number(prompts, completions, answer, **kwargs) -> list[float]:
    """1 when the answer is the right sum and nothing else, as the prompt asks."""
    return [1.0 if _text(c).strip().rstrip(".") == expected else 0.0 for c, expected in zip(completions, answer)]
