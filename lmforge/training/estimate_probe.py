"""The speed half of ``lmforge estimate`` on a CPU: a short probe of the run's own step, measured on this machine.

Why measured: a step is not its matmuls. Once they run on AMX tiles, the elementwise work, casts, per-sample
attention, the optimizer and per-op overhead are most of a step, and they do not scale with the matmul peak: the
efficiency (MFU) fitted on a Zen 4 was 2.2-2.7x too optimistic on a Xeon with AMX-BF16 (docs/estimate.md). So the
probe builds ONE decoder layer of the run's model (its config with one layer, random weights, the native engine's
code path: its precision (``MasterWeights``), PEFT's adapters with the engine's fused LoRA
and dropout, gradient checkpointing, the packed per-sample attention and the chunked loss), and times on a
micro-batch of the run's mean shape, after a warm-up, the median of a few repeats of:

  * the decoder layer's forward + backward, timed alone on the arguments it had in the model, after two warm-up
    passes of its own (with checkpointing the recomputed forward is inside its backward). Not inside the one-layer
    model's few passes: right after one warm-up they read 67-85 ms per layer where the real run's steady steps take
    55-58 ms and the layer alone 54-59 (SmolLM2-135M, 8 x 209, AMX kind), as the first passes of a process are slow
    (the real run's first step: 74 ms per layer, 10k page faults each, against under 1k in later steps);
  * the rest of forward + backward: embeddings, final norm, LM head and loss (``losses.token_loss_sum``), hooks
    around the layer and on its input's and output's gradients taking the layer's part out;
  * the optimizer step as the engine takes it (master gradients, clipping, AdamW, the masters copied back, zeroing),
    per trainable parameter (timed once, after its warm-up step).

Seconds per micro-batch = layers x layer + rest; per step, x accumulation + the optimizer scaled to the run's
trainable parameters. One measurement takes ~2 s on SmolLM2-135M after the model's build (on a machine's first run
the build compiles lmforge's training kernels, ~6 s, once: a library load after) and is cached per CPU kind, threads,
torch, dtype, layer shape, method kind and micro-batch shape (``probe.json`` in lmforge's cache).
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import statistics
import time
from dataclasses import dataclass

import torch

from lmforge.adapters import apply_peft
from lmforge.cache import cached_measurement
from lmforge.config import Config
from lmforge.data.packing import PACKED_ATTENTION, CausalCollator
from lmforge.data.tokenize import IGNORE
from lmforge.training.attention import use_packed_attention
from lmforge.training.dropout import use_fast_lora_dropout
from lmforge.training.flops import BUSY, cpu_kind, measured_alone
from lmforge.training.lora_linear import use_fused_lora
from lmforge.training.losses import token_loss_sum
from lmforge.training.optim import build_optimizer
from lmforge.training.precision import MasterWeights
from lmforge.training.recompute import NormOutputs, use_recompute_layers

CACHE_FILE = "estimate_probe.json"
PROBE_VERSION = 9  # raised when the engine's step changes what a probe measures (2: recompute.py's layers; 3: LoRA
# dropout; 4: the recompute layers kept through train() (62c1bf7); 5: split bf16 masters, precision.py; 6: the
# recompute layers' kernels compiled; 7: bf16 gradients widened inside the masters' step; 8: the layer's time from the
# layer alone after its warm-up, the budgets counted after the build: since 6 a fresh process's build ate them, and the
# layer's time came from two passes of the cold one-layer model, 76-85 ms against 55-58 in the run; 9: the recompute
# layers' kernels lmforge's own, training/train_kernels.cpp, instead of Inductor's)
BUDGET_SECONDS = 1.2  # timed repeats stop once the probe has run this long (after the model's build) ...
MIN_REPEATS, MAX_REPEATS = 2, 3  # ... after at least this many (and at most this many), after one warm-up
LAYER_BUDGET_SECONDS, LAYER_REPEATS = 2.0, 8  # then the layer alone, its time: at least MIN_REPEATS of these ...
LAYER_WARMUP = 2  # ... after this many passes not kept (the first passes of a fresh process run slower)


@dataclass
class ProbeBatch:
    """The micro-batch the probe runs: ``rows`` rows padded to ``positions`` each, of which ``tokens`` are
    samples of ``sample`` tokens (the last one shorter) and the last ``loss`` of each sample's carry loss."""
    rows: int
    positions: int
    tokens: int
    sample: int
    loss_fraction: float
    packed: bool  # rows of several samples (the run packs); else one sample per row, padded

    def describe(self) -> str:
        return (f"{self.rows} rows x {self.positions} positions, {self.tokens} tokens per row in "
                + (f"samples of {self.sample}" if self.packed else "one sample")
                + f", {100 * self.loss_fraction:.0f}% with loss")


