"""The typed config tree: the single source of truth for YAML loading, overrides, validation and help.

Every section is a dataclass whose fields carry a type, a default and one line of help
(``field(metadata={"help": ...})``). ``load_config`` turns YAML + ``key=value`` overrides into a
``Config``; unknown keys and wrong types raise ``ConfigError`` naming the dotted key and, for typos,
the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from lmforge import plan
from lmforge.distributed.checks import check_distributed
from lmforge.errors import ConfigError
from lmforge.registry import (
    HF_SCHEDULERS, HF_TRACKERS, LMFORGE_TRACKERS, NAMES as METHOD_NAMES, OPTIMIZERS, REWARD_METRICS, check_metric_names,
)


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with one line of help; mutable defaults are copied per instance."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


# --------------------------------------------------------------------------------------------- sections
@dataclass
class TokenizerTrainConfig:
    vocab_size: int = _f(8000, "vocabulary size of the byte-level BPE tokenizer trained on the training data")
    min_frequency: int = _f(2, "minimum pair frequency for a BPE merge")


@dataclass
class ModelConfig:
    name_or_path: str | None = _f(
        None, "HF model directory, a .gguf file, or the alias smollm2-135m-instruct; omit to build from model.config"
    )
    dtype: Literal["auto", "bfloat16", "float32", "float16", "float64"] = _f(
        "auto", "weights/compute precision; auto = bfloat16 where the hardware runs it fast, else float32; "
                "float64 for checking numerics on small models"
    )
    config: dict | None = _f(None, "from scratch: a HF config as keys (model_type, hidden_size, ...); random init")
    tokenizer: str | None = _f(None, "tokenizer directory (defaults to the model's own)")
    train_tokenizer: TokenizerTrainConfig | None = _f(None, "from scratch: train a byte-level BPE tokenizer first")
    trust_remote_code: bool = _f(False, "allow custom modelling code shipped with the model (off by default)")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = _f(
        "sdpa", "attention kernel; flash_attention_2 needs a GPU and the flash-attn package"
    )


@dataclass
class PeftConfig:
    kind: Literal["none", "lora", "qlora", "dora", "prompt_tuning"] = _f("none", "adapter kind; none = full fine-tune")
    r: int = _f(16, "LoRA rank")
    alpha: int = _f(32, "LoRA alpha (scaling = alpha / r)")
    dropout: float = _f(0.05, "LoRA dropout")
    target_modules: Union[str, list[str]] = _f("all-linear", "modules that get adapters: all-linear or a list of names")
    modules_to_save: list[str] | None = _f(None, "modules trained in full and saved beside the adapter")
    bits: Literal[4, 8] = _f(4, "qlora: quantisation of the frozen base (4 = nf4, 8 = int8) via bitsandbytes")
    num_virtual_tokens: int = _f(20, "prompt_tuning: number of virtual tokens")
    prompt_tuning_init: Literal["random", "text"] = _f("random", "prompt_tuning: initialise randomly or from text")
    prompt_tuning_init_text: str | None = _f(None, "prompt_tuning: the text used when prompt_tuning_init is text")


@dataclass
class DataSource:
    path: str | None = _f(None, "a .jsonl/.json/.parquet/.csv file, a directory of them, a glob, or a save_to_disk dir")
    loader: str | None = _f(None, "custom loader 'package.module:function' returning rows or a datasets.Dataset")
    weight: float | None = _f(None, "training sources: sampling proportion when several are mixed (default 1); "
                                    "refused on eval sources, which are read once each, in order")
    format: Literal["auto", "text", "prompt_completion", "chat", "preference", "kto", "prompts"] = _f(
        "auto", "row format; auto detects it from the keys"
    )
    split: str | None = _f(None, "for a directory with train/val/test files: which split (default by role)")
    input_format: str | None = _f(None, "prompt template with an __input__ placeholder")
    output_format: str | None = _f(None, "completion template with an __output__ placeholder")


@dataclass
class DataConfig:
    train: list[DataSource] = _f([], "training sources")
    eval: list[DataSource] = _f([], "evaluation sources, read in order, every row once (default: the source "
                                    "directory's val split, if any)")
    max_length: int = _f(1024, "maximum tokens per sample (and per packed row)")
    packing: bool | None = _f(None, "pack samples into rows with no cross-sample attention; default on for pretrain/sft")
    apply_chat_template: bool = _f(False, "render prompt/completion rows through the chat template as user/assistant")
    on_bad_rows: Literal["error", "skip"] = _f("error", "bad rows stop the run (error) or are dropped and counted (skip)")
    cache_dir: str | None = _f(None, "where prepared data is cached (default ~/.cache/lmforge/data or $LMFORGE_CACHE)")
    cache_fingerprint: Literal["stat", "content"] = _f(
        "stat", "how data files enter the cache key: stat (path, size, mtime: costs nothing) or content (SHA-256 of "
                "every byte: also catches an edit that keeps size and mtime, but reads every file on each run)")
    num_samples: int | None = _f(None, "training rows drawn (sources mixed by weight, rows repeated when fewer; "
                                       "default: every row of every source once)")
    streaming: bool = _f(False, "pretrain/sft on the native engine: read, tokenise and pack the training sources "
                                "while training (a corpus larger than memory or disk cache); needs train.max_steps")
    shuffle_buffer: int = _f(1000, "data.streaming: samples held in the shuffle buffer")
    max_prompt_length: int | None = _f(None, "preference methods: truncate prompts to this many tokens")
    mlm_probability: float = _f(0.15, "masked-LM pretraining: fraction of tokens masked")


@dataclass
class ProfileConfig:
    start_step: int = _f(2, "first profiled step (1-based; step 1 includes warm-up costs)")
    steps: int = _f(3, "number of profiled steps")


@dataclass
class TrainConfig:
    output_dir: str = _f("runs/lmforge", "where checkpoints, metrics, plots and the final model go")
    engine: Literal["native", "hf"] | None = _f(
        None, "training loop: native (lmforge's own PyTorch loop) or hf (the Transformers Trainer); "
              "default: native for causal-LM pretrain/sft, hf for everything else")
    max_steps: int = _f(-1, "optimizer steps to run (-1: use num_train_epochs)")
    num_train_epochs: float = _f(1.0, "epochs over the training data when max_steps is -1")
    learning_rate: float | None = _f(None, "peak learning rate (0 freezes the weights); unset: 2e-4 with adapters, "
                                           "2e-5 for full fine-tune")
    lr_scheduler_type: str = _f("linear", "linear, cosine, constant, constant_with_warmup, polynomial, warmup_stable_decay, ...")
    lr_scheduler_kwargs: dict = _f({}, "extra scheduler arguments (e.g. num_decay_steps for warmup_stable_decay)")
    warmup_steps: float = _f(0, "linear warmup steps (an int), or a ratio of all steps if in [0, 1)")
    warmup_ratio: float | None = _f(None, "warmup as a fraction of all steps (HF name; overrides warmup_steps)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "gradient clipping norm")
    optim: str = _f("adamw_torch", "optimizer: adamw_torch, adamw_torch_fused, adafactor, adamw_bnb_8bit, lamb, ...")
    adam_beta1: float = _f(0.9, "Adam beta1")
    adam_beta2: float = _f(0.999, "Adam beta2")
    adam_epsilon: float = _f(1e-8, "Adam epsilon")
    per_device_train_batch_size: int = _f(8, "rows per device per micro-batch")
    per_device_eval_batch_size: int = _f(8, "rows per device per eval batch")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step (loss normalised by real token count)")
    seed: int = _f(42, "seed for init, data order, mixing and dropout")
    logging_steps: int = _f(10, "log every N steps")
    save_steps: int = _f(500, "checkpoint every N steps")
    save_strategy: Literal["steps", "no"] = _f(
        "steps", "steps: checkpoint every save_steps; no: save only the final model (a signal still checkpoints)")
    save_total_limit: int | None = _f(None, "keep at most N checkpoints")
    eval_steps: int | None = _f(None, "evaluate every N steps (default: save_steps) when eval data exists")
    eval_strategy: Literal["steps", "no"] = _f("steps", "steps: evaluate every eval_steps when eval data exists; "
                                                        "no: never evaluate (HF alias: evaluation_strategy)")
    gradient_checkpointing: bool = _f(False, "trade compute for memory")
    torch_compile: bool = _f(False, "compile the model (pays off only for long runs on CPU)")
    report_to: list[str] = _f(["tensorboard"], "trackers: tensorboard, wandb (offline without an API key), mlflow "
                                               "(file store output_dir/mlruns unless MLFLOW_TRACKING_URI), aim, or none")
    aim_repo: str | None = _f(None, "report_to: aim: the Aim repository directory (default output_dir/aim)")
    run_name: str | None = _f(None, "run name shown by trackers")
    resume: str = _f("auto", "auto = newest complete checkpoint in output_dir, never, or a checkpoint path")
    on_nan: Literal["stop", "skip_batch"] = _f(
        "stop", "a NaN/inf loss: stop before the update (the last checkpoint stays the last good state), or "
                "skip_batch: that step makes no update, and the skips are counted (skipped_batches in metrics.jsonl)")
    dataloader_num_workers: int = _f(0, "data loader worker processes")
    predict_with_generate: bool = _f(False, "encoder-decoder: evaluate by generating (for eval.metrics)")
    trainable: list[str] | None = _f(None, "full fine-tune: only parameters whose name matches one of these globs train")
    distributed: Literal["none", "ddp", "fsdp", "deepspeed"] = _f("none", "multi-process strategy")
    deepspeed: str | None = _f(None, "DeepSpeed JSON path or preset zero1, zero2, zero3, zero3_offload")
    fsdp_sharding: Literal["full", "hybrid"] = _f("full", "FSDP: full sharding, or hybrid (shard within a node, replicate across nodes)")
    profile: ProfileConfig | None = _f(None, "write a torch.profiler trace of some steps to output_dir/profiler "
                                             "(TensorBoard shows it): {start_step, steps}")


@dataclass
class DpoConfig:
    beta: float = _f(0.1, "DPO temperature")
    loss_type: Literal["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                       "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"] = _f(
        "sigmoid", "TRL DPO loss variant")
    precompute_ref_log_probs: bool = _f(False, "score the data with the reference once before training (no ref copy kept)")
    label_smoothing: float = _f(0.0, "robust/exo_pair/aot losses: assumed fraction of flipped preference labels")


@dataclass
class OrpoConfig:
    beta: float = _f(0.1, "ORPO odds-ratio weight (lambda)")


@dataclass
class KtoConfig:
    beta: float = _f(0.1, "KTO temperature")
    desirable_weight: float = _f(1.0, "weight of desirable examples")
    undesirable_weight: float = _f(1.0, "weight of undesirable examples")
    loss_type: Literal["kto", "apo_zero_unpaired"] = _f("kto", "TRL KTO loss variant")
    precompute_ref_log_probs: bool = _f(False, "score the data with the reference once before training (no ref copy kept)")


@dataclass
class RewardConfig:
    center_coefficient: float | None = _f(None, "add this times mean((r_chosen + r_rejected)^2) to the loss, "
                                               "keeping rewards centred on 0 (TRL's center_rewards_coefficient)")


@dataclass
class GrpoReward:
    function: str | None = _f(None, "a reward function 'package.module:fn' or 'path/to/file.py:fn' with TRL's signature "
                                    "fn(prompts, completions, completion_ids, **columns) -> list[float | None]")
    model: str | None = _f(None, "a reward model directory (method: reward's output, or any one-label "
                                 "AutoModelForSequenceClassification) scoring prompt + completion")
    weight: float = _f(1.0, "this reward's weight in the total")


@dataclass
class GrpoConfig:
    rewards: list[GrpoReward] = _f([], "the rewards, each {function: ...} or {model: ...}, with an optional weight")
    num_generations: int = _f(8, "completions sampled per prompt (a group)")
    max_completion_length: int = _f(256, "tokens generated per completion at most")
    temperature: float = _f(1.0, "sampling temperature (the loss's log-probs use it too)")
    top_p: float = _f(1.0, "nucleus sampling")
    top_k: int = _f(0, "sample from the k most likely tokens; 0 = all")
    beta: float = _f(0.0, "weight of the KL to the reference model; 0 = no reference kept")
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = _f("dapo", "how the loss is normalised (TRL's names)")
    scale_rewards: Literal["group", "batch", "none"] = _f("group", "divide advantages by the group's std, the batch's, or not")
    advantage: Literal["group", "rloo"] = _f("group", "baseline: the group's mean (GRPO) or the other completions' mean (RLOO)")
    epsilon: float = _f(0.2, "lower clip of the importance ratio")
    epsilon_high: float | None = _f(None, "upper clip (default: epsilon)")
    num_iterations: int = _f(1, "optimizer steps per rollout (the clipped ratio applies from the second)")
    importance_sampling_level: Literal["token", "sequence"] = _f("token", "importance ratio per token, or per sequence (GSPO)")
    mask_truncated_completions: bool = _f(False, "completions cut at max_completion_length carry no loss")
    log_completions: int = _f(4, "prompts (with all their completions) written to rollouts.jsonl per logging step")


@dataclass
class EvalConfig:
    metrics: list[str] = _f([], "generation metrics during training evals: rouge, bleu, exact_match")
    max_new_tokens: int = _f(64, "tokens generated per eval sample for generation metrics")
    max_samples: int = _f(64, "eval rows used for generation metrics")
    report_samples: int = _f(5, "eval prompts whose base and trained answers report.md shows side by side; 0: off")


@dataclass
class Config:
    method: Literal[METHOD_NAMES] = _f("sft", "training method")  # the registry: lmforge/registry.py
    model: ModelConfig = _f(None, "model section", section=True)
    peft: PeftConfig = _f(None, "adapter section", section=True)
    data: DataConfig = _f(None, "data section", section=True)
    train: TrainConfig = _f(None, "training section", section=True)
    dpo: DpoConfig = _f(None, "DPO section", section=True)
    orpo: OrpoConfig = _f(None, "ORPO section", section=True)
    kto: KtoConfig = _f(None, "KTO section", section=True)
    reward: RewardConfig = _f(None, "reward model section", section=True)
    grpo: GrpoConfig = _f(None, "online RL (GRPO/RLOO) section", section=True)
    eval: EvalConfig = _f(None, "evaluation-during-training section", section=True)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Names users type from HF launch scripts that transformers 5 renamed or lmforge spells differently.
# Each maps to (new dotted key, converter); applied before validation.
_ALIASES: dict[str, str] = {
    "train.evaluation_strategy": "train.eval_strategy",
    "train.per_gpu_train_batch_size": "train.per_device_train_batch_size",
    "train.per_gpu_eval_batch_size": "train.per_device_eval_batch_size",
    "train.resume_from_checkpoint": "train.resume",
    "model.torch_dtype": "model.dtype",
    "model.model_name_or_path": "model.name_or_path",
    "peft.lora_r": "peft.r",
    "peft.lora_alpha": "peft.alpha",
    "peft.lora_dropout": "peft.dropout",
}
# HF TrainingArguments names that users paste from launch scripts but that mean nothing here: refused with
# the reason and what to write instead (nothing is accepted and ignored).
_REFUSED = {
    "train.bf16": "lmforge sets precision from model.dtype (bfloat16 | float32 | float16 | auto); "
                  "write model.dtype: bfloat16 instead",
    "train.fp16": "lmforge sets precision from model.dtype (bfloat16 | float32 | float16 | auto); "
                  "write model.dtype: float16 instead",
    "train.do_train": "lmforge train always trains; remove the key",
    "train.do_eval": "lmforge evaluates whenever eval data exists; remove the key, or set train.eval_strategy: no "
                     "to skip evaluation",
}
_YAML_NO = {"train.save_strategy", "train.eval_strategy"}
_REFUSED_CHOICES = {  # values HF accepts that lmforge does not, with the reason
    ("train.save_strategy", "epoch"): "lmforge checkpoints by step: set train.save_steps to the steps of an epoch",
    ("train.save_strategy", "best"): "lmforge keeps the newest checkpoints (train.save_total_limit), not the best",
    ("train.eval_strategy", "epoch"): "lmforge evaluates by step: set train.eval_steps to the steps of an epoch",
}


# --------------------------------------------------------------------------------------------- loading
def _section_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false", dict: "a mapping",
            type(None): "null"}.get(tp, str(tp))


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except (_Mismatch, ConfigError):
                continue
        raise _Mismatch
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed and type(value) is type(allowed[0]):
            return value
        raise ConfigError(
            f"{where}: {key}: {value!r} is not one of {', '.join(repr(a) for a in allowed)}" + _suggest(value, allowed)
        )
    if origin is list:
        if not isinstance(value, list):
            raise _Mismatch
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _Mismatch
        return _build(tp, value, key, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if tp is dict:
        if isinstance(value, dict):
            return value
        raise _Mismatch
    raise _Mismatch


def _suggest(word: Any, options: Any) -> str:
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _build(cls: type, data: dict, prefix: str, where: str) -> Any:
    hints = _section_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        full = f"{prefix}.{key}" if prefix else key
        if full in _REFUSED:
            raise ConfigError(f"{where}: {full}: not accepted: {_REFUSED[full]}")
        if isinstance(data[key], str) and (full, data[key]) in _REFUSED_CHOICES:
            raise ConfigError(f"{where}: {full}: {data[key]!r} is not accepted: {_REFUSED_CHOICES[full, data[key]]}")
        if key not in names:
            raise ConfigError(f"{where}: unknown key {full!r}{_suggest(key, names)}")
        if full in _YAML_NO and data[key] is False:  # YAML 1.1 reads an unquoted no as false
            data[key] = "no"
    kwargs = {}
    for f in dataclasses.fields(cls):
        full = f"{prefix}.{f.name}" if prefix else f.name
        if f.name in data:
            try:
                kwargs[f.name] = _coerce(data[f.name], hints[f.name], full, where)
            except _Mismatch:
                raise ConfigError(
                    f"{where}: {full}: expected {_type_name(hints[f.name])}, got {data[f.name]!r}"
                ) from None
        elif f.metadata.get("section"):
            kwargs[f.name] = hints[f.name]()
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted}: {p!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def _apply_aliases(tree: dict) -> None:
    for old, new in _ALIASES.items():
        sec, key = old.split(".")
        section = tree.get(sec)
        if isinstance(section, dict) and key in section:
            new_sec, new_key = new.split(".")
            tree.setdefault(new_sec, {}).setdefault(new_key, section.pop(key))


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected dotted.key=value, e.g. train.learning_rate=1e-5")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        out.append((key.strip(), value))
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None, tree: dict | None = None) -> Config:
    """Load YAML (or a ready dict), apply ``key=value`` overrides, validate everything. Raises ConfigError."""
    where = str(path) if path else "config"
    if tree is None:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"{where}: cannot read config ({e.strerror})") from None
        try:
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{where}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}: the config must be a mapping of sections (method, model, data, train, ...)")
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    _apply_aliases(tree)
    cfg = _build(Config, tree, "", where)
    _check(cfg, where)
    return cfg


def _check(cfg: Config, where: str) -> None:
    """Cross-field rules that a single field's type cannot express."""
    if cfg.model.name_or_path is None and cfg.model.config is None:
        raise ConfigError(f"{where}: model.name_or_path: required (or model.config to build a model from scratch)")
    if cfg.model.config is not None and "model_type" not in cfg.model.config:
        raise ConfigError(f"{where}: model.config.model_type: required when building from scratch (e.g. llama)")
    if cfg.model.name_or_path is None and cfg.model.tokenizer is None and cfg.model.train_tokenizer is None:
        raise ConfigError(f"{where}: model.tokenizer or model.train_tokenizer: required when building from scratch")
    if not cfg.data.train:
        raise ConfigError(f"{where}: data.train: at least one source is required")
    for role in ("train", "eval"):
        for i, src in enumerate(getattr(cfg.data, role)):
            if (src.path is None) == (src.loader is None):
                raise ConfigError(f"{where}: data.{role}[{i}]: give exactly one of path or loader")
            if role == "eval" and src.weight is not None:
                raise ConfigError(f"{where}: data.eval[{i}].weight: eval sources are not mixed by weight: every eval "
                                  "row is used once, sources in the order given; remove the weight")
            if src.weight is not None and src.weight <= 0:
                raise ConfigError(f"{where}: data.{role}[{i}].weight: must be > 0")
    if cfg.data.streaming:
        _check_streaming(cfg, where)
    if cfg.data.max_length < 8:
        raise ConfigError(f"{where}: data.max_length: must be at least 8")
    if cfg.eval.report_samples < 0:
        raise ConfigError(f"{where}: eval.report_samples: must be >= 0 (0 leaves the before/after answers out)")
    t = cfg.train
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                 "logging_steps", "save_steps"):
        if getattr(t, name) < 1:
            raise ConfigError(f"{where}: train.{name}: must be >= 1")
    if t.max_steps == 0 or t.max_steps < -1:
        raise ConfigError(f"{where}: train.max_steps: must be a positive number of steps, or -1 to use epochs")
    if t.learning_rate is not None and t.learning_rate < 0:
        raise ConfigError(f"{where}: train.learning_rate: must be >= 0 (0 freezes the weights), got {t.learning_rate}")
    # the optimizer's numbers: torch would refuse them only at step 1, with a traceback (written so NaN fails too)
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(t, name) < 1:
            raise ConfigError(f"{where}: train.{name}: must be in [0, 1), got {getattr(t, name)}")
    if not t.adam_epsilon > 0:
        raise ConfigError(f"{where}: train.adam_epsilon: must be > 0, got {t.adam_epsilon}")
    if not t.weight_decay >= 0:
        raise ConfigError(f"{where}: train.weight_decay: must be >= 0 (0: no decay), got {t.weight_decay}")
    _check_names(t, where)
    if t.warmup_ratio is not None and not 0 <= t.warmup_ratio < 1:
        raise ConfigError(f"{where}: train.warmup_ratio: must be in [0, 1)")
    if t.profile is not None and (t.profile.start_step < 1 or t.profile.steps < 1):
        raise ConfigError(f"{where}: train.profile: start_step and steps must be >= 1")
    if t.on_nan == "skip_batch" and t.distributed == "deepspeed":
        raise ConfigError(f"{where}: train.on_nan: skip_batch cannot run with train.distributed: deepspeed (DeepSpeed "
                          "updates the weights inside backward, before the step's loss is checked); use on_nan: stop")
    if cfg.peft.kind == "prompt_tuning" and cfg.peft.prompt_tuning_init == "text" and not cfg.peft.prompt_tuning_init_text:
        raise ConfigError(f"{where}: peft.prompt_tuning_init_text: required when prompt_tuning_init is text")
    check_metric_names(cfg.eval.metrics, f"{where}: eval.metrics")  # a typo fails before any work
    for name in set(cfg.eval.metrics) & set(REWARD_METRICS):  # accepted by `lmforge eval`, never computed here
        raise ConfigError(f"{where}: eval.metrics: {name} is a metric of `lmforge eval --model RM`; during training "
                          "method reward logs eval_accuracy and eval_margin at each evaluation: remove it")
    if cfg.method == "grpo":
        _check_grpo(cfg, where)
    check_distributed(cfg, where)
    try:  # the engines' table (plan.py): a key an engine cannot honour, or one that means nothing here
        plan.check(cfg)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _check_grpo(cfg: Config, where: str) -> None:
    """method: grpo: at least one reward, each a function or a model, sampling numbers that can run, and what its
    rollouts (the decode loop on whole weights, LoRA unmerged) cannot run with."""
    g = cfg.grpo
    if cfg.train.distributed in ("fsdp", "deepspeed"):
        raise ConfigError(f"{where}: train.distributed: {cfg.train.distributed} cannot run method grpo yet (its "
                          "rollouts decode on whole weights in each process); use ddp")
    if cfg.peft.kind in ("prompt_tuning", "qlora"):
        raise ConfigError(f"{where}: peft.kind: {cfg.peft.kind} cannot run method grpo (the decode loop runs full "
                          "weights or LoRA/DoRA layers); use lora or dora")
    if not g.rewards:
        raise ConfigError(f"{where}: grpo.rewards: at least one reward is required, e.g. "
                          "[{function: my_rewards.py:correct}] or [{model: path/to/reward_model}]")
    for i, r in enumerate(g.rewards):
        if (r.function is None) == (r.model is None):
            raise ConfigError(f"{where}: grpo.rewards[{i}]: give exactly one of function or model")
        if r.function is not None and ":" not in r.function:
            raise ConfigError(f"{where}: grpo.rewards[{i}].function: {r.function!r} must be 'package.module:fn' or "
                              "'path/to/file.py:fn'")
    if g.num_generations < 2:
        raise ConfigError(f"{where}: grpo.num_generations: must be >= 2 (advantages compare completions of one prompt)")
    for name in ("max_completion_length", "num_iterations"):
        if getattr(g, name) < 1:
            raise ConfigError(f"{where}: grpo.{name}: must be >= 1")
    if not g.temperature > 0:
        raise ConfigError(f"{where}: grpo.temperature: must be > 0 (GRPO samples), got {g.temperature}")
    if not 0 < g.top_p <= 1:
        raise ConfigError(f"{where}: grpo.top_p: must be in (0, 1], got {g.top_p}")
    if g.top_k < 0 or g.beta < 0 or g.epsilon < 0 or (g.epsilon_high is not None and g.epsilon_high < 0):
        raise ConfigError(f"{where}: grpo.top_k, beta, epsilon and epsilon_high must be >= 0")
    if g.log_completions < 0:
        raise ConfigError(f"{where}: grpo.log_completions: must be >= 0")


