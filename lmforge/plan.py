"""One plan decides what runs: method x architecture x engine x data layout, computed once before anything heavy
loads, saved (config.yaml, report.md) and shown (``lmforge inspect``).

Each engine declares what it can run in one table (``ENGINES``): the keys it honours, and the refusals, each a
key, a condition and the reason. Every refusal and every automatic engine choice comes from that table:

  * ``train.engine`` set: a key that engine cannot honour is a ConfigError at load naming the key (``refusals``);
  * ``train.engine`` unset: the native engine where nothing refuses it, else hf, with the native refusal as the
    reason (``choose_engine``); a config neither engine can run is an error naming both keys.

``SCOPES`` says which keys mean something only in some runs (``dpo.*`` for method dpo, ``peft.r`` for LoRA kinds,
...): a key set to a non-default value where it means nothing is refused too. Nothing is accepted and ignored;
tests/test_plan.py walks every config key against both engines.

Plain data and arithmetic on the config: no torch, no transformers. The model's architecture, which needs its
config.json, is read by the caller (``models.architecture``) and passed in.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from lmforge.errors import ConfigError, UnsupportedError
from lmforge.registry import GENERATION_METRICS, LMFORGE_TRACKERS, METHODS

Config = Any  # a lmforge.config.Config: config.py imports this module (to check engines at load), not the reverse

NATIVE_METHODS = ("pretrain", "sft", "dpo", "orpo", "kto", "reward", "grpo")
NATIVE_ONLY_METHODS = ("grpo",)  # its generation runs on lmforge's decode loop, inside the native loop  # on causal LMs; mlm trains encoder-only models
NATIVE_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_torch_foreach", "lamb", "sgd")
# TRL 1.16's per-pair DPO losses the native engine computes (methods/dpo.py NATIVE_LOSSES, tested equal to this
# list); the batch-level variants (aot, aot_unpaired, sft) and discopop stay on the hf engine.
NATIVE_DPO_LOSSES = ("sigmoid", "hinge", "ipo", "sigmoid_norm", "robust", "exo_pair", "nca_pair", "bco_pair",
                     "sppo_hard", "apo_zero", "apo_down")
NATIVE_FSDP_METHODS = ("pretrain", "sft")  # a preference method's reference log-probs run outside the sharded loss


@dataclass(frozen=True)
class Refusal:
    """``key`` cannot be honoured when ``when(cfg)`` holds: ``why`` (formatted with the key's value ``v`` and the
    config ``c``) says so and what to do instead. ``example`` is a set of dotted overrides that triggers it
    (tests/test_plan.py loads it and expects the error)."""

    key: str
    when: Callable[[Config], bool]
    why: str
    example: dict = field(default_factory=dict)

    def message(self, cfg) -> str:
        """'key: why', the why formatted with this config's values."""
        return f"{self.key}: " + self.why.format(v=_value(cfg, self.key), c=cfg, fsdp=_fsdp_blocker(cfg))


@dataclass(frozen=True)
class Engine:
    """What one training loop runs: the architectures, the ``train.*`` keys it honours (with any value unless a
    refusal says otherwise; the other sections go through code both engines share: ``SHARED``), and its refusals."""

    name: str
    architectures: tuple[str, ...]
    honours: tuple[str, ...]
    refuses: tuple[Refusal, ...]

    def covers(self, key: str) -> bool:
        """``key`` is honoured by this engine (in some or all runs) or has a refusal: never silently ignored."""
        return (key.startswith(SHARED) or key in self.honours or any(r.key == key for r in self.refuses))


