"""`lmforge eval`: perplexity and generation metrics of a model on a dataset, plus lm-eval-harness tasks.

Perplexity counts exactly the tokens training puts loss on (the shared Encoder's labels): every token of
text rows, the completion of prompt/completion rows, the assistant turns of chat rows. Generation metrics
generate from the prompt (or the conversation before the last assistant turn) and score against the
completion (or that last assistant turn).

``reward_accuracy`` scores a reward model (method ``reward``'s output) on preference rows: each side rendered and
joined exactly as training scores it (``data/preference.py``), the fraction of pairs whose chosen answer scores
above the rejected one, and the mean margin.
"""

from __future__ import annotations

import importlib.util
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.config import DataSource
from lmforge.data.formats import normalize_rows
from lmforge.data.preference import encode_side, reward_sequences
from lmforge.data.sources import read_source
from lmforge.data.tokenize import IGNORE, Encoder
from lmforge.errors import ConfigError, DataError, UnsupportedError
from lmforge.evaluation.metrics import GENERATION_METRICS, check_metric_names, compute_metrics
from lmforge.inference.generate import GenerationOptions, Generator, encode_prompt
from lmforge.inference.loading import LoadedModel
from lmforge.inference.score import score_sequences
from lmforge.registry import REWARD_METRICS


@dataclass
class EvalData:
    fmt: str
    rows: list[dict]  # canonical rows (see data.formats)
    path: str


def read_eval_data(path: str, max_samples: int | None = None) -> EvalData:
    """Rows of ``path`` in their canonical form; bad rows stop with file:line (DataError)."""
    src = DataSource(path=path)
    rows, bad = read_source(src, "eval")
    fmt, good, more_bad = normalize_rows(rows, src)
    bad += more_bad
    if bad:
        shown = "\n  ".join(str(b) for b in bad[:10])
        raise DataError(f"{len(bad)} bad row(s) in {path}:\n  {shown}")
    if fmt not in ("text", "prompt_completion", "chat", "preference"):
        raise DataError(f"{path}: lmforge eval reads text, prompt/completion, chat or preference rows, not {fmt}")
    data = [r.data for r in good]
    return EvalData(fmt, data[:max_samples] if max_samples else data, path)


# ------------------------------------------------------------------------------------------ perplexity
@torch.inference_mode()
def perplexity(loaded: LoadedModel, data: EvalData, batch_size: int = 8, max_length: int = 1024) -> dict:
    """exp(mean negative log-likelihood) over the loss-carrying tokens of every row (truncated to max_length)."""
    if loaded.is_encoder_decoder:
        raise UnsupportedError("perplexity: only for decoder-only models; use rouge/bleu/exact_match for seq2seq")
    encoder = Encoder(loaded.tokenizer)
    samples = [encoder.encode(r, data.fmt) for r in data.rows]
    samples = [(s.input_ids[:max_length], s.labels[:max_length]) for s in samples]
    model, pad = loaded.model, loaded.tokenizer.pad_token_id
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        # right padding: positions 0..n-1 as in training; padded labels are IGNORE
        ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in chunk], device=device)
        labels = torch.tensor([lab + [IGNORE] * (width - len(lab)) for _, lab in chunk], device=device)
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in chunk], device=device)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()  # (B, T, V)
        targets = labels[:, 1:]  # token t is predicted at position t-1
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE,
                                                reduction="sum")
        total_nll += nll.item()
        total_tokens += int((targets != IGNORE).sum())
    if total_tokens == 0:
        raise DataError(f"{data.path}: no tokens to score (every row empty after masking?)")
    loss = total_nll / total_tokens
    return {"perplexity": math.exp(loss), "eval_loss": loss, "tokens": total_tokens}


# ------------------------------------------------------------------------------------------ reward models
def _pair_sequences(enc: Encoder, row: dict, max_length: int) -> tuple[list[int], list[int]]:
    """(chosen, rejected) of one preference row as the whole sequences training scores: each side rendered as
    SFT renders it, prompt + answer (ending with EOS) joined by ``reward_sequences``; cut to ``max_length``."""
    (prompt, chosen), (_, rejected) = (encode_side(enc, row["prompt"], row[side]) for side in ("chosen", "rejected"))
    seqs = reward_sequences({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected, "margin": 0.0})
    return seqs["chosen_ids"][:max_length], seqs["rejected_ids"][:max_length]


@torch.inference_mode()
def reward_accuracy(loaded: LoadedModel, data: EvalData, batch_size: int = 8, max_length: int = 1024) -> dict:
    """Fraction of pairs whose chosen side the reward model scores strictly above the rejected side (TRL's
    ``accuracy``), the mean margin r_chosen - r_rejected, and the number of pairs."""
    encoder = Encoder(loaded.tokenizer)
    pairs = []
    for k, row in enumerate(data.rows):
        try:
            pairs.append(_pair_sequences(encoder, row, max_length))
        except DataError as e:
            raise DataError(f"{data.path}: row {k + 1}: {e}") from None
    if not pairs:
        raise DataError(f"{data.path}: no preference pairs to score")
    # all chosen sides, then all rejected: 2 x batch_size sequences a forward, as pairs of batch_size
    scores = torch.tensor(score_sequences(loaded.model, loaded.tokenizer.pad_token_id,
                                          [c for c, _ in pairs] + [r for _, r in pairs], 2 * batch_size))
    r_chosen, r_rejected = scores[:len(pairs)], scores[len(pairs):]
    return {"reward_accuracy": int((r_chosen > r_rejected).sum()) / len(pairs),
            "reward_margin": (r_chosen - r_rejected).mean().item(), "pairs": len(pairs)}


