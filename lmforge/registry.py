"""The names lmforge knows, as plain data at the bottom of the import graph: methods, optimizers, schedulers,
trackers and metrics.

``METHODS`` says, for each ``method:``, the row formats it reads, which module under ``lmforge.methods`` trains it
on each architecture (a decoder-only causal LM, an encoder-decoder such as T5, an encoder-only model such as BERT),
whether its rows may be packed, whether its eval_loss is a token NLL, and whether it reads preference records.
What runs where (engine, layout, packing) is decided from these facts in one place, ``plan.py``; every other
layer reads the plan or this table and keeps no list of its own. Nothing here imports torch or transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.errors import ConfigError

ARCHITECTURES = ("decoder", "encoder-decoder", "encoder-only")  # models.architecture tells them apart


@dataclass(frozen=True)
class Method:
    formats: tuple[str, ...]  # row formats it trains on (data/formats.py)
    modules: dict[str, str] = field(default_factory=dict)  # architecture -> module of lmforge.methods
    packs: bool = False  # rows may be packed (causal LMs only; plan.packing has the whole rule)
    token_loss: bool = False  # eval_loss is a per-token NLL: eval_perplexity, and mfu for the causal LM
    pairs: bool = False  # preference data: prompt/chosen/rejected (or kto) ids, never packed (data/preference.py)


METHODS: dict[str, Method] = {
    "pretrain": Method(("text",), {"decoder": "pretrain", "encoder-only": "mlm"}, packs=True, token_loss=True),
    "sft": Method(("prompt_completion", "chat", "text"), {"decoder": "sft", "encoder-decoder": "seq2seq"},
                  packs=True, token_loss=True),
    "dpo": Method(("preference",), {"decoder": "dpo"}, pairs=True),
    "orpo": Method(("preference",), {"decoder": "orpo"}, pairs=True),
    "kto": Method(("kto", "preference"), {"decoder": "kto"}, pairs=True),
    "reward": Method(("preference",), {"decoder": "reward"}, pairs=True),  # a Bradley-Terry scorer, not a policy
    "grpo": Method(("prompts",), {"decoder": "grpo"}),  # online RL: prompts in, completions sampled while training
    "mlm": Method(("text",), {"encoder-only": "mlm"}, token_loss=True),
}
NAMES = tuple(METHODS)
PAIR_METHODS = tuple(name for name, m in METHODS.items() if m.pairs)
METHOD_FORMATS = {name: m.formats for name, m in METHODS.items()}

# Names ``train.optim``, ``train.lr_scheduler_type`` and ``train.report_to`` take, checked at load (a typo fails
# before any model or data loads). They are transformers' own lists (OptimizerNames, SchedulerType and the
# report_to integrations of transformers 5.24), kept here because importing transformers costs seconds on
# every command; a name missing here is looked up in the installed transformers before it is refused, and
# tests/test_no_silent_fallbacks.py checks that every name here still exists there.
HF_OPTIMIZERS = (
    "adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused", "adafactor", "adamw_anyprecision",
    "adamw_torch_4bit", "adamw_torch_8bit", "ademamix", "sgd", "adagrad", "adamw_bnb_8bit", "adamw_8bit",
    "ademamix_8bit", "lion_8bit", "lion_32bit", "paged_adamw_32bit", "paged_adamw_8bit", "paged_ademamix_32bit",
    "paged_ademamix_8bit", "paged_lion_32bit", "paged_lion_8bit", "rmsprop", "rmsprop_bnb", "rmsprop_bnb_8bit",
    "rmsprop_bnb_32bit", "galore_adamw", "galore_adamw_8bit", "galore_adafactor", "galore_adamw_layerwise",
    "galore_adamw_8bit_layerwise", "galore_adafactor_layerwise", "lomo", "adalomo", "grokadamw",
    "schedule_free_radam", "schedule_free_adamw", "schedule_free_sgd", "apollo_adamw", "apollo_adamw_layerwise",
    "stable_adamw",
)
# lmforge's own optimizers (training/optim.py): lamb on both engines; adamw_torch_foreach (torch's AdamW with
# foreach=True) on the native engine. Which engine runs which optimizer is plan.ENGINES' business.
LMFORGE_OPTIMIZERS = ("lamb", "adamw_torch_foreach")
OPTIMIZERS = HF_OPTIMIZERS + LMFORGE_OPTIMIZERS
HF_SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt",
    "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay", "greedy",
)
# report_to names lmforge writes itself on both engines (training/tracking.py), fed the rows of metrics.jsonl;
# transformers' own integration of the same name is not used (no duplicates). transformers 5 has no Aim.
LMFORGE_TRACKERS = ("tensorboard", "wandb", "mlflow", "aim")
HF_TRACKERS = (
    "azure_ml", "comet_ml", "mlflow", "neptune", "tensorboard", "trackio", "wandb", "codecarbon", "clearml",
    "dagshub", "flyte", "dvclive", "swanlab", "kubeflow",
)

GENERATION_METRICS = ("rouge", "bleu", "exact_match")  # evaluation/metrics.py computes them
REWARD_METRICS = ("reward_accuracy",)  # a reward model on preference pairs (`lmforge eval`): evaluation/evaluate.py
MODEL_METRICS = ("perplexity",) + REWARD_METRICS  # needs the model: evaluation/evaluate.py
VALID_METRICS = MODEL_METRICS + GENERATION_METRICS


def check_metric_names(names: list[str], key: str = "metrics") -> list[str]:
    """Return ``names`` unchanged, or raise ConfigError naming the unknown ones and the valid ones."""
    unknown = [n for n in names if n not in VALID_METRICS]
    if unknown:
        raise ConfigError(f"{key}: unknown metric(s) {', '.join(map(repr, unknown))}; valid: {', '.join(VALID_METRICS)}")
    return list(names)