# sections both engines take from the shared layers: model and adapter loading (models.py, adapters.py), data
# (data/), the method's own section (its objective on native, TRL's config on hf), evaluation and outputs
SHARED = ("method", "model.", "peft.", "data.", "dpo.", "orpo.", "kto.", "reward.", "grpo.", "eval.")
# train.* keys both engines honour (the loop's own keys are listed per engine below)
_TRAIN_BOTH = tuple(f"train.{k}" for k in (
    "output_dir engine max_steps num_train_epochs learning_rate lr_scheduler_type lr_scheduler_kwargs warmup_steps "
    "warmup_ratio weight_decay max_grad_norm optim adam_beta1 adam_beta2 adam_epsilon per_device_train_batch_size "
    "per_device_eval_batch_size gradient_accumulation_steps seed logging_steps save_steps save_strategy "
    "save_total_limit eval_steps eval_strategy gradient_checkpointing report_to aim_repo run_name resume on_nan "
    "predict_with_generate trainable distributed deepspeed fsdp_sharding profile").split())


def _pairs(c) -> bool:
    return c.method in METHODS and METHODS[c.method].pairs


def _generation_metrics(c) -> bool:
    return bool(set(c.eval.metrics) & set(GENERATION_METRICS))


def _fsdp_blocker(c) -> str | None:
    """What of ``c`` the native engine's FSDP2 (training/sharding.py) cannot run, or None."""
    if c.train.distributed != "fsdp":
        return None
    if c.method not in NATIVE_FSDP_METHODS:
        return f"method {c.method}"
    if c.peft.kind == "qlora":
        return "peft.kind: qlora"  # 4-bit weights cannot be split into DTensor shards
    if _generation_metrics(c) and c.data.eval:
        return "eval.metrics with generation metrics"  # rank 0 generates alone, the weights are sharded
    return None


NATIVE = Engine("native", ("decoder",), _TRAIN_BOTH, (
    Refusal("method", lambda c: c.method not in NATIVE_METHODS,
            "{v} runs on train.engine: hf; the native engine runs " + ", ".join(NATIVE_METHODS),
            {"method": "mlm"}),
    Refusal("dpo.loss_type", lambda c: c.method == "dpo" and c.dpo.loss_type not in NATIVE_DPO_LOSSES,
            "{v} runs on train.engine: hf; the native engine has " + ", ".join(NATIVE_DPO_LOSSES),
            {"method": "dpo", "dpo.loss_type": "aot"}),
    Refusal("peft.kind", lambda c: _pairs(c) and c.peft.kind == "prompt_tuning",
            "{v} with {c.method} runs on train.engine: hf (a packed pair has no place for virtual tokens)",
            {"method": "dpo", "peft.kind": "prompt_tuning"}),
    Refusal("train.distributed", lambda c: c.train.distributed == "deepspeed",
            "deepspeed runs on train.engine: hf; the native engine runs ddp and fsdp",
            {"train.distributed": "deepspeed", "train.deepspeed": "zero2"}),
    Refusal("train.distributed", lambda c: _fsdp_blocker(c) is not None,
            "fsdp with {fsdp} runs on train.engine: hf (the native engine's FSDP2 runs pretrain and sft, without "
            "qlora or generation metrics)", {"method": "dpo", "train.distributed": "fsdp"}),
    Refusal("train.optim", lambda c: c.train.optim not in NATIVE_OPTIMIZERS,
            "{v} runs on train.engine: hf; the native engine has " + ", ".join(NATIVE_OPTIMIZERS),
            {"train.optim": "adafactor"}),
    Refusal("train.report_to", lambda c: bool(set(c.train.report_to) - set(LMFORGE_TRACKERS) - {"none"}),
            "{v} runs on train.engine: hf; the native engine reports to " + ", ".join(LMFORGE_TRACKERS)
            + " (and metrics.jsonl)", {"train.report_to": ["comet_ml"]}),
    Refusal("train.torch_compile", lambda c: c.train.torch_compile,
            "runs on train.engine: hf; the native engine does not compile the model yet",
            {"train.torch_compile": True}),
    Refusal("train.dataloader_num_workers", lambda c: c.train.dataloader_num_workers > 0,
            "runs on train.engine: hf; the native engine collates in the loop",
            {"train.dataloader_num_workers": 2}),
))

