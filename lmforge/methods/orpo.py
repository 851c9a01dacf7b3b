"""Odds Ratio Preference Optimization on TRL's ORPOTrainer (``trl.experimental.orpo`` in TRL 1.16).

ORPO needs no reference model: the loss is the chosen answer's NLL minus ``orpo.beta`` times the log-sigmoid
of the log odds ratio between chosen and rejected. Loss and metrics (``rewards/...``, ``logps/...``,
``nll_loss``, ``log_odds_ratio``, ``log_odds_chosen``) are TRL's.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # ORPO only exists under trl.experimental in TRL 1.x

from trl.experimental.orpo import ORPOConfig, ORPOTrainer  # noqa: E402

from lmforge.config import Config  # noqa: E402
from lmforge.data.tokenize import IGNORE  # noqa: E402
from lmforge.training.checkpoint import LmforgeTrainerMixin  # noqa: E402
from lmforge.training.preference import TokenCountingMixin, setup  # noqa: E402
from lmforge.training.run import run_trainer, trainer_hooks, training_args  # noqa: E402


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


def train(cfg: Config):
    run = setup(cfg)
    return run_trainer(build_trainer(cfg, run), cfg, run.tokenizer, run.resume, run.data_lines)
