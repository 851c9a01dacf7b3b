"""Reward models (Bradley-Terry): a causal LM with a one-output score head, trained on preference pairs.

The model is transformers' ``AutoModelForSequenceClassification`` with ``num_labels=1``: the decoder and a
linear ``score`` head read at each sequence's last non-padding token. Full weights, or LoRA with PEFT's
``SEQ_CLS`` task type (the ``score`` head is then trained and saved beside the adapter). The output directory
loads with plain ``AutoModelForSequenceClassification.from_pretrained(out)`` or, for an adapter,
``peft.AutoPeftModelForSequenceClassification.from_pretrained(out)``; the tokenizer is saved beside it.

The loss is TRL 1.16's RewardTrainer's on both engines: per pair ``-log sigmoid(r_chosen - r_rejected - margin)``,
plus ``reward.center_coefficient * (r_chosen + r_rejected)^2`` when set, averaged over the pairs (``reward_loss``).
lmforge supplies the data (prompt + answer rendered as SFT renders them, ``data/preference.py``; a row's optional
``margin``), the checkpoints, resume and outputs.

Native engine (the default): ``RewardObjective`` packs each pair as one sample ``[prompt, chosen, rejected]``
(``SharedPromptCollator``: the prompt runs once, each answer attends to the prompt and itself), runs the decoder
once over the micro-batch's row and the ``score`` head only at the 2B positions transformers would read
(``score_positions``). The loss is a sum over pairs divided by the pairs of the whole step, so 1 x 8 == 8 x 1 with
accumulation. Metrics, under TRL's names: ``accuracy`` (chosen scored above rejected), ``margin`` (mean
r_chosen - r_rejected) and ``mean_reward`` (mean over both answers), each a sum over pairs divided by the step's
pairs. TRL's ``min_reward`` / ``max_reward`` are hf-engine only: a min or max is no sum, and TRL's (the mean of
per-micro-batch extremes) changes with the accumulation split, which the native engine promises not to.

hf engine (``train.engine: hf``): TRL's RewardTrainer on right-padded ``prompt + answer`` rows (``RewardCollator``),
logging TRL's metrics, ``min_reward`` and ``max_reward`` included; ``eval_``-prefixed at evaluation on both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft import PeftModel
from trl import RewardConfig, RewardTrainer
from trl.trainer.reward_trainer import DataCollatorForPreference

from lmforge.config import Config
from lmforge.data.preference import SharedPromptCollator, reward_sequences
from lmforge.models import ScoreModel
from lmforge.training import preference
from lmforge.training.checkpoint import LmforgeTrainerMixin
from lmforge.training.objective import Objective
from lmforge.training.preference import PreferenceRun, TokenCountingMixin, pair_attention
from lmforge.training.run import load_model_and_tokenizer, trainer_hooks, training_args


def load_reward_model(cfg: Config):
    """(model with its adapter, tokenizer, precision): the score model, its pad token id set so the head reads
    each sequence's last real token."""
    model, tokenizer, prec = load_model_and_tokenizer(cfg, auto_class=ScoreModel.with_seed(cfg.train.seed),
                                                      task_type="SEQ_CLS")
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, prec


# --------------------------------------------------------------------------------------------- the loss
def reward_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor,
                center: float | None) -> torch.Tensor:
    """(B,) per-pair losses of TRL 1.16's RewardTrainer from (B,) chosen and rejected rewards and (B,) margins
    (0 where a row has none): TRL's batch loss is their mean, its centring term ``center * mean((r_c + r_r)^2)``
    being the mean of the per-pair terms here. The native engine sums them over a step and divides by its pairs."""
    losses = -F.logsigmoid(chosen - rejected - margin)
    if center is not None:
        losses = losses + center * (chosen + rejected) ** 2
    return losses


# --------------------------------------------------------------------------------------------- hf engine
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


