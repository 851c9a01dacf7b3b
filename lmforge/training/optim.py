"""Optimizers and schedules beyond what ``TrainingArguments`` offers by name: LAMB, and schedule defaults.

``train.optim`` takes every Hugging Face optimizer name (adamw_torch, adamw_torch_fused, adafactor,
adamw_bnb_8bit, ...) and passes it straight through; ``lamb`` is lmforge's own (below). ``LmforgeTrainerMixin``
(``checkpoint.py``) routes both through ``Trainer.create_optimizer``, so weight-decay groups (no decay on
biases and norms), checkpoints and resume work the same for all of them.

Why a hand-written LAMB: bitsandbytes' ``LAMB`` runs on CPU but implements the trust ratio as a clip
(``min(1, max_unorm * ||w|| / ||update||)``), which gives a zero-initialised tensor a ratio of 0 forever:
LoRA's B matrices and biases start at zero, so they never train (checked on bitsandbytes 0.50.2).
torch-optimizer's Lamb is unmaintained since 2021. The algorithm is twenty lines.
"""

from __future__ import annotations

import math

import torch

from lmforge.config import Config
from lmforge.registry import LMFORGE_OPTIMIZERS


class Lamb(torch.optim.Optimizer):
    """LAMB, You et al. 2019 ("Large Batch Optimization for Deep Learning", arXiv:1904.00962), Algorithm 2.

    Per tensor: the bias-corrected Adam direction plus decoupled weight decay, ``r = m_hat / (sqrt(v_hat) + eps)
    + wd * w``, scaled by the layer-wise trust ratio ``||w|| / ||r||`` (1 when either norm is 0, as in the
    reference implementations), then ``w -= lr * ratio * r``. State and arithmetic are fp32 (fp64 for fp64
    parameters) whatever the parameter dtype.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0):
        if lr < 0 or eps <= 0 or not all(0 <= b < 1 for b in betas):  # lr 0 is allowed: no update
            raise ValueError(f"Lamb: invalid lr={lr}, betas={betas} or eps={eps}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                wide = torch.promote_types(p.dtype, torch.float32)  # fp32, or fp64 for an fp64 model
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=wide)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=wide)
                state["step"] += 1
                t = state["step"]
                g, w = p.grad.to(wide), p.to(wide)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                r = (m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt() + group["eps"])
                if group["weight_decay"]:
                    r.add_(w, alpha=group["weight_decay"])
                w_norm, r_norm = w.norm().item(), r.norm().item()
                ratio = w_norm / r_norm if w_norm > 0 and r_norm > 0 else 1.0
                p.copy_(w - group["lr"] * ratio * r)
        return loss


def hf_optim_name(name: str) -> str:
    """The name TrainingArguments gets: lmforge's own optimizers are built in create_optimizer instead."""
    return "adamw_torch" if name in LMFORGE_OPTIMIZERS else name


def optimizer_cls_and_kwargs(name: str | None, args) -> tuple[type, dict] | None:
    """(class, kwargs) for an lmforge optimizer, or None to let the Trainer pick the HF one by name."""
    if name == "lamb":
        return Lamb, {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}
    return None


def scheduler_kwargs(name: str, kwargs: dict, num_training_steps: int, warmup: int) -> tuple[str, dict]:
    """Fill what a schedule needs but users rarely spell out; returns (scheduler name, kwargs).

    * ``constant`` with warmup becomes ``constant_with_warmup``: transformers' ``constant`` silently
      ignores warmup.
    * ``warmup_stable_decay`` needs ``num_decay_steps``; default: the last 10% of the steps (at least 1).
    """
    kwargs = dict(kwargs or {})
    if name == "constant" and warmup > 0:
        name = "constant_with_warmup"
    if name == "warmup_stable_decay" and "num_decay_steps" not in kwargs:
        kwargs["num_decay_steps"] = max(1, math.ceil(0.1 * num_training_steps))
    return name, kwargs


def warmup_steps_for(warmup: float, num_training_steps: int) -> int:
    """An int number of steps, or a ratio of all steps when in [0, 1) (TrainingArguments.get_warmup_steps)."""
    return int(warmup) if warmup >= 1 else math.ceil(num_training_steps * warmup)


def build_scheduler(optimizer, name: str, kwargs: dict, warmup: int, num_training_steps: int):
    """The one schedule builder of both engines: transformers' ``get_scheduler`` with lmforge's defaults."""
    from transformers import get_scheduler

    name, kwargs = scheduler_kwargs(name, kwargs, num_training_steps, warmup)
    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=num_training_steps,
                         scheduler_specific_kwargs=kwargs)


def scheduler_for(cfg, optimizer, num_training_steps: int):
    """The native engine's schedule from ``train.lr_scheduler_type`` (the HF Trainer's: ``hf_scheduler``)."""
    t = cfg.train
    warmup = warmup_steps_for(t.warmup_ratio if t.warmup_ratio is not None else t.warmup_steps, num_training_steps)
    return build_scheduler(optimizer, t.lr_scheduler_type, t.lr_scheduler_kwargs, warmup, num_training_steps)


def hf_scheduler(args, optimizer, num_training_steps: int):
    """The HF engine's schedule from its TrainingArguments (``LmforgeTrainerMixin.create_scheduler``)."""
    name = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    return build_scheduler(optimizer, name, args.lr_scheduler_kwargs, args.get_warmup_steps(num_training_steps),
                           num_training_steps)


def default_learning_rate(cfg: Config) -> float:
    """train.learning_rate as given (0 included); only an unset one gets the method default."""
    if cfg.train.learning_rate is not None:
        return cfg.train.learning_rate
    return 2e-4 if cfg.peft.kind != "none" else 2e-5


def build_optimizer(cfg: Config, model, named: list) -> torch.optim.Optimizer:
    """AdamW (fused by default on CPU: one kernel for every tensor), LAMB or SGD over ``named`` (name,
    parameter) pairs; no weight decay on biases and norms (the same groups as the HF Trainer)."""
    from transformers import Trainer

    t = cfg.train
    decay = set(Trainer.get_decay_parameter_names(None, model))
    groups = [{"params": [p for n, p in named if n in decay], "weight_decay": t.weight_decay},
              {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    lr = default_learning_rate(cfg)
    if t.optim == "lamb":
        return Lamb(groups, lr=lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon)
    if t.optim == "sgd":
        return torch.optim.SGD(groups, lr=lr)
    fused = t.optim in ("adamw_torch", "adamw_torch_fused")  # measured faster than foreach on CPU
    return torch.optim.AdamW(groups, lr=lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon,
                             fused=fused, foreach=not fused)