def probe_batch(rows: int, positions: float, tokens: float, attention: float, loss_tokens: float,
                per_sample: bool) -> ProbeBatch:
    """The mean micro-batch (``estimate.MicroBatch`` sums) as whole rows: each row holds the mean tokens per row, in
    samples of the length whose square sum is the attention's (sum n^2 / sum n), or one sample per row."""
    T = max(1, round(positions / rows))
    r = max(1, min(T, round(tokens / rows)))
    n = max(1, min(r, round(attention / max(tokens, 1)))) if per_sample else r
    return ProbeBatch(rows, T, r, n, round(min(1.0, loss_tokens / max(tokens, 1)), 2), per_sample)


def method_kind(cfg: Config) -> str:
    """What of the method the probe's time depends on: full or the adapter (its rank, targets and dropout), and
    gradient checkpointing."""
    p = cfg.peft
    kind = "full" if p.kind == "none" else f"{p.kind} r={p.r} targets={p.target_modules} dropout={p.dropout}"
    return kind + (" + gradient checkpointing" if cfg.train.gradient_checkpointing else "")


def probed(cfg: Config, model_config, compute, batch: ProbeBatch, threads: int,
           now: bool = True) -> tuple[dict | None, bool]:
    """(the probe's figures, whether they came from the cache): measured once per machine kind and key; ``now``
    False: only from the cache (None when it is not there)."""
    layer = {k: v for k, v in sorted(model_config.to_dict().items()) if isinstance(v, (int, float, str, bool))
             and k not in ("num_hidden_layers", "transformers_version", "_name_or_path", "torch_dtype", "dtype")}
    key = " | ".join([f"probe {PROBE_VERSION}", cpu_kind(), f"threads {threads}", f"torch {torch.__version__}",
                      str(compute),
                      json.dumps(layer, sort_keys=True), method_kind(cfg), batch.describe()])
    return cached_measurement(CACHE_FILE, key, (lambda: measure(cfg, model_config, compute, batch, threads))
                              if now else None, "probing a training step", keep=lambda v: v["others_busy"] <= BUSY)


def measure(cfg: Config, model_config, compute, batch: ProbeBatch, threads: int) -> dict:
    def run() -> dict:
        with torch.random.fork_rng(devices=[]):
            return _measure(cfg, model_config, compute, batch)

    out, others = measured_alone(run, threads)
    out["others_busy"] = others  # not cached when others were busy (flops.BUSY)
    return out


def _one_layer_model(cfg: Config, model_config, compute, layers: int = 1):
    """The run's model with one decoder layer (or ``layers``), random weights, set up as the native engine sets it
    up."""
    from transformers import AutoModelForCausalLM  # lazy: transformers loads only when a probe runs
    from transformers.initialization import no_init_weights


    conf = copy.deepcopy(model_config)
    conf.num_hidden_layers = layers
    if isinstance(getattr(conf, "layer_types", None), list):
        conf.layer_types = conf.layer_types[:layers]
    conf._attn_implementation = "sdpa"
    # in the compute dtype: a full fine-tune loads fp32 weights (run.precision_for), but MasterWeights turns them into
    # the same bf16 model + fp32 masters
    with no_init_weights():  # transformers' init of a 49k x 576 embedding alone takes ~0.2 s: filled below instead
        model = AutoModelForCausalLM.from_config(conf, dtype=compute,
                                                 trust_remote_code=cfg.model.trust_remote_code)
    model.tie_weights()
    _fill(model)
    torch.manual_seed(0)
    model = apply_peft(model, cfg.peft)
    master = None
    if compute in (torch.bfloat16, torch.float16) and cfg.peft.kind in ("none", "lora", "dora"):
        # the gradients as a single process with one micro-batch a step keeps them (the common case)
        master = MasterWeights(model, compute, trainable_only=cfg.peft.kind != "none", model_grads=True)
    if cfg.peft.kind in ("lora", "dora"):
        use_fast_lora_dropout(model)
        use_fused_lora(model)
    use_recompute_layers(model)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    packed = use_packed_attention(model)
    model.train()
    return model, master, packed


