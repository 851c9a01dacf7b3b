"""What DPO, ORPO and KTO share on top of ``training/run.py``: data set-up, the reference model, token counting,
and for the native engine the answers' log-probs of a packed pair layout and the reference's cache.

On the hf engine the losses, metrics and collators are TRL's; lmforge supplies the model (PEFT/QLoRA applied,
or an SFT output directory continued), pre-tokenised data (``data/preference.py``), atomic checkpoints and the
seeded sampler (``LmforgeTrainerMixin``), and its outputs (``OutputsCallback``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from lmforge.config import Config
from lmforge.data.split import prepare_split
from lmforge.log import log
from lmforge.models import is_adapter_dir, load_model, resolve_model_path
from lmforge.plan import RunPlan
from lmforge.training.attention import NAME as PACKED_ATTENTION, use_packed_attention
from lmforge.training.losses import decoder_and_head
from lmforge.training.native import NativeTrainer
from lmforge.training.objective import Objective
from lmforge.training.run import load_model_and_tokenizer, run_trainer, start


@dataclass
class PreferenceRun:
    """Everything a preference method needs before it builds its trainer (TRL's, or the native engine's)."""

    cfg: Config  # as the run uses it (run.start): the plan's engine, a local output_dir
    plan: RunPlan
    model: object
    tokenizer: object
    prec: object
    train_ds: object
    eval_ds: object
    data_lines: list
    resume: str | None
    continues_adapter: bool  # the starting model is an adapter directory (e.g. an SFT LoRA run)


def setup(cfg: Config, load: Callable = load_model_and_tokenizer) -> PreferenceRun:
    """The plan, output dir + resume point, model and tokenizer (``load(cfg)``: a causal LM unless the method
    scores, as reward does), tokenised train/eval data."""
    run = start(cfg)
    cfg, resume = run.cfg, run.resume
    model, tokenizer, prec = load(cfg)
    train_ds, train_stats, _ = prepare_split(cfg, tokenizer, "train", packed=False)
    eval_ds, _, _ = prepare_split(cfg, tokenizer, "eval", packed=False)
    for line in train_stats.lines():
        log(f"train data: {line}")
    first = cfg.model.name_or_path
    continues = bool(first) and is_adapter_dir(resolve_model_path(first))
    return PreferenceRun(cfg, run.plan, model, tokenizer, prec, train_ds, eval_ds, train_stats.lines(), resume,
                         continues)


def train(cfg: Config, native: Callable[[Config, PreferenceRun], Path],
          build_trainer: Callable[[Config, PreferenceRun], object],
          load: Callable = load_model_and_tokenizer) -> Path:
    """The one train entry of dpo, orpo, kto and reward: set up (the model from ``load``), then the plan's engine:
    ``native(cfg, run)``, or the TRL trainer ``build_trainer(cfg, run)`` makes, run by ``run_trainer``."""
    run = setup(cfg, load)
    if run.plan.engine == "native":
        return native(run.cfg, run)
    return run_trainer(build_trainer(run.cfg, run), run.cfg, run.tokenizer, run.resume, run.data_lines)


def train_native(cfg: Config, run: PreferenceRun, objective) -> Path:
    """The native engine on a preference ``objective`` (its collator from ``pair_attention``)."""
    from trl.trainer.utils import disable_dropout_in_model  # TRL loads in seconds: only where a pair method runs

    disable_dropout_in_model(run.model)  # as the hf engine's TRL configs (disable_dropout=True): logps without noise
    trainer = NativeTrainer(cfg, run.model, run.tokenizer, run.prec, run.train_ds, run.eval_ds, objective,
                            run.data_lines)
    return trainer.train(run.resume)


def pair_attention(model) -> str:
    """The attention a packed pair runs with: per sample where the model allows, else a dense mask (sdpa)."""
    return PACKED_ATTENTION if use_packed_attention(model) else "sdpa"


def reference_model(cfg: Config, run: PreferenceRun, precompute: bool):
    """The frozen reference for DPO/KTO, or None when no second copy of the weights is needed.

    With an adapter TRL disables it to get the starting model (one copy of the base weights); with
    ``precompute_ref_log_probs`` the policy itself scores the data once before its first step. Only full
    fine-tuning without precompute keeps a second copy, loaded here the way lmforge loaded the policy (GGUF
    imports and aliases included, which TRL's own re-load from ``config._name_or_path`` would not cover).
    """
    if cfg.peft.kind != "none" or run.continues_adapter or precompute:
        return None
    ref = load_model(cfg.model, resolve_model_path(cfg.model.name_or_path), run.tokenizer, seed=cfg.train.seed,
                     dtype=run.prec.weights)
    ref.requires_grad_(False)
    return ref.eval()


def drop_fresh_reference_adapter(trainer, run: PreferenceRun) -> None:
    """TRL copies a PeftModel's adapter into a frozen "ref" adapter to serve as the reference. For an adapter
    continued from an SFT run that copy *is* the starting model; for a freshly initialised LoRA (B = 0) the base
    with adapters disabled is the same function, so the copy is dropped and TRL falls back to disabling."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if not run.continues_adapter and "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")


class DropReferenceAdapterAtEnd(TrainerCallback):
    """A continued adapter's frozen "ref" copy is not part of the result: remove it before the final save."""

    def on_train_end(self, args, state, control, model=None, **kw):
        if model is not None and "ref" in getattr(model, "peft_config", {}):
            model.delete_adapter("ref")


class TokenCountingMixin:
    """Counts non-padding tokens of training batches for ``tokens_per_second`` (TRL's trainers do not)."""

    MASK_KEYS = ("attention_mask", "chosen_attention_mask", "rejected_attention_mask")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.lmforge.counter.add(sum(int(inputs[k].sum()) for k in self.MASK_KEYS if k in inputs))
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)