def check_model_data_metrics(loaded: LoadedModel, data: EvalData | None, metrics: list[str]) -> None:
    """A reward model answers only the reward metrics, and they need a reward model and preference rows."""
    reward = [m for m in metrics if m in REWARD_METRICS]
    other = [m for m in metrics if m not in REWARD_METRICS]
    if loaded.is_reward_model and other:
        raise UnsupportedError(f"--metrics {','.join(other)}: {loaded.name} is a reward model (a sequence "
                               f"classifier: no token probabilities, no generation); score it with "
                               f"--metrics {','.join(REWARD_METRICS)} on preference rows")
    if reward and not loaded.is_reward_model:
        raise UnsupportedError(f"--metrics {','.join(reward)}: {loaded.name} is not a reward model (a one-label "
                               "sequence classifier, what method: reward writes)")
    if data is None:
        return
    if reward and data.fmt != "preference":
        raise DataError(f"--metrics {','.join(reward)}: {data.path} has {data.fmt} rows; it needs preference rows "
                        "(prompt, chosen, rejected)")
    if other and data.fmt == "preference":
        raise DataError(f"--metrics {','.join(other)}: {data.path} has preference rows; "
                        f"they are scored with --metrics {','.join(REWARD_METRICS)} by a reward model")


# ------------------------------------------------------------------------------------------ generation
def prompt_and_reference(row: dict, fmt: str) -> tuple[dict, str]:
    """Split a row into a generate prompt row and the reference answer."""
    if fmt == "prompt_completion":
        return {"prompt": row["prompt"]}, row["completion"]
    if fmt == "chat":
        msgs = row["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        return {"messages": msgs[:last]}, msgs[last]["content"]
    raise DataError("generation metrics need prompt/completion or chat rows (text rows have no reference)")


def generation_metrics(loaded: LoadedModel, data: EvalData, names: list[str], opts: GenerationOptions,
                       batch_size: int | None = None) -> tuple[dict, list[dict]]:
    """Generate for every row, score with ``names``; also return the per-row predictions for the report."""
    pairs = [prompt_and_reference(r, data.fmt) for r in data.rows]
    prompts = [encode_prompt(p, loaded.tokenizer) for p, _ in pairs]
    preds = [c.text for c in Generator(loaded).generate_all(prompts, opts, batch_size)]
    refs = [ref for _, ref in pairs]
    samples = [{"prediction": p, "reference": r} for p, r in zip(preds, refs)]
    return compute_metrics(names, preds, refs), samples


# ------------------------------------------------------------------------------------------ lm-eval-harness
def lm_eval_tasks(loaded: LoadedModel, tasks: list[str], batch_size: int, limit: int | None) -> dict:
    """Run lm-eval-harness tasks on the loaded model; only with lm_eval installed and the task data local.

    A task is a registered lm-eval task name (its dataset must already be in the local datasets cache) or
    the path of a task YAML file, which may point at local files (``dataset_path: json`` with
    ``dataset_kwargs.data_files``); its folder is added to lm-eval's task search path.
    """
    if importlib.util.find_spec("lm_eval") is None:
        raise UnsupportedError("--tasks: lm-eval-harness is not installed (pip install lm-eval, or lmforge[eval]); "
                               "its task data must also be available locally (no downloads at run time)")
    import os

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # lmforge never downloads: missing data is an error
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    names, folders = [], []
    for task in tasks:
        path = Path(task)
        if path.suffix in (".yaml", ".yml"):
            if not path.is_file():
                raise ConfigError(f"--tasks: task file {task} does not exist")
            found = re.search(r"^task:\s*[\"']?([^\s\"']+)", path.read_text(), re.MULTILINE)
            if not found:
                raise ConfigError(f"--tasks: {task} has no 'task: NAME' line")
            names.append(found.group(1))
            folders.append(str(path.resolve().parent))
        else:
            names.append(task)
    lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size)
    try:
        manager = TaskManager(include_path=sorted(set(folders)) or None)
        out = simple_evaluate(model=lm, tasks=names, limit=limit, task_manager=manager)
    except Exception as e:  # lm_eval raises many types for missing tasks/data; report which and why
        raise UnsupportedError(f"--tasks {','.join(tasks)}: lm-eval could not run ({type(e).__name__}: {e}); "
                               "task data must be local (the datasets cache, or files a task YAML names)") from None
    results = {}
    for task, values in out["results"].items():
        for key, value in values.items():
            if isinstance(value, (int, float)) and not key.endswith("_stderr,none"):
                results[f"{task}/{key.removesuffix(',none')}"] = float(value)
    return results


def evaluate(loaded: LoadedModel, data: EvalData | None, metrics: list[str], opts: GenerationOptions,
             batch_size: int | None = None, max_length: int = 1024) -> tuple[dict, list[dict]]:
    """All requested dataset metrics: returns (metric -> value, per-row generation samples). No
    ``batch_size``: 8 rows (pairs) per perplexity (reward) batch, and generation's automatic batch size."""
    check_metric_names(metrics, "--metrics")
    check_model_data_metrics(loaded, data, metrics)
    results: dict = {}
    samples: list[dict] = []
    if data is None:
        return results, samples
    if "reward_accuracy" in metrics:
        results.update(reward_accuracy(loaded, data, batch_size or 8, max_length))
    if "perplexity" in metrics:
        results.update(perplexity(loaded, data, batch_size or 8, max_length))
    wanted = [m for m in metrics if m in GENERATION_METRICS]
    if wanted:
        scores, samples = generation_metrics(loaded, data, wanted, opts, batch_size)
        results.update(scores)
    return results, samples
