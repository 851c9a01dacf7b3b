"""Reward models (Bradley-Terry): a causal LM with a one-output score head, trained on preference pairs.

The model is transformers' ``AutoModelForSequenceClassification`` with ``num_labels=1``: the decoder and a
linear ``score`` head read at each sequence's last non-padding token. Full weights, or LoRA with PEFT's
``SEQ_CLS`` task type (the ``score`` head is then trained and saved beside the adapter). The output directory
loads with plain ``AutoModelForSequenceClassification.from_pretrained(out)`` or, for an adapter,
``peft.AutoPeftModelForSequenceClassification.from_pretrained(out)``; the tokenizer is saved beside it.

Training runs on TRL's RewardTrainer (``train.engine: hf``; the native engine runs the generative methods), so
the loss and the metrics are TRL's: per pair ``-log sigmoid(r_chosen - r_rejected - margin)``, averaged over
the batch, plus ``reward.center_coefficient * mean((r_chosen + r_rejected)^2)`` when set; logged ``accuracy``
(chosen scored above rejected), ``margin`` (mean r_chosen - r_rejected), ``min_reward`` / ``mean_reward`` /
``max_reward``, ``eval_``-prefixed at evaluation. lmforge supplies the data (prompt + answer rendered as SFT
renders them, ``data/preference.py``; a row's optional ``margin``), the checkpoints, resume and outputs.
"""

from __future__ import annotations

from trl import RewardConfig, RewardTrainer
from trl.trainer.reward_trainer import DataCollatorForPreference

from lmforge.config import Config
from lmforge.data.preference import reward_sequences
from lmforge.models import ScoreModel
from lmforge.training import preference
from lmforge.training.checkpoint import LmforgeTrainerMixin
from lmforge.training.preference import PreferenceRun, TokenCountingMixin
from lmforge.training.run import load_model_and_tokenizer, trainer_hooks, training_args


def load_reward_model(cfg: Config):
    """(model with its adapter, tokenizer, precision): the score model, its pad token id set so the head reads
    each sequence's last real token."""
    model, tokenizer, prec = load_model_and_tokenizer(cfg, auto_class=ScoreModel.with_seed(cfg.train.seed),
                                                      task_type="SEQ_CLS")
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, prec


class RewardCollator:
    """lmforge's reward records (prompt, answers and margin apart) -> TRL's batch: the chosen sequences, then the
    rejected ones, right-padded, with ``margin`` (B,)."""

    def __init__(self, pad_token_id: int):
        self.collate = DataCollatorForPreference(pad_token_id=pad_token_id)

    def __call__(self, records: list[dict]) -> dict:
        return self.collate([reward_sequences(r) for r in records])


class LmforgeRewardTrainer(TokenCountingMixin, LmforgeTrainerMixin, RewardTrainer):
    """TRL's RewardTrainer with lmforge's checkpoints, sampler and token counting."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # lmforge already tokenised the pairs and fitted them to data.max_length (data/preference.py)
        return dataset


def reward_args(cfg: Config, prec, has_eval: bool) -> RewardConfig:
    return training_args(cfg, prec, has_eval, args_cls=RewardConfig,
                         center_rewards_coefficient=cfg.reward.center_coefficient, max_length=None,
                         disable_dropout=True)


def build_trainer(cfg: Config, run: PreferenceRun) -> LmforgeRewardTrainer:
    return LmforgeRewardTrainer(
        model=run.model, args=reward_args(cfg, run.prec, has_eval=run.eval_ds is not None),
        data_collator=RewardCollator(run.tokenizer.pad_token_id), train_dataset=run.train_ds,
        eval_dataset=run.eval_ds, processing_class=run.tokenizer, lmforge=trainer_hooks(cfg),
    )


def _no_native(cfg: Config, run: PreferenceRun):
    raise AssertionError("method reward runs on the hf engine (plan.NATIVE_METHODS)")


def train(cfg: Config):
    return preference.train(cfg, _no_native, build_trainer, load=load_reward_model)