# ------------------------------------------------------------------------------------ native engine
def token_logps(model, batch: dict, pred_index: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N,) log-probabilities of ``targets`` as predicted at the row positions ``pred_index`` of a
    ``SharedPromptCollator`` batch. The LM head runs only on those positions."""
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "packed_seq_lens", "attention_mask") if k in batch}
    parts = decoder_and_head(model)
    if parts is not None:
        decoder, head = parts
        hidden = decoder(**inputs, use_cache=False).last_hidden_state[0]  # (T, C): the micro-batch is one row
        logits = head(hidden[pred_index])  # (N, V)
    else:
        logits = model(**inputs, use_cache=False).logits[0, pred_index]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # log-softmax in fp32 (or fp64) at least
    return -F.cross_entropy(logits, targets, reduction="none")  # (N,)


def answer_sums(batch: dict, answer_token_logps: torch.Tensor) -> torch.Tensor:
    """(2B,) per-answer sums of the (N,) log-probs of a batch's answer tokens (chosen, rejected of pair 0, ...)."""
    sums = torch.zeros(len(batch["answer_lengths"]), dtype=answer_token_logps.dtype, device=answer_token_logps.device)
    return sums.index_add_(0, batch["answer_index"], answer_token_logps)


def answer_logps(model, batch: dict) -> torch.Tensor:
    """(2B,) summed log-probabilities of each answer of a ``SharedPromptCollator`` batch (chosen, rejected of
    pair 0, then pair 1, ...). The LM head runs only on the positions that predict answer tokens."""
    return answer_sums(batch, token_logps(model, batch, batch["pred_index"], batch["targets"]))


class ReferenceLogps:
    """The reference model's log-probabilities of each row's two answers, computed once per row and kept.

    ``by_disabling`` (a fresh LoRA/DoRA/QLoRA adapter): the reference is the base with the adapter disabled,
    scored when a row first comes up and reused in later epochs. Otherwise (full fine-tuning, a continued
    adapter) the reference is the starting weights: every row the run will use is scored before the first
    update (``precompute``), so no second copy of the model is kept. The cache is part of each checkpoint,
    which keeps resume bitwise.
    """

    def __init__(self, sizes: dict[str, int], by_disabling: bool):
        self.by_disabling = by_disabling
        self.cache = {split: torch.full((n, 2), float("nan"), dtype=torch.float64) for split, n in sizes.items()}

    def __call__(self, model, batch: dict) -> torch.Tensor:
        """(B, 2) reference log-probs (chosen, rejected) of the batch's rows, in float64."""
        table, rows = self.cache[batch["split"]], batch["rows"]
        missing = torch.isnan(table[rows]).any(dim=1)
        if missing.any():
            if not self.by_disabling:
                raise RuntimeError(f"reference log-probs of {batch['split']} rows {rows[missing].tolist()} were not "
                                   "precomputed")
            with torch.no_grad(), model.disable_adapter():
                fresh = answer_logps(model, batch).view(-1, 2)
            table[rows[missing]] = fresh[missing].double()
        return table[rows]

    @torch.no_grad()
    def precompute(self, model, batches) -> None:
        """Score ``batches`` (collated, with ``split`` and ``rows``) with ``model`` as it is now."""
        for batch in batches:
            self.cache[batch["split"]][batch["rows"]] = answer_logps(model, batch).view(-1, 2).double()

    def state_dict(self) -> dict:
        return {split: t.clone() for split, t in self.cache.items()}

    def load_state_dict(self, state: dict) -> None:
        self.cache = {split: t.clone() for split, t in state.items()}


class ScoredByReference(Objective):
    """The part of a native objective (methods/dpo.py, methods/kto.py) that its ``ReferenceLogps`` (``self.reference``)
    needs from the loop: scoring before the first step, and a place in the checkpoint."""

    reference: ReferenceLogps

    def start(self, trainer) -> None:
        """Before the first step of a fresh run: score every row this rank will use with the starting weights,
        unless the reference is the adapter disabled (then rows are scored as they come)."""
        if self.reference.by_disabling:
            return
        for split, batches in trainer.planned_batches():
            self.reference.precompute(trainer.model, (self.batch(split, rows, [ds[i] for i in rows])
                                                      for rows, ds in batches))

    def state_dict(self) -> dict:
        return self.reference.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.reference.load_state_dict(state)
