"""lmforge's own training loop (``train.engine: native``) for causal-LM pretraining, SFT, DPO, ORPO, KTO and GRPO.

A plain PyTorch loop, read top to bottom like nanoGPT's ``train.py``: fetch the step's rows, forward,
loss, backward, all-reduce, clip, step, log, evaluate, checkpoint. It exists beside the HF Trainer engine
because speed and exact promises need control of every step (the Trainer's per-step callbacks, its
autocast of fp32 master weights and its DDP wrapper cost time on CPU; see docs/training.md). It shares
everything else with that engine: model/tokenizer/PEFT loading and the output directory (``run.py``), data
(``prepare_split``), the checkpoint layout (``checkpoint-STEP/`` with ``trainer_state.json``, written
atomically) and the outputs (metrics.jsonl, plots, report.md, tensorboard: ``tracking.py``).

Several processes run DDP (gradients summed in one all-reduce per step, here) or FSDP2 (``sharding.py``).

What a method contributes is an *objective* (``objective.Objective``: ``sft.CausalLMObjective``,
``dpo.DPOObjective``, ...): how it collates its rows, the units its loss is averaged over (loss tokens, pairs),
the loss sum of a micro-batch and the sums of its metrics, and hooks with no-op defaults (KTO's KL estimate
before each step, DPO's reference scoring before the first). A step's sums travel in one typed record
(``objective.StepTotals``), packed for the step's single all-reduce. The loop, the averaging over a whole step
and everything around it are here.

The promises, each a test (tests/test_native.py and the invariance tests parametrized over the engine):
  * a step's loss is the sum over its units (loss tokens, pairs) divided by their number in the whole step
    (all micro-batches, all ranks; term by term for a loss of several), so 1 x 8 == 8 x 1 with accumulation
    == 2 processes x 4;
  * the rows of step k are a function of (seed, k) alone (``EpochSampler``), and a checkpoint holds the
    weights, optimizer, scheduler and every rank's RNG, so a resumed run equals an uninterrupted one bitwise;
  * SIGTERM/SIGINT end the current step, write a checkpoint and exit with a message saying how to resume.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from lmforge.config import Config
from lmforge.distributed.ranks import nodes
from lmforge.errors import ConfigError, TrainingError
from lmforge.log import log
from lmforge.training import flops, report, stopping
from lmforge.training.checkpoint import (
    EpochSampler, load_weights, read_weights, rng_state, set_rng_state, weights_bytes, write_checkpoint_atomically,
)
from lmforge.training.dropout import use_fast_lora_dropout
from lmforge.training.lora_linear import use_fused_lora
from lmforge.training.memory import HeapTrim
from lmforge.training.objective import Objective, StepTotals
from lmforge.training.optim import build_optimizer, scheduler_for
from lmforge.training.outputs import progress_postfix
from lmforge.training.precision import MasterWeights
from lmforge.training.recompute import NormOutputs, use_recompute_layers
from lmforge.training.run import finish_run
from lmforge.training.sharding import OPTIMIZER_DIR, Sharded, full_norm
from lmforge.training.tracking import Profiler, Tracker, Window, progress_bar

ENGINE = "native"


class StepRows:
    """Which dataset rows each optimizer step trains on: a function of (seed, step) only.

    Step k of an epoch takes the next ``global_batch`` indices of that epoch's seeded permutation; inside a
    step, micro-batch m of rank r is the slice ``[(m * world + r) * B, ... + B)``. So the same rows make up a
    step whatever the split into processes and micro-batches (the last step of an epoch may be short).
    """

    def __init__(self, n_rows: int, seed: int, per_device: int, accumulation: int, world: int):
        self.n, self.per_device, self.accumulation, self.world = n_rows, per_device, accumulation, world
        self.global_batch = per_device * accumulation * world
        self.steps_per_epoch = max(1, math.ceil(n_rows / self.global_batch))
        self.sampler = EpochSampler(n_rows, seed)
        self._epoch, self._perm = -1, []

    def for_step(self, step: int, rank: int) -> list[list[int]]:
        """The micro-batches (lists of row indices) of 0-based ``step`` for ``rank``; some may be empty."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self.sampler.set_epoch(epoch)
            self._epoch, self._perm = epoch, list(self.sampler)
        rows = self._perm[k * self.global_batch:(k + 1) * self.global_batch]
        B = self.per_device
        return [rows[(m * self.world + rank) * B:(m * self.world + rank + 1) * B] for m in range(self.accumulation)]