def _check_streaming(cfg: Config, where: str) -> None:
    """data.streaming: what it needs and what cannot go with it (data/streaming.py)."""
    if cfg.method not in ("pretrain", "sft"):
        raise ConfigError(f"{where}: data.streaming: pretrain and sft stream their data; method {cfg.method} reads "
                          "it whole (set data.streaming: false)")
    if cfg.train.max_steps < 1:
        raise ConfigError(f"{where}: data.streaming: train.max_steps is required (a stream has no epochs to count)")
    if cfg.data.num_samples is not None:
        raise ConfigError(f"{where}: data.num_samples: a stream is read until train.max_steps; remove the key")
    if cfg.data.shuffle_buffer < 1:
        raise ConfigError(f"{where}: data.shuffle_buffer: must be >= 1")


def installed_hf_names(kind: str) -> tuple[str, ...]:
    """The installed transformers' names of a kind: optim, lr_scheduler_type or report_to."""
    if kind == "optim":
        from transformers.training_args import OptimizerNames

        return tuple(o.value for o in OptimizerNames)
    if kind == "lr_scheduler_type":
        from transformers.trainer_utils import SchedulerType

        return tuple(s.value for s in SchedulerType)
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    return tuple(INTEGRATION_TO_CALLBACK)


def _check_name(value: str, known: tuple[str, ...], kind: str, where: str, hint: str = "") -> None:
    if value in known:
        return
    try:
        installed = installed_hf_names(kind)
    except ImportError:
        installed = ()
    if value in installed:
        return
    options = sorted(set(known) | set(installed))
    listed = f" (one of {', '.join(options)})" if len(options) <= 20 else ""
    raise ConfigError(f"{where}: train.{kind}: unknown name {value!r}{_suggest(value, options)}{hint}{listed}")


def _check_names(t: TrainConfig, where: str) -> None:
    """train.optim, train.lr_scheduler_type and train.report_to name things that exist."""
    _check_name(t.optim, OPTIMIZERS, "optim", where)
    _check_name(t.lr_scheduler_type, HF_SCHEDULERS, "lr_scheduler_type", where)
    for name in t.report_to:
        _check_name(name, LMFORGE_TRACKERS + HF_TRACKERS + ("none", "all"), "report_to", where)
    if t.aim_repo is not None and not {"aim", "all"} & set(t.report_to):
        raise ConfigError(f"{where}: train.aim_repo: set, but train.report_to has no aim (it would be ignored); "
                          "add aim to train.report_to or remove train.aim_repo")


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def iter_fields(cls: type = Config, prefix: str = ""):
    """Yield (dotted key, type name, default, help) for every leaf field: drives --help and the README table."""
    hints = _section_types(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if f.metadata.get("section"):
            yield from iter_fields(tp, key)
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        else:
            default = f.default_factory()  # type: ignore[misc]
        yield key, _type_name(tp), default, f.metadata.get("help", "")