def _fill(model) -> None:
    """Weights of the usual scale, cheaply: a random block of rows repeated down each matrix; norms (and biases)
    1. Only the time is read, and it does not depend on the values as long as they are ordinary numbers."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() < 2:
                p.fill_(1.0)
                continue
            rows = min(p.shape[0], 256)
            block = torch.empty((rows, *p.shape[1:])).uniform_(-0.02, 0.02, generator=g)
            for start in range(0, p.shape[0], rows):
                p[start:start + rows].copy_(block[:p.shape[0] - start])


def _batch(batch: ProbeBatch, vocab: int, packed: bool) -> dict:
    """Rows as the engine's collator makes them (``data.packing.CausalCollator``)."""
    g = torch.Generator().manual_seed(0)
    lens = [batch.sample] * (batch.tokens // batch.sample) + ([batch.tokens % batch.sample]
                                                              if batch.tokens % batch.sample else [])
    rows = []
    for _ in range(batch.rows):
        ids = torch.randint(0, vocab, (batch.tokens,), generator=g).tolist()
        labels, start = [IGNORE] * batch.tokens, 0
        for n in lens:  # the answer at each sample's end carries the loss
            k = round(n * batch.loss_fraction)
            labels[start + n - k:start + n] = ids[start + n - k:start + n]
            start += n
        rows.append({"input_ids": ids, "labels": labels, "seq_lens": lens})
    out = CausalCollator(0, packed=batch.packed, attn_implementation=PACKED_ATTENTION if packed else "sdpa")(rows)
    if out["input_ids"].shape[1] < batch.positions:  # padded to the micro-batch's longest row
        pad = batch.positions - out["input_ids"].shape[1]
        out["input_ids"] = torch.nn.functional.pad(out["input_ids"], (0, pad))
        out["labels"] = torch.nn.functional.pad(out["labels"], (0, pad), value=IGNORE)
        out["position_ids"] = torch.nn.functional.pad(out["position_ids"], (0, pad))
        if "attention_mask" in out and out["attention_mask"].dim() == 2:  # (B, T): 0 on padding
            out["attention_mask"] = torch.nn.functional.pad(out["attention_mask"], (0, pad))
        elif "attention_mask" in out:  # block-diagonal (B, 1, T, T): a padding position attends to itself only
            m = torch.nn.functional.pad(out["attention_mask"], (0, pad, 0, pad))
            idx = torch.arange(batch.tokens, batch.positions)
            m[:, :, idx, idx] = True
            out["attention_mask"] = m
    return out


def _layer_alone(model, layer, called: dict, start: float) -> list[float]:
    """The layer's forward + backward, the largest term (x layers): the layer alone on the arguments it had in the
    model (its input as a leaf that wants a gradient, a fixed output gradient), ``LAYER_WARMUP`` passes, then timed
    at least ``MIN_REPEATS`` times and at most ``LAYER_REPEATS`` while the probe's budget lasts."""
    from transformers.cache_utils import Cache  # lazy, as above

    # no KV cache: the model's forward made one (use_cache), and appending to it again would attend to old keys
    args = called["args"]
    kwargs = {k: None if isinstance(v, Cache) else v for k, v in called["kwargs"].items() if k != "use_cache"}
    h = (args[0] if args else kwargs.pop("hidden_states")).detach().requires_grad_(True)
    args = args[1:]
    grad, out, passes = None, [], 0
    while len(out) < LAYER_REPEATS and (len(out) < MIN_REPEATS or time.perf_counter() - start < LAYER_BUDGET_SECONDS):
        t0 = time.perf_counter()
        with NormOutputs():  # as the native engine's forward
            o = layer(h, *args, **kwargs)
        o = o[0] if isinstance(o, tuple) else o
        if grad is None:
            grad = torch.full_like(o, 1e-3)
        o.backward(grad)
        passes += 1
        if passes > LAYER_WARMUP:
            out.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
        h.grad = None
    return out


