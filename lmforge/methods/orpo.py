"""Odds Ratio Preference Optimization: on the native engine (the default where it can run the config) or on
TRL's ORPOTrainer (``trl.experimental.orpo`` in TRL 1.16, ``train.engine: hf``).

ORPO needs no reference model. Its loss, as TRL 1.16 computes it, has two terms:
  * the NLL of the chosen side, a mean over its tokens: TRL puts it on the whole prompt + chosen sequence (every
    token but the first), not on the answer alone;
  * minus ``orpo.beta`` times the log-sigmoid of the log odds ratio between chosen and rejected, where each
    side's log-odds come from its *average* per-token log-probability: log(p / (1 - p)) with log p the mean
    answer-token log-prob, log(1 - p) computed by TRL's ``log1mexp``.
Metrics are TRL's: ``rewards/chosen`` and ``rewards/rejected`` (beta times the average log-probs),
``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected`` (average log-probs),
``nll_loss``, ``log_odds_ratio`` (the mean log-sigmoid) and ``log_odds_chosen`` (the mean log odds ratio).

The native engine packs each pair as one sample ``[prompt, chosen, rejected]`` with the prompt computed once
(``data/preference.py:SharedPromptCollator``); the LM head runs on the positions that predict a prompt token
(for the NLL) or an answer token. Each term is averaged over its own units of the whole optimizer step (the
odds-ratio term over pairs, the NLL over tokens), so 1 x 8 pairs == 8 x 1 with accumulation == 2 processes x
4, and one step of one micro-batch is exactly TRL's loss on that batch (tests/test_orpo.py). TRL's own
trainer instead averages each micro-batch's loss over its micro-batches. TRL's ``logits/chosen`` and
``logits/rejected`` (means over padded vocabulary rows) have no counterpart on the native engine.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # ORPO only exists under trl.experimental in TRL 1.x

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from trl.experimental.orpo import ORPOConfig, ORPOTrainer  # noqa: E402
from trl.experimental.orpo.orpo_trainer import log1mexp  # noqa: E402

from lmforge.config import Config  # noqa: E402
from lmforge.data.tokenize import IGNORE  # noqa: E402
from lmforge.training.checkpoint import LmforgeTrainerMixin  # noqa: E402
from lmforge.training.objective import Objective  # noqa: E402
from lmforge.data.preference import SharedPromptCollator  # noqa: E402
from lmforge.training import preference  # noqa: E402
from lmforge.training.preference import TokenCountingMixin, answer_sums, pair_attention, token_logps  # noqa: E402
from lmforge.training.run import trainer_hooks, training_args  # noqa: E402


# --------------------------------------------------------------------------------------------- the loss
def log_odds_ratio(logps: torch.Tensor) -> torch.Tensor:
    """(B,) log odds of chosen minus log odds of rejected, from (B, 2) *average* answer log-probs; log(1 - p)
    is TRL's numerically stable ``log1mexp`` (ORPOTrainer.odds_ratio_loss)."""
    chosen, rejected = logps[:, 0], logps[:, 1]
    return (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))


def orpo_loss(logps: torch.Tensor, nll_sum: torch.Tensor, nll_tokens: int, beta: float) -> torch.Tensor:
    """TRL 1.16's ORPO loss of one batch: ``nll_sum / nll_tokens - beta * mean(logsigmoid(log odds ratio))``.

    ``logps`` (B, 2): average answer-token log-probs (chosen, rejected); ``nll_sum``: the summed negative
    log-likelihood of the chosen sides' tokens (prompt included, as TRL); ``nll_tokens``: how many tokens that
    is. The native engine sums both terms over a whole step and divides each by the step's units
    (``ORPOObjective``); on one micro-batch that is this function.
    """
    return nll_sum / max(nll_tokens, 1) - beta * F.logsigmoid(log_odds_ratio(logps)).mean()


# --------------------------------------------------------------------------------------------- hf engine
def orpo_columns(record: dict) -> dict:
    """lmforge's prompt/chosen/rejected ids -> the columns TRL's ORPO collator pads (labels IGNORE on the prompt)."""
    prompt = record["prompt_ids"]
    out = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
    for side in ("chosen", "rejected"):
        answer = record[f"{side}_ids"]
        out[f"{side}_input_ids"] = prompt + answer
        out[f"{side}_attention_mask"] = [1] * (len(prompt) + len(answer))
        out[f"{side}_labels"] = [IGNORE] * len(prompt) + answer
    return out