HF = Engine("hf", ("decoder", "encoder-decoder", "encoder-only"),
            _TRAIN_BOTH + ("train.torch_compile", "train.dataloader_num_workers"), (
    Refusal("data.streaming", lambda c: c.data.streaming,
            "runs on train.engine: native", {"data.streaming": True, "train.max_steps": 2}),
    Refusal("method", lambda c: c.method in NATIVE_ONLY_METHODS,
            "{v} runs on train.engine: native (its rollouts run on lmforge's decode loop, inside that loop)",
            {"method": "grpo", "grpo.rewards": [{"function": "m:f"}]}),
    Refusal("train.optim", lambda c: c.train.optim == "adamw_torch_foreach",
            "{v} is the native engine's; on train.engine: hf use adamw_torch",
            {"train.optim": "adamw_torch_foreach"}),
))

ENGINES = {"native": NATIVE, "hf": HF}
DEFAULT_ENGINE = "native"  # where it can run the config: faster on CPU (docs/training.md)


# ----------------------------------------------------------------------------- keys that mean something only in some runs
@dataclass(frozen=True)
class Scope:
    """Keys under ``prefix`` (a section or one key) mean something only when ``applies(cfg)``: set to a value other
    than their default elsewhere, they are refused with ``why``; or, with ``refuse=False`` (an adapter's settings,
    kept in a config while ``peft.kind`` is switched on the command line), named in the plan as not used."""

    prefix: str
    applies: Callable[..., bool]
    why: str
    refuse: bool = True


_LORA = ("lora", "qlora", "dora")
SCOPES = (
    Scope("dpo.", lambda c: c.method == "dpo", "applies to method: dpo"),
    Scope("orpo.", lambda c: c.method == "orpo", "applies to method: orpo"),
    Scope("kto.", lambda c: c.method == "kto", "applies to method: kto"),
    Scope("reward.", lambda c: c.method == "reward", "applies to method: reward"),
    Scope("grpo.", lambda c: c.method == "grpo", "applies to method: grpo"),
    Scope("data.max_prompt_length", lambda c: _pairs(c) or c.method == "grpo",
          "applies to the preference methods (dpo, orpo, kto, reward) and grpo"),
    Scope("data.shuffle_buffer", lambda c: c.data.streaming, "applies to data.streaming: true"),
    *(Scope(f"peft.{k}", lambda c: c.peft.kind in _LORA, "applies to peft.kind lora, qlora or dora", refuse=False)
      for k in ("r", "alpha", "dropout", "target_modules")),
    Scope("peft.bits", lambda c: c.peft.kind == "qlora", "applies to peft.kind: qlora", refuse=False),
    *(Scope(f"peft.{k}", lambda c: c.peft.kind == "prompt_tuning", "applies to peft.kind: prompt_tuning",
            refuse=False) for k in ("num_virtual_tokens", "prompt_tuning_init")),
    Scope("model.train_tokenizer", lambda c: c.model.name_or_path is None,
          "applies when building a model from scratch (model.config without model.name_or_path)"),
)
# keys whose meaning depends on the architecture, checked once it is known (``plan``)
ARCH_SCOPES = (
    Scope("data.mlm_probability", lambda c, arch: arch == "encoder-only" or c.method == "mlm",
          "applies to masked-LM pretraining (an encoder-only model)"),
    Scope("train.predict_with_generate", lambda c, arch: arch == "encoder-decoder",
          "applies to encoder-decoder models; a causal LM's generation metrics are eval.metrics"),
)


def _value(cfg, key: str):
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _defaults(cfg) -> dict[str, object]:
    """dotted key -> default value for every leaf of ``cfg``'s schema (the dataclass defaults)."""
    out = {}

    def walk(obj, prefix):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            key = f"{prefix}{f.name}"
            if f.metadata.get("section"):
                walk(value, key + ".")
            elif f.default is not dataclasses.MISSING:
                out[key] = f.default
            else:
                out[key] = f.default_factory()  # type: ignore[misc]
    walk(cfg, "")
    return out


def _set_keys(cfg, prefix: str) -> list[str]:
    """The keys under ``prefix`` whose value differs from the default."""
    return [k for k, d in _defaults(cfg).items() if k.startswith(prefix) and _value(cfg, k) != d]


