"""What DPO, ORPO and KTO share on top of ``training/run.py``: data set-up, the reference model, token counting.

The losses, metrics and collators are TRL's; lmforge supplies the model (PEFT/QLoRA applied, or an SFT
output directory continued), pre-tokenised data (``data/preference.py``), atomic checkpoints and the
seeded sampler (``LmforgeTrainerMixin``), and its outputs (``OutputsCallback``).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import TrainerCallback

from lmforge.config import Config
from lmforge.data.prepare import prepare_split
from lmforge.models import is_adapter_dir, load_model, resolve_model_path
from lmforge.training.run import load_model_and_tokenizer, log, outputs_callback, prepare_output_dir


@dataclass
class PreferenceRun:
    """Everything a preference method needs before it builds its TRL trainer."""

    model: object
    tokenizer: object
    prec: object
    train_ds: object
    eval_ds: object
    data_lines: list
    resume: str | None
    continues_adapter: bool  # the starting model is an adapter directory (e.g. an SFT LoRA run)
    callback: object
    counter: object
    trainer_ref: list


def setup(cfg: Config) -> PreferenceRun:
    """Output dir + resume point, model and tokenizer, tokenised train/eval data, the outputs callback."""
    resume = prepare_output_dir(cfg)
    model, tokenizer, prec = load_model_and_tokenizer(cfg)
    train_ds, train_stats, _ = prepare_split(cfg, tokenizer, "train", packed=False)
    eval_ds, _, _ = prepare_split(cfg, tokenizer, "eval", packed=False)
    for line in train_stats.lines():
        log(f"train data: {line}")
    trainer_ref: list = []
    callback, counter = outputs_callback(cfg, trainer_ref)
    start = cfg.model.name_or_path
    continues = bool(start) and is_adapter_dir(resolve_model_path(start))
    return PreferenceRun(model, tokenizer, prec, train_ds, eval_ds, train_stats.lines(), resume, continues,
                         callback, counter, trainer_ref)


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

    token_counter = None
    MASK_KEYS = ("attention_mask", "chosen_attention_mask", "rejected_attention_mask")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training and self.token_counter is not None:
            self.token_counter.add(sum(int(inputs[k].sum()) for k in self.MASK_KEYS if k in inputs))
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)