# --------------------------------------------------------------------------------------------- native engine
def score_positions(records: list[dict], pad_token_id: int | None) -> list[int]:
    """(2B,) the row positions of a ``SharedPromptCollator`` row whose hidden state scores each answer (chosen,
    rejected of pair 0, then pair 1, ...). transformers' ForSequenceClassification reads the rightmost token of
    ``prompt + answer`` that is not the pad token (every last token when there is none; position 0 when all
    are): the answer's EOS, or, where a tokenizer pads with its EOS, the token before it. The same token is
    picked here and mapped to its place in the packed row, where the rejected answer follows the chosen one."""
    positions, start = [], 0
    for r in records:
        prompt, P, C = r["prompt_ids"], len(r["prompt_ids"]), len(r["chosen_ids"])
        for answer, offset in ((r["chosen_ids"], 0), (r["rejected_ids"], C)):  # answer tokens sit at P + offset + j
            sequence = prompt + answer
            if pad_token_id is None:
                j = len(sequence) - 1
            else:
                j = max((j for j, t in enumerate(sequence) if t != pad_token_id), default=0)
            positions.append(start + (j if j < P else j + offset))
        start += P + C + len(r["rejected_ids"])
    return positions


def _decoder_and_score(model):
    """The decoder stack and the ``score`` head of a sequence classifier (through a PEFT wrapper, whose
    ``modules_to_save`` copy of the head is the one called)."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return getattr(base, base.base_model_prefix), base.score


def pair_rewards(model, batch: dict) -> torch.Tensor:
    """(B, 2) rewards (chosen, rejected) of a ``RewardObjective`` batch: the decoder once over the packed row,
    the score head only at the ``score_index`` positions; in float32 at least (float64 stays float64)."""
    decoder, score = _decoder_and_score(model)
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "packed_seq_lens", "attention_mask") if k in batch}
    hidden = decoder(**inputs, use_cache=False).last_hidden_state[0]  # (T, C): the micro-batch is one row
    rewards = score(hidden[batch["score_index"]])[:, 0]  # (2B,)
    return rewards.to(torch.promote_types(rewards.dtype, torch.float32)).view(-1, 2)


class RewardObjective(Objective):
    """What the native engine's loop asks of a method (see ``training/native.py``): the pairs packed with the
    prompt once, the loss summed over pairs (the loop divides by the step's pairs), TRL's metrics as sums."""

    unit = "pairs"
    perplexity = False  # eval_loss is the mean pair loss, not a token NLL
    stat_keys = ("accuracy", "margin", "mean_reward")

    def __init__(self, collator: SharedPromptCollator, pad_token_id: int | None, center: float | None):
        self.collator, self.pad_token_id, self.center = collator, pad_token_id, center

    def batch(self, split: str, rows: list[int] | None, records: list[dict]) -> dict:
        batch = self.collator(records)
        for key in ("pred_index", "targets", "answer_index"):  # the answers' next-token targets: a policy's, unused
            del batch[key]
        batch.update(score_index=torch.tensor(score_positions(records, self.pad_token_id)),
                     margin=torch.tensor([float(r["margin"]) for r in records], dtype=torch.float64))
        return batch

    def count(self, batch: dict) -> int:
        return len(batch["margin"])

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        rewards = pair_rewards(model, batch)  # (B, 2)
        chosen, rejected = rewards[:, 0], rewards[:, 1]
        losses = reward_loss(chosen, rejected, batch["margin"].to(rewards.dtype), self.center)
        with torch.no_grad():
            c, r = chosen.detach().double(), rejected.detach().double()
            stats = torch.stack([(c > r).double().sum(), (c - r).sum(), ((c + r) / 2).sum()])
        return losses.sum(), dict(zip(self.stat_keys, stats.tolist()))


def train_native(cfg: Config, run: PreferenceRun):
    objective = RewardObjective(SharedPromptCollator(pair_attention(run.model)), run.tokenizer.pad_token_id,
                                cfg.reward.center_coefficient)
    return preference.train_native(cfg, run, objective)


def train(cfg: Config):
    return preference.train(cfg, train_native, build_trainer, load=load_reward_model)