def out_of_scope(cfg, architecture: str | None = None, refused: bool = True) -> list[str]:
    """'key: why' for each key set where it means nothing (the architecture's rules once it is known): those
    refused, or (``refused=False``) those the plan names as not used."""
    out = [f"{k}: {s.why}" for s in SCOPES if s.refuse == refused and not s.applies(cfg)
           for k in _set_keys(cfg, s.prefix)]
    if architecture is not None:
        out += [f"{k}: {s.why}" for s in ARCH_SCOPES if s.refuse == refused and not s.applies(cfg, architecture)
                for k in _set_keys(cfg, s.prefix)]
    return out


# ----------------------------------------------------------------------------- engine choice
def refusals(cfg, engine: str, architecture: str | None = None) -> list[Refusal]:
    """The refusals of ``engine`` that ``cfg`` triggers (and its architecture's, once known)."""
    e = ENGINES[engine]
    found = [r for r in e.refuses if r.when(cfg)]
    if architecture is not None and architecture not in e.architectures:
        found.append(Refusal("train.engine", lambda c: True, f"the {engine} engine trains "
                             f"{' and '.join(e.architectures)} models; this is an {architecture} model"))
    return found


def _refused(cfg, engine: str, architecture: str | None) -> str | None:
    """The first refusal's message, or None when ``engine`` can run ``cfg``."""
    found = refusals(cfg, engine, architecture)
    return found[0].message(cfg) if found else None


def choose_engine(cfg, architecture: str | None = None) -> tuple[str, str]:
    """(engine, why): ``train.engine`` as set, or the native engine unless its table refuses this config."""
    if cfg.train.engine is not None:
        refused = _refused(cfg, cfg.train.engine, architecture)
        if refused:
            raise ConfigError(f"{refused} (train.engine: {cfg.train.engine} was asked for)")
        return cfg.train.engine, "train.engine as set"
    native = _refused(cfg, "native", architecture)
    if native is None:
        return DEFAULT_ENGINE, "the default: the faster loop on CPU, and nothing in this config refuses it"
    hf = _refused(cfg, "hf", architecture)
    if hf is not None:
        raise ConfigError(f"no engine runs this config: {native}; and {hf}")
    return "hf", native


# ----------------------------------------------------------------------------- data layout and packing
CAUSAL, SEQ2SEQ, MLM, PAIRS, PROMPTS = "causal", "seq2seq", "mlm", "pairs", "prompts"


def module_name(cfg, architecture: str) -> str:
    """The module of lmforge.methods that trains ``cfg``'s method on this architecture."""
    method = METHODS[cfg.method]
    name = method.modules.get(architecture)
    if name is None:
        kinds = " and ".join(method.modules)
        others = ", ".join(n for n, m in METHODS.items() if architecture in m.modules)
        raise UnsupportedError(f"method: {cfg.method} trains {kinds} models; this model is {architecture} (for "
                               f"{architecture} models use method: {others})")
    return name


def layout(cfg, architecture: str) -> str:
    """What one sample is: ``causal`` (ids with aligned labels, decoder sft/pretrain), ``seq2seq`` (encoder input
    ids and decoder labels), ``mlm`` (framed text blocks, masked by the collator), ``pairs`` (preference records),
    ``prompts`` (prompt ids and the row's other columns, for online RL)."""
    module = module_name(cfg, architecture)
    if METHODS[cfg.method].pairs:
        return PAIRS
    if cfg.method == "grpo":
        return PROMPTS
    if module == "seq2seq":
        if cfg.data.apply_chat_template:
            raise ConfigError("data.apply_chat_template: an encoder-decoder model reads the prompt as encoder input "
                              "and the completion as the decoder's target; no chat template applies: remove the key")
        return SEQ2SEQ
    return MLM if module == "mlm" else CAUSAL


