"""Generation metrics during training (``eval.metrics: [rouge, bleu, exact_match]``) for causal LMs.

The HF Trainer's ``compute_metrics`` works on teacher-forced logits, which says nothing about what the model
generates; ``Seq2SeqTrainer`` can generate but only for encoder-decoder models (``methods/seq2seq.py`` uses it).
So for causal LMs a callback generates greedily on up to ``eval.max_samples`` eval rows after each
evaluation and logs ``eval_rouge`` / ``eval_bleu`` / ``eval_exact_match`` through ``trainer.log``: the
same path as ``eval_loss``, so they land in metrics.jsonl, the plot and the trackers, and a resumed run's
curves continue (``run.open_output_dir`` drops rows after the checkpoint step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import TrainerCallback

from lmforge.config import Config
from lmforge.data.prepare import load_rows
from lmforge.data.prompts import prompt_ids
from lmforge.data.tokenize import Encoder
from lmforge.evaluation.metrics import GENERATION_METRICS, check_metric_names, compute_metrics
from lmforge.inference.generate import length_batches, needs_equal_lengths


@dataclass
class GenerationSample:
    prompt_ids: list[int]  # the prompt as the model sees it in training (chat template applied if used)
    reference: str  # the completion / last assistant turn the model should produce


def generation_metric_names(cfg: Config) -> list[str]:
    names = check_metric_names(cfg.eval.metrics, "eval.metrics")
    return [n for n in names if n in GENERATION_METRICS]


def sample_from_row(enc: Encoder, fmt: str, row: dict) -> GenerationSample | None:
    """Prompt ids + reference for one canonical row; None for formats with nothing to complete (text)."""
    if fmt == "prompt_completion":
        if not enc.apply_chat_template:
            return GenerationSample(enc.bos + enc._ids(row["prompt"]), row["completion"])
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    elif fmt == "chat":
        messages = row["messages"]
    elif fmt == "prompts":  # online RL: no reference answer, unless the row has an "answer" column for its reward
        return GenerationSample(prompt_ids(enc, row["prompt"], enc.apply_chat_template),
                                str(row["columns"].get("answer", "")))
    else:
        return None
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt = enc.render(messages[:last], add_generation_prompt=True)
    return GenerationSample(enc._ids(prompt), messages[last]["content"])


def eval_samples(cfg: Config, tokenizer) -> list[GenerationSample]:
    """The first ``eval.max_samples`` eval rows that have a completion, prompts truncated from the left."""
    per_source, _, _ = load_rows(cfg, "eval")
    enc = Encoder(tokenizer, apply_chat_template=cfg.data.apply_chat_template)
    keep = max(cfg.data.max_length - cfg.eval.max_new_tokens, 1)
    out = []
    for fmt, rows in per_source:
        for r in rows:
            s = sample_from_row(enc, fmt, r.data)
            if s is not None and len(out) < cfg.eval.max_samples:
                s.prompt_ids = s.prompt_ids[-keep:]
                out.append(s)
    return out


@torch.no_grad()
def generate_completions(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy completions in input order, batched with left padding (prompt-learning adapters: equal lengths
    only, see ``needs_equal_lengths``); stops at EOS."""
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    texts: list[str] = [""] * len(prompts)
    for idx in length_batches([len(p) for p in prompts], batch_size, needs_equal_lengths(model)):
        chunk = [prompts[i] for i in idx]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)  # (B, T) left-padded
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        for i, t in zip(idx, tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)):
            texts[i] = t.strip()
    return texts


class GenerationScorer:
    """Generates greedy completions for the eval samples and scores them: {"eval_<metric>": value}."""

    def __init__(self, tokenizer, samples: list[GenerationSample], names: list[str], max_new_tokens: int,
                 batch_size: int):
        self.tokenizer, self.samples, self.names = tokenizer, samples, names
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def score(self, model) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            preds = generate_completions(model, self.tokenizer, [s.prompt_ids for s in self.samples],
                                         self.max_new_tokens, self.batch_size)
        finally:
            model.train(was_training)
        scores = compute_metrics(self.names, preds, [s.reference for s in self.samples])
        return {f"eval_{k}": round(v, 6) for k, v in scores.items()}  # rouge also brings rouge1/rouge2/rougeL


def generation_scorer(cfg: Config, tokenizer, has_eval: bool, log=print) -> GenerationScorer | None:
    """A scorer when eval.metrics names generation metrics and the eval rows have completions, else None."""
    names = generation_metric_names(cfg)
    if not names or not has_eval:
        if names:
            log(f"eval.metrics {names} need eval data (data.eval); they are skipped")
        return None
    samples = eval_samples(cfg, tokenizer)
    if not samples:
        log("eval.metrics: the eval rows have no completions to generate (text rows); generation metrics skipped")
        return None
    log(f"generation metrics {', '.join(names)} on {len(samples)} eval rows at each evaluation")
    return GenerationScorer(tokenizer, samples, names, cfg.eval.max_new_tokens, cfg.train.per_device_eval_batch_size)


class GenerationMetricsCallback(TrainerCallback):
    """HF engine: after each evaluation, generate on the eval samples, score, and log eval_<metric>."""

    def __init__(self, trainer, scorer: GenerationScorer):
        self.trainer, self.scorer = trainer, scorer

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        logs = self.scorer.score(model)
        if metrics is not None:
            metrics.update(logs)
        self.trainer.log(logs)


def add_generation_metrics(trainer, cfg: Config, tokenizer, log=print) -> GenerationMetricsCallback | None:
    """Attach the callback when eval.metrics names generation metrics and eval rows have completions."""
    scorer = generation_scorer(cfg, tokenizer, trainer.eval_dataset is not None, log)
    if scorer is None:
        return None
    cb = GenerationMetricsCallback(trainer, scorer)
    trainer.add_callback(cb)
    return cb