def _measure(cfg: Config, model_config, compute, batch: ProbeBatch) -> dict:
    begun = time.perf_counter()
    model, master, packed = _one_layer_model(cfg, model_config, compute)
    start = time.perf_counter()  # the budgets count from here: a machine's first build compiles the kernels (~6 s)
    inputs = _batch(batch, model_config.vocab_size, packed)
    named = master.named_trainable() if master else [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    optimizer = build_optimizer(cfg, model, named)
    layer = next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList))[0]
    marks: dict[str, float] = {}
    called: dict = {}  # the layer's arguments in the last pass, to time it alone

    def mark(name: str):
        def hook(_):
            marks.setdefault(name, time.perf_counter())
        return hook

    def before(module, args, kwargs):
        if "f0" in marks:  # the recompute of a checkpointed layer, inside its backward
            return
        marks["f0"] = time.perf_counter()
        called["args"], called["kwargs"] = args, kwargs
        h = args[0] if args else kwargs["hidden_states"]
        if h.requires_grad:
            h.register_hook(mark("b1"))  # the layer's input gradient: its backward is done

    def after(module, args, kwargs, out):
        if "f1" in marks:
            return
        marks["f1"] = time.perf_counter()
        h = out[0] if isinstance(out, tuple) else out
        h.register_hook(mark("b0"))  # the layer's output gradient arrives: its backward starts

    def inputs_need_grad(module, args, out):  # with a frozen embedding the layer's input gradient is still made, as
        return out.requires_grad_(True)  # in every layer above the first

    hooks = [layer.register_forward_pre_hook(before, with_kwargs=True),
             layer.register_forward_hook(after, with_kwargs=True),
             model.get_input_embeddings().register_forward_hook(inputs_need_grad)]
    rest_s, optim_s = [], []
    try:
        for i in range(1 + MAX_REPEATS):
            marks.clear()
            t0 = time.perf_counter()
            with NormOutputs():  # as the native engine's forward
                loss, _ = token_loss_sum(model, dict(inputs))
            loss.backward()
            t1 = time.perf_counter()
            if i < 2:  # the optimizer's step as the engine takes it: warmed up (its states), then timed once
                if master:
                    master.collect_grads()
                max_norm = cfg.train.max_grad_norm or float("inf")
                master.clip_grad_norm_(max_norm) if master else torch.nn.utils.clip_grad_norm_(params, max_norm)
                if master:  # the masters' step: rebuilt from their halves, updated, split again
                    master.step(optimizer)
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                optim_s.append(time.perf_counter() - t1)
            model.zero_grad(set_to_none=True)
            if i == 0:
                continue  # the warm-up: oneDNN's primitives for these shapes, the optimizer's states
            rest_s.append(t1 - t0 - (marks["f1"] - marks["f0"]) - (marks["b1"] - marks["b0"]))
            if i >= MIN_REPEATS and time.perf_counter() - start > BUDGET_SECONDS:
                break
    finally:
        for h in hooks:
            h.remove()
    layer_s = _layer_alone(model, layer, called, start)
    return {"layer_seconds": statistics.median(layer_s), "rest_seconds": statistics.median(rest_s),
            "optimizer_seconds": optim_s[-1], "optimizer_params": sum(p.numel() for p in params),
            "repeats": len(rest_s), "layer_repeats": len(layer_s),
            "probe_seconds": round(time.perf_counter() - begun, 2),
            "load_average": round(os.getloadavg()[0], 2),  # a probe measured on a busy machine shows it
            "measured_at": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