class NativeTrainer:
    """Trains ``model`` on ``train_ds``; ``train(resume)`` runs the loop and returns the output directory."""

    def __init__(self, cfg: Config, model, tokenizer, prec, train_ds, eval_ds, objective: Objective,
                 data_lines: list[str], generation=None, stream=None):
        self.cfg, self.t = cfg, cfg.train
        self.model, self.tokenizer, self.prec = model, tokenizer, prec
        self.train_ds, self.eval_ds, self.objective = train_ds, eval_ds, objective
        self.terms = objective.terms  # kinds of units counted
        self.stat_units = objective.stat_units  # metric -> index of the units it is averaged over
        self.data_lines = data_lines
        self.generation = generation  # eval.metrics: a GenerationScorer, or None
        self.out = Path(cfg.train.output_dir)
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.stream = stream  # data.streaming: a streaming.PackedStream of this rank's rows (train_ds is None)
        self.rows = StepRows(len(train_ds), cfg.train.seed, cfg.train.per_device_train_batch_size,
                             cfg.train.gradient_accumulation_steps, self.world) if stream is None else None
        self.global_batch = cfg.train.per_device_train_batch_size * cfg.train.gradient_accumulation_steps * self.world
        self.reuse = objective.reuse_steps  # optimizer steps on each step's rows (GRPO: num_iterations per rollout)
        self.max_steps = (cfg.train.max_steps if cfg.train.max_steps > 0
                          else math.ceil(cfg.train.num_train_epochs * self.rows.steps_per_epoch) * self.reuse)
        # full fine-tune in bf16: the model computes in bf16, the optimizer updates fp32 masters (precision.py)
        self.master = None
        self.sharded = None  # train.distributed: fsdp: a sharding.Sharded, made in train() after any resume weights
        self.fsdp = cfg.train.distributed == "fsdp"
        if prec.compute in (torch.bfloat16, torch.float16) and cfg.peft.kind in ("none", "lora", "dora") and not self.fsdp:
            self.master = MasterWeights(model, prec.compute, trainable_only=cfg.peft.kind != "none",
                                        model_grads=cfg.train.gradient_accumulation_steps == 1 and self.world == 1)
        if cfg.peft.kind in ("lora", "dora", "qlora"):  # PEFT's per-layer dropout draws, 3.6x cheaper
            use_fast_lora_dropout(model)
            use_fused_lora(model)  # plain LoRA linears: one autograd node each (training/lora_linear.py)
        use_recompute_layers(model)  # RMSNorm and SwiGLU keep less for the backward (training/recompute.py)
        if cfg.train.gradient_checkpointing:  # recompute each decoder layer's activations in the backward
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.params: list[torch.nn.Parameter] = []  # what the optimizer updates; set in train()
        self.optimizer = self.scheduler = None
        self.step = 0
        self.tokens_seen = 0  # non-padding tokens trained on, all ranks, since step 0 (kept across a resume)
        self.pending_signal: int | None = None  # a stop signal this process received, for the next all-reduce
        self.stop_signal: int | None = None  # the stop signal every rank agreed on in a step's all-reduce
        self.step_rows: list[int] = []  # this rank's dataset rows in the current step
        self.skipped = 0  # steps whose loss was not finite and whose update was dropped (train.on_nan: skip_batch)
        self.heap = HeapTrim()  # a step's freed memory goes back to the OS once RSS has grown (training/memory.py)
        self.tracker = Tracker(self.out, cfg.train.report_to) if self.rank == 0 else None
        self.flops_per_token: float | None = None
        self.peak = flops.process_peak(prec.compute, model.config)  # this process's share, as the estimate's

    # ------------------------------------------------------------------------------------------ the loop
    def train(self, resume: str | None) -> Path:
        ckpt = Path(resume) if resume else None
        self.model.train()  # before the FLOP count too: bitsandbytes repacks 4-bit weights for inference in eval mode
        report.record_base_answers(self.cfg, self.model, self.tokenizer, resumed=ckpt is not None)
        if ckpt:
            self.load_weights(ckpt)  # into the whole model, before FSDP would shard it
            if self.stream is not None:  # before the FLOP count peeks at it
                self.stream.load_state_dict(torch.load(ckpt / f"stream_{self.rank}.pt", weights_only=False))
        self.flops_per_token = self.count_flops()  # on the whole model too
        self.build_optimizer()
        if ckpt:
            self.load_checkpoint(ckpt)
        else:
            self.objective.start(self)  # e.g. DPO: reference log-probs of the starting weights
            torch.manual_seed(self.t.seed)
        log(f"native engine: {self.max_steps} steps, {self.global_batch} rows per step "
            f"({self.t.per_device_train_batch_size} x {self.t.gradient_accumulation_steps} accumulation x "
            f"{self.world} process{'es' if self.world > 1 else ''}), compute {self.prec.compute}")
        if self.world > 1:
            log(f"distributed: {self.t.distributed} on {self.world} processes, backend {dist.get_backend()}, native "
                "engine (" + (f"parameters sharded per decoder layer, mesh {self.sharded.describe()}, gradients "
                              "reduce-scattered once per step" if self.sharded
                              else "gradients summed in one all-reduce per step") + ")")
        window = Window(self.objective.stat_keys)
        self.heap.now()  # what loading freed goes back to the OS before the first step's activations
        profiler = Profiler(self.cfg, self.out) if self.rank == 0 else None
        with self.signals():
            bar = progress_bar(self.max_steps, self.step) if self.rank == 0 else None
            while self.step < self.max_steps:
                if profiler:
                    profiler.before_step(self.step + 1)
                t0 = time.perf_counter()
                loss, n_tokens, grad_norm, stats = self.train_step()
                self.step += 1
                if math.isfinite(loss):
                    window.add(loss, n_tokens, time.perf_counter() - t0, stats)
                    self.tokens_seen += n_tokens
                if profiler:
                    profiler.after_step(self.step)
                if bar is not None:
                    bar.update(1)
                if self.step % self.t.logging_steps == 0 or self.step in (1, self.max_steps):
                    self.log_train(window.take(), grad_norm, bar)
                if (self.eval_ds is not None and self.t.eval_strategy != "no"
                        and self.step % (self.t.eval_steps or self.t.save_steps) == 0):
                    self.evaluate()
                if ((self.t.save_strategy != "no" and self.step % self.t.save_steps == 0)
                        or self.stop_signal is not None):  # a signal checkpoints whatever save_strategy says
                    self.save_checkpoint()
                if self.stop_signal is not None:
                    raise TrainingError(self.interrupted_message())
            if bar is not None:
                bar.close()
        return self.save_final()

    def build_optimizer(self) -> None:
        """Shard the model (train.distributed: fsdp), then the optimizer and schedule over what trains."""
        if self.fsdp:
            hybrid = self.t.fsdp_sharding == "hybrid" and nodes() > 1  # on one node hybrid is full sharding
            self.sharded = Sharded(self.model, self.objective, self.prec.compute, nodes() if hybrid else 1)
        named = self.master.named_trainable() if self.master else [
            (n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self.optimizer = build_optimizer(self.cfg, self.model, named)
        if self.master:  # its states before the first step's activations (precision.py)
            self.master.init_state(self.optimizer)
        self.scheduler = scheduler_for(self.cfg, self.optimizer, self.max_steps)

    def train_step(self) -> tuple[float, int, float, dict[str, float]]:
        """One optimizer step over this step's micro-batches; returns (loss, tokens trained, grad norm, the
        objective's metrics averaged over the step's units)."""
        records = self.step_records()
        self.step_rows = sorted(i for idx, _ in records for i in idx or [])  # for a NaN's message
        micro = [self.objective.batch("train", idx, recs) if recs else None for idx, recs in records]
        # e.g. KTO's KL estimate, GRPO's rollouts (which make the units its loss is averaged over)
        self.objective.before_step(self, [b for b in micro if b is not None])
        # the step's loss is sum / (units of the whole step: loss tokens or pairs, every micro-batch and rank)
        local_units = [0.0] * self.terms
        for b in micro:
            if b is not None:
                local_units = [u + c for u, c in zip(local_units, self.units(b))]
        total = self.all_reduce(torch.tensor(local_units))
        denominators = [max(u, 1.0) for u in total.tolist()]
        keys = self.objective.stat_keys
        totals = StepTotals.zeros(self.terms, len(keys))
        for m, batch in enumerate(micro):
            if batch is None and not self.sharded:
                continue
            weight = 1.0 if batch is not None else 0.0  # FSDP: every rank runs every micro-batch's forward
            batch = batch if batch is not None else self.stand_in()
            tokens = int(batch.pop("num_tokens"))
            loss, stats = self.forward(batch, sync=m == len(micro) - 1)
            self.share(loss, weight, denominators).backward()
            if self.master:
                self.master.collect_grads()
            totals.add(loss, [stats[k] for k in keys], weight, tokens=tokens)
        # one all-reduce for every gradient, the loss, the token count, the ranks with a pending signal (counted
        # per signal, so a sum names it) and the metrics. A signal that arrives after this all-reduce waits for
        # the next step: every rank must decide to checkpoint on the same step, or one would wait alone.
        if self.pending_signal is not None:
            totals.sigterm, totals.sigint = float(self.pending_signal == signal.SIGTERM), \
                float(self.pending_signal == signal.SIGINT)
        totals = StepTotals.unpack(self.all_reduce_grads(totals.pack()), self.terms)
        loss_value = sum(v / d for v, d in zip(totals.loss.tolist(), denominators))
        n_tokens = int(totals.tokens)
        step_stats = {k: v / denominators[self.stat_units.get(k, 0)] for k, v in zip(keys, totals.stats.tolist())}
        if (totals.sigterm or totals.sigint) and self.stop_signal is None:
            self.stop_signal = signal.SIGTERM if totals.sigterm else signal.SIGINT
        if not math.isfinite(loss_value):  # the same summed value on every rank: they all decide alike
            return self.non_finite(loss_value), n_tokens, float("nan"), step_stats
        max_norm = self.t.max_grad_norm or float("inf")
        grad_norm = full_norm(self.master.clip_grad_norm_(max_norm) if self.master else
                              torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        if self.master:  # the fp32 masters are updated, then rounded into the model
            self.master.step(self.optimizer)
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.heap.after_step()  # part of the step's time (and of what benchmarks/ measure)
        return loss_value, n_tokens, grad_norm, step_stats

    def non_finite(self, loss_value: float) -> float:
        """A NaN/inf step loss, before any update: stop (``train.on_nan: stop``) or drop the step's update."""
        if self.t.on_nan == "stop":  # naming the step's rows by their source file:line
            raise TrainingError(stopping.nan_message(self.step + 1, self.out, self.train_ds, self.step_rows))
        self.optimizer.zero_grad(set_to_none=True)  # the masters' gradients (or the model's): nothing is applied
        self.model.zero_grad(set_to_none=True)
        self.scheduler.step()  # the step still counts: its rows and learning rate, as on the hf engine
        self.skipped += 1
        log(f"step {self.step + 1}: the loss is not finite; its update is skipped (train.on_nan: skip_batch, "
            f"{self.skipped} skipped so far)")
        return loss_value

    # ------------------------------------------------------------------------------------------ pieces
    def units(self, batch: dict) -> list[float]:
        """The units of each loss term in ``batch`` (an objective with one term counts one number)."""
        n = self.objective.count(batch)
        return [float(c) for c in n] if isinstance(n, tuple) else [float(n)]

    @staticmethod
    def share(loss: torch.Tensor, weight: float, denominators: list[float]) -> torch.Tensor:
        """A micro-batch's share of the step loss: each term's sum over that term's units in the whole step."""
        if loss.dim() == 0:
            return loss * (weight / denominators[0])
        return (loss * loss.new_tensor([weight / d for d in denominators[:loss.numel()]])).sum()

    def forward(self, batch: dict, sync: bool = True) -> tuple[torch.Tensor, dict]:
        """The objective's (loss sum, metric sums) on ``batch``; through the FSDP root when sharded."""
        if self.sharded:
            return self.sharded.loss(batch, sync)
        with self.autocast(), NormOutputs():  # the norms' outputs are remade in the backward (training/recompute.py)
            return self.objective.loss(self.model, batch)

    def stand_in(self) -> dict:
        """A batch for a rank without rows in a micro-batch under FSDP (its loss is weighted 0): the forward
        must still run, as every rank gathers the sharded weights together."""
        return self.objective.batch("train", [0], [self.stream.peek() if self.stream else self.train_ds[0]])

    def count_flops(self) -> float | None:
        """FLOPs per token of forward + backward, counted on this step's first row (``flops.per_token``), for
        objectives that are a token loss (pretrain, SFT); None for the others."""
        if self.stream is not None:
            record = self.stream.peek()
        else:
            first = next((idx for idx in self.rows.for_step(self.step // self.reuse, self.rank) if idx), [0])
            record = self.train_ds[first[0]]
        batch = self.objective.flops_batch([record])
        return flops.per_token(self.model, batch, self.autocast()) if batch is not None else None

    def step_records(self) -> list[tuple[list[int] | None, list[dict]]]:
        """This rank's micro-batches of the coming step: (dataset row indices, or None from a stream; records)."""
        if self.stream is not None:
            return [(None, self.stream.take(self.t.per_device_train_batch_size))
                    for _ in range(self.t.gradient_accumulation_steps)]
        return [(idx, [self.train_ds[i] for i in idx]) for idx in self.rows.for_step(self.step // self.reuse, self.rank)]

    def epoch(self) -> float | None:
        return self.step / (self.rows.steps_per_epoch * self.reuse) if self.rows else None  # a stream counts no epochs

    def planned_batches(self):
        """(split, [(rows, dataset), ...]) of every micro-batch this rank will run: the steps still to come and
        every evaluation; for objectives that prepare something per row before training starts."""
        train = [(idx, self.train_ds) for step in range(self.step // self.reuse, -(-self.max_steps // self.reuse))
                 for idx in self.rows.for_step(step, self.rank) if idx]
        seen, unique = set(), []
        for idx, ds in train:  # rows repeat across epochs; prepare each once
            fresh = [i for i in idx if i not in seen]
            seen.update(fresh)
            if fresh:
                unique.append((fresh, ds))
        yield "train", unique
        if self.eval_ds is not None:
            yield "eval", [(idx, self.eval_ds) for idx in self.eval_batches()]

    def eval_batches(self) -> list[list[int]]:
        """This rank's eval rows (every world-th), in batches of per_device_eval_batch_size."""
        B = self.t.per_device_eval_batch_size
        mine = list(range(self.rank, len(self.eval_ds), self.world))
        return [mine[start:start + B] for start in range(0, len(mine), B)]

    def autocast(self):
        """QLoRA and prompt tuning: PEFT keeps adapter weights in fp32 and autocast runs them in bf16. Full
        fine-tunes, LoRA and DoRA need none: their weights are bf16 with fp32 masters (``MasterWeights``)."""
        if self.prec.compute in (torch.float32, torch.float64) or self.master or self.sharded:  # FSDP2 casts as it gathers
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.prec.compute)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=op)
        return t

    def all_reduce_grads(self, extra: torch.Tensor) -> torch.Tensor:
        """Sum every trainable gradient (and ``extra``) over the ranks in one flat buffer; returns ``extra``.

        Gradients are summed, not averaged: each rank's loss is already divided by the whole step's tokens.
        This is DDP's bucketed all-reduce done once per optimizer step (never per micro-batch), without the
        DDP wrapper, whose forward hook the head-only loss path would bypass.
        """
        if self.world == 1:
            return extra
        if self.sharded:  # FSDP reduce-scattered the gradients in the last backward
            return self.all_reduce(extra)
        grads = [p.grad if p.grad is not None else torch.zeros(p.shape, dtype=p.dtype) for p in self.params]
        wide = torch.promote_types(self.prec.compute, torch.float32)  # fp32, or fp64 when computing in fp64
        flat = torch.cat([g.reshape(-1).to(wide) for g in grads] + [extra.to(wide)])
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(self.params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
            offset += n
        return flat[offset:]

    def log_train(self, window: dict, grad_norm: float, bar) -> None:
        row = {"step": self.step}  # a window of skipped steps only (train.on_nan: skip_batch) has no loss
        row.update({k: round(window[k], 6) for k in ("loss",) + self.objective.stat_keys if window[k] is not None})
        if math.isfinite(grad_norm):
            row["grad_norm"] = round(grad_norm, 6)
        row["learning_rate"] = self.scheduler.get_last_lr()[0]
        if self.rows:
            row["epoch"] = round(self.epoch(), 4)
        if window["seconds"] > 0 and window["tokens"] > 0:
            tps = window["tokens"] / window["seconds"]
            row["tokens_per_second"] = round(tps, 2)
            if self.flops_per_token:
                row["flops_per_token"] = round(self.flops_per_token)
                row["mfu"] = round(flops.mfu(self.flops_per_token, tps, self.peak, self.world), 4)
        row["tokens_seen"] = self.tokens_seen
        row.update(self.objective.logged("train"))  # e.g. GRPO's rewards and rollout time over the window
        if self.t.on_nan == "skip_batch":
            row["skipped_batches"] = self.skipped
        if self.tracker:
            self.tracker.write(row)
        if bar is not None:
            bar.set_postfix(progress_postfix(row), refresh=False)

    @torch.no_grad()
    def evaluate(self) -> None:
        """eval_loss (and eval_ metrics): sums over every eval row (rows split across ranks) over their units."""
        self.model.eval()
        keys, K = self.objective.stat_keys, self.terms
        totals = StepTotals.zeros(K, len(keys))
        batches: list = self.eval_batches()
        made = [self.objective.batch("eval", idx, [self.eval_ds[i] for i in idx]) for idx in batches]
        self.objective.before_step(self, made)  # e.g. KTO's KL estimate over the whole eval set, GRPO's rollouts
        if self.sharded:  # every rank runs as many forwards (the weights are gathered together); extras count 0
            most = self.all_reduce(torch.tensor([len(batches)]), dist.ReduceOp.MAX).item()
            batches += [None] * (most - len(batches))
        for k, idx in enumerate(batches):
            weight = 1.0 if idx is not None else 0.0
            batch = made[k] if idx else self.stand_in()
            batch.pop("num_tokens", None)
            loss, stats = self.forward(batch)
            totals.add(loss, [stats[k] for k in keys], weight, units=self.units(batch))
        totals = StepTotals.unpack(self.all_reduce(totals.pack()), K)
        units = [max(u, 1) for u in totals.units.tolist()]
        row = {"step": self.step, "eval_loss": round(sum(v / u for v, u in zip(totals.loss.tolist(), units)), 6)}
        row.update({f"eval_{k}": round(v / units[self.stat_units.get(k, 0)], 6)
                    for k, v in zip(keys, totals.stats.tolist())})
        row.update({f"eval_{k}": v for k, v in self.objective.logged("eval").items()})
        if self.objective.perplexity:  # a token NLL: pretrain and sft
            row["eval_perplexity"] = math.exp(min(row["eval_loss"], 50.0))
        if self.generation is not None and self.rank == 0:
            row.update(self.generation.score(self.model))
        self.model.train()
        if self.tracker:
            self.tracker.write(row, plot=True)
            log(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "step"))

    # ------------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        """checkpoint-STEP/: weights (or adapter), optimizer, scheduler, every rank's RNG, the data position."""
        name = f"checkpoint-{self.step}"

        def write(tmp: Path) -> None:
            torch.save(rng_state(), tmp / f"rng_state_{self.rank}.pth")
            objective = self.objective.state_dict()  # e.g. DPO's reference log-probs of this rank's rows
            if objective is not None:
                torch.save(objective, tmp / f"objective_{self.rank}.pt")
            if self.stream is not None:  # where this rank's stream stands, and the rows it read ahead
                torch.save(self.stream.state_dict(), tmp / f"stream_{self.rank}.pt")
            weights = self.gather_weights()  # collective under FSDP
            if self.sharded:
                self.sharded.save_optimizer(self.optimizer, tmp / OPTIMIZER_DIR)  # collective: each rank its shard
            if self.rank != 0:
                return
            self.save_model(tmp, weights)
            self.tokenizer.save_pretrained(tmp)  # as the HF engine's checkpoints: each one loads (or consolidates) alone
            if not self.sharded:
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / "config.yaml").write_text((self.out / "config.yaml").read_text())
            state = {"global_step": self.step, "max_steps": self.max_steps, "engine": ENGINE,
                     "world_size": self.world, "epoch": self.epoch(),
                     "tokens_seen": self.tokens_seen, "skipped_batches": self.skipped}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))

        write_checkpoint_atomically(self.out, name, write, self.barrier, is_main=self.rank == 0,
                                    save_total_limit=self.t.save_total_limit)
        log(f"checkpoint {self.out / name}")

    def load_weights(self, ckpt: Path) -> None:
        """A checkpoint's weights into the whole model (and its fp32 masters)."""
        state = json.loads((ckpt / "trainer_state.json").read_text())  # the engine was checked in run.py
        if state["world_size"] != self.world:
            raise ConfigError(f"train.resume: {ckpt} was written by {state['world_size']} process(es), this run "
                              f"has {self.world}; exact resume needs the same number (every rank's RNG is saved)")
        weights = read_weights(self.model, ckpt)
        if self.master:
            self.master.load_state_dict(weights)
        else:
            load_weights(self.model, weights, ckpt)

    def load_checkpoint(self, ckpt: Path) -> None:
        """Everything but the weights (``load_weights``): optimizer, schedule, RNG, objective, counters."""
        state = json.loads((ckpt / "trainer_state.json").read_text())
        if self.sharded:
            self.sharded.load_optimizer(self.optimizer, ckpt / OPTIMIZER_DIR)
        else:
            self.optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        self.scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
        set_rng_state(torch.load(ckpt / f"rng_state_{self.rank}.pth", weights_only=False))
        if self.objective.state_dict() is not None:
            self.objective.load_state_dict(torch.load(ckpt / f"objective_{self.rank}.pt", weights_only=True))
        self.step, self.tokens_seen = state["global_step"], state["tokens_seen"]
        self.skipped = state.get("skipped_batches", 0)

    def save_final(self) -> Path:
        def write(staged: Path) -> None:
            weights = self.gather_weights()  # collective under FSDP
            if self.rank == 0:
                self.save_model(staged, weights)
                self.tokenizer.save_pretrained(staged)

        if self.rank == 0:
            self.tracker.close()
        finish_run(self.cfg, write, self.barrier, self.rank == 0, self.model, self.tokenizer, ENGINE, self.step,
                   self.data_lines, expected_bytes=weights_bytes(self.model))
        self.barrier()
        return self.out

    def gather_weights(self) -> dict | None:
        """Under FSDP the full state dict (on rank 0; every rank must call this), else None."""
        return self.sharded.full_state_dict() if self.sharded else None

    def save_model(self, directory: Path, weights: dict | None = None) -> None:
        if self.master:  # the fp32 weights, not their bf16 rounding; under bf16 rebuilt for the file (precision.py),
            self.heap.now()  # onto the pages the steps' freed heap gives back first (else the run's peak RSS, +0.1 GB)
            self.master.save_pretrained(directory)
        else:  # weights: FSDP's gathered state dict (fp32: the sharded parameters are the masters)
            self.model.save_pretrained(directory, state_dict=weights, safe_serialization=True)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    # ------------------------------------------------------------------------------------------ signals
    def signals(self):
        """SIGTERM/SIGINT: finish the step, checkpoint, exit (see ``train``); a second signal stops at once."""

        def first(signum: int) -> None:
            self.pending_signal = signum  # train_step's all-reduce tells every rank, itself included
            log(f"{signal.Signals(signum).name}: finishing step {self.step + 1}, then writing a checkpoint")

        return stopping.stop_signals(first)

    def interrupted_message(self) -> str:
        return stopping.interrupted_message(self.stop_signal, self.step, self.max_steps, self.out)