class LmforgeORPOTrainer(TokenCountingMixin, LmforgeTrainerMixin, ORPOTrainer):
    """TRL's ORPOTrainer with lmforge's checkpoints, sampler and token counting."""

    def tokenize_row(self, feature, model=None):
        # Rows arrive tokenised by lmforge with the SFT chat template and already truncated
        # (data/preference.py); ORPO's own tokenize_row expects text and would tokenise it again.
        return orpo_columns(feature)


def orpo_args(cfg: Config, prec, has_eval: bool) -> ORPOConfig:
    return training_args(cfg, prec, has_eval, args_cls=ORPOConfig, beta=cfg.orpo.beta,
                         max_length=cfg.data.max_length, disable_dropout=True)


def build_trainer(cfg: Config, run) -> LmforgeORPOTrainer:
    trainer = LmforgeORPOTrainer(
        model=run.model, args=orpo_args(cfg, run.prec, has_eval=run.eval_ds is not None),
        train_dataset=run.train_ds, eval_dataset=run.eval_ds, processing_class=run.tokenizer,
        lmforge=trainer_hooks(cfg),
    )
    return trainer


# --------------------------------------------------------------------------------------------- native engine
class ORPOObjective(Objective):
    """What the native engine's loop asks of a method (see ``training/native.py``): two loss terms, the
    odds-ratio term summed over pairs and the NLL summed over the chosen sides' tokens, each averaged over the
    whole step's units of its own kind; metrics per pair, ``nll_loss`` per NLL token."""

    unit = ("pairs", "nll tokens")
    perplexity = False  # eval_loss is ORPO's loss, not a token NLL
    stat_keys = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen")
    stat_units = {"nll_loss": 1}  # index into ``unit``; the others are per pair

    def __init__(self, cfg: Config, collator):
        self.beta, self.collator = cfg.orpo.beta, collator

    def batch(self, split: str, rows: list[int], records: list[dict]) -> dict:
        batch = self.collator(records)
        batch.update(split=split, rows=torch.tensor(rows))
        return batch

    def count(self, batch: dict) -> tuple[int, int]:
        """(pairs, NLL tokens): the prompt's tokens but its first, and the chosen answer's predicted tokens."""
        chosen_tokens = int((batch["answer_index"] % 2 == 0).sum())
        return len(batch["rows"]), len(batch["prompt_targets"]) + chosen_tokens

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        n = len(batch["pred_index"])  # answer tokens first, then the prompt tokens the NLL also covers
        logps = token_logps(model, batch, torch.cat([batch["pred_index"], batch["prompt_pred_index"]]),
                            torch.cat([batch["targets"], batch["prompt_targets"]]))
        answers, prompts = logps[:n], logps[n:]
        predicted = torch.bincount(batch["answer_index"], minlength=len(batch["answer_lengths"]))  # (2B,)
        average = (answer_sums(batch, answers) / predicted.clamp(min=1)).view(-1, 2)  # (B, 2): chosen, rejected
        nll = -(answers[batch["answer_index"] % 2 == 0].sum() + prompts.sum())
        odds = log_odds_ratio(average)  # (B,)
        ratio = F.logsigmoid(odds)
        terms = torch.stack([-self.beta * ratio.sum(), nll])  # summed over pairs, over NLL tokens
        with torch.no_grad():
            rewards = self.beta * average.detach()  # (B, 2)
            stats = torch.stack([rewards[:, 0].sum(), rewards[:, 1].sum(), (rewards[:, 0] > rewards[:, 1]).sum(),
                                 (rewards[:, 0] - rewards[:, 1]).sum(), average[:, 0].sum(), average[:, 1].sum(),
                                 nll, ratio.sum(), odds.sum()])
        return terms, dict(zip(self.stat_keys, stats.tolist()))


def train_native(cfg: Config, run):
    objective = ORPOObjective(cfg, SharedPromptCollator(pair_attention(run.model), prompt_loss=True))
    return preference.train_native(cfg, run, objective)


def train(cfg: Config):
    return preference.train(cfg, train_native, build_trainer)