def packing(cfg, architecture: str = "decoder") -> tuple[bool, str]:
    """(pack rows?, why): the method allows it, the model is a causal LM, ``data.packing`` is not false, and no
    prompt-tuning adapter (PEFT prepends virtual tokens, which a packed row cannot take)."""
    packs = METHODS[cfg.method].packs and architecture == "decoder"
    if cfg.data.packing and not packs:
        what = f"method {cfg.method}" if not METHODS[cfg.method].packs else f"an {architecture} model"
        raise ConfigError(f"data.packing: true: {what} trains on one row per sample (packing is for causal-LM "
                          "pretrain and sft); remove the key or set it to false")
    if cfg.method == "grpo":
        return False, "method grpo packs each prompt's sampled completions into one row itself (methods/grpo.py)"
    if not packs:
        article = "an" if architecture[0] in "aeiou" else "a"
        return False, f"method {cfg.method} on {article} {architecture} model trains one row per sample"
    if cfg.data.packing is False:
        return False, "data.packing: false"
    if cfg.peft.kind == "prompt_tuning":
        return False, "prompt tuning: PEFT prepends virtual tokens, which a packed row cannot take"
    return True, "data.packing: true" if cfg.data.packing else "on by default for causal-LM pretrain and sft"


# ----------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class RunPlan:
    method: str
    module: str  # of lmforge.methods
    architecture: str
    engine: str
    engine_reason: str
    layout: str
    packing: bool
    packing_reason: str
    strategy: str  # train.distributed (none, ddp, fsdp, deepspeed)
    metrics: tuple[str, ...]  # logged at evaluation
    unused: tuple[str, ...] = ()  # 'key: why' of keys set that this run does not use (Scope.refuse False)

    def lines(self) -> list[str]:
        lines = [f"method: {self.method} on a {self.architecture} model (lmforge.methods.{self.module})",
                 f"engine: {self.engine} ({self.engine_reason})",
                 f"data: {self.layout} samples, packing {'on' if self.packing else 'off'} ({self.packing_reason})",
                 f"strategy: {self.strategy}",
                 f"eval metrics: {', '.join(self.metrics)}"]
        return lines + [f"not used in this run: {u}" for u in self.unused]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _metrics(cfg, engine: str) -> tuple[str, ...]:
    names = ["eval_loss"]
    if METHODS[cfg.method].token_loss:
        names.append("eval_perplexity")
    if cfg.method == "reward":
        names += ["eval_accuracy", "eval_margin", "eval_mean_reward (TRL's names)"]
    elif cfg.method == "grpo":
        names = ["eval_reward", "eval_reward_std (completions sampled from the eval prompts)"]
    elif METHODS[cfg.method].pairs:
        names.append(f"eval_rewards/* ({'lmforge' if engine == 'native' else 'TRL'}'s names)")
    names += [f"eval_{m}" for m in cfg.eval.metrics if m in GENERATION_METRICS]
    return tuple(names)


def check(cfg) -> None:
    """The checks that need no model: at config load (``config._check``)."""
    bad = out_of_scope(cfg)
    if bad:
        raise ConfigError(bad[0] + " (set here, it would be ignored); remove the key")
    if cfg.train.engine is not None:
        choose_engine(cfg)
    elif refusals(cfg, "native") and refusals(cfg, "hf"):
        choose_engine(cfg)  # raises, naming both


def plan(cfg, architecture: str) -> RunPlan:
    """The plan for ``cfg`` on a model of ``architecture``; raises ConfigError/UnsupportedError naming the key."""
    bad = out_of_scope(cfg, architecture)
    if bad:
        raise ConfigError(bad[0] + " (set here, it would be ignored); remove the key")
    module = module_name(cfg, architecture)
    engine, why = choose_engine(cfg, architecture)
    packed, packed_why = packing(cfg, architecture)
    return RunPlan(cfg.method, module, architecture, engine, why, layout(cfg, architecture), packed, packed_why,
                   cfg.train.distributed, _metrics(cfg, engine), tuple(out_of_scope(cfg, architecture, refused=False)))


def with_engine(cfg: Config, engine: str) -> Config:
    """A copy of ``cfg`` whose ``train.engine`` is the plan's (config.yaml records which engine ran)."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, engine=engine))
