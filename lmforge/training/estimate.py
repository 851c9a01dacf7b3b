"""``lmforge estimate``: memory, tokens/s and run time of a training config, predicted before anything heavy loads.

What it reads (the model's shape on the ``meta`` device, its trainable parameters, the data's length
distribution) is ``estimate_inputs.py``; everything here is arithmetic on that, checked against hand counts in
tests/test_estimate.py; its text and `train`'s one line at start are ``estimate_report.py``.

What the engines hold (read from ``native.py``, ``precision.py``, ``sharding.py`` and ``run.py``):
  * native engine, full fine-tune in bf16: the model in bf16 plus fp32 master weights of every parameter
    (``MasterWeights``: the model's bf16 weight + a 2-byte remainder each, fp32 only a chunk at a time in the
    step); bf16 gradients from each backward, moved into fp32 master gradients (with one micro-batch a step in one
    process they stay bf16, widened a chunk at a time in the step); fused AdamW with
    two fp32 states per trainable parameter. LoRA/DoRA in bf16: the frozen base in bf16, adapters bf16 + their
    masters, the same way. QLoRA: linear weights in 4-bit nf4 (double quantised), every other weight cast to fp32 by
    ``prepare_model_for_kbit_training``, fp32 adapters under autocast; on CPU bitsandbytes keeps no dequantised
    copy: each 4-bit layer dequantises its weight to bf16 for one ordinary matmul, in the forward and again in
    the backward. fp32 compute: plain fp32, no masters.
  * native DDP: one flat fp32 buffer of every gradient for the all-reduce; FSDP2: fp32 shards (the masters),
    each decoder layer gathered in the compute dtype as it runs, the root (embeddings, head) gathered for the
    whole step; gradients and optimizer states sharded.
  * hf engine: fp32 weights under autocast for a full fine-tune (16 bytes per parameter with AdamW); DeepSpeed
    ZeRO keeps bf16 weights and shards fp32 masters + states (stage 1), + gradients (2), + weights (3), and
    offload moves them to host memory (on a CPU-only machine that is the same memory).
Activations are counted per decoder layer from the tensors a Llama-style layer saves for backward (norm
inputs, q/k/v before and after rotary, attention output, the MLP's four intermediates; with a frozen base only
what the input gradients need, plus LoRA dropout's masks and outputs; QLoRA's in fp32 but for the matmuls'
inputs; lmforge's per-sample attention keeps no scores: its backward recomputes them), plus the LM head's logits (one
chunk of the loss positions at a time: ``cross_entropy.py``); gradient checkpointing keeps each layer's input
and recomputes one layer at a time. RSS is above those live bytes by what the C heap keeps
(``ACTIVATION_OVERHEAD``, ``HEAP_SLACK``, ``QLORA_HEAP``).
Time, on a CPU, for the native engine's full fine-tune and LoRA/DoRA with a token loss: a probe of the step on this
machine (``estimate_probe.py``: one decoder layer of the model, the rest of a micro-batch and the optimizer, timed
at the run's mean micro-batch and cached), layers x layer + rest, x accumulation, + the optimizer. Elsewhere (a
GPU, the hf engine, QLoRA, FSDP/DeepSpeed, preference methods, a config that does not fit): FLOPs (6N-style linear
FLOPs on the positions computed, the LM head on loss positions, attention as ``flops.py`` counts it) over this
machine's measured matmul peak (``flops.peak_flops``) times an efficiency fitted on SmolLM2-135M on a Zen 4
(``EFFICIENCY``; docs/estimate.md). Either way the MFU it implies is over that same peak, as the engines log ``mfu``
(``flops.process_peak``). ``benchmarks/estimate_accuracy.py`` sets both beside real runs.
"""

from __future__ import annotations

import copy
import json
import math
import random
from dataclasses import asdict, dataclass

from lmforge import plan
from lmforge.config import Config, load_config
from lmforge.distributed import zero
from lmforge.errors import ConfigError, LmforgeError
from lmforge.models import from_scratch_config, load_tokenizer, pick_dtype
from lmforge.registry import METHODS
from lmforge.training.estimate_inputs import (
    DataShape, Machine, ModelShape, Trainable, architecture_of, model_shape, peft_targets, read_model_config,
    sample_data, sample_tokenizer, this_machine, trainable,
)
from lmforge.training.cross_entropy import rows_per_chunk
from lmforge.training.estimate_probe import probe_batch, probed
from lmforge.training.memory import SLACK, SLACK_FRACTION

GB = 1024 ** 3
BASELINE_BYTES = int(0.66 * GB)  # a training process apart from its model: python, torch, transformers, peft,
# datasets, the tokenizer, the data (measured 2026-11-28: peak RSS 675 MB of `lmforge train` on the 2-layer test model)
ACTIVATION_OVERHEAD = 1.2  # RSS above the activations' bytes: they are freed and allocated again every step, and
# glibc's heap keeps freed blocks (fragmentation), plus the backward's transient buffers. Fitted on SmolLM2-135M
# (batch 8 x 256 packed): LoRA 3.49 GB RSS (benchmarks/estimate_accuracy.py) and full fine-tune ~5 GB (docs/benchmarks.md).
HEAP_SLACK = SLACK  # and what the heap may keep on top before the engines return it (memory.HeapTrim). Probes of
# native steps on SmolLM2-135M (2026-11-29, 8 x <= 216 tokens): LoRA peaked at 3.93-4.05 GB RSS over 3 steps against
# 3.85-3.94 GB counted with both; in every step of LoRA and QLoRA, with and without checkpointing, the live heap
# (glibc's mallinfo2) rose by 0.91-1.02x the activations counted here.
QLORA_HEAP = 0.3  # QLoRA in bf16: the heap keeps another ~0.3x the activations (as counted without checkpointing,
# with it too): bitsandbytes casts each 4-bit layer's input to bf16 and its output back to fp32, and the weight's
# dequantised copy, tens of MB of short-lived tensors per layer between the saved ones, served from holes glibc
# cannot return. Probes (SmolLM2-135M, batch 4 and 8, with and without checkpointing): peak RSS above 1.2x the
# live bytes by 0.1-0.4x the activations; with MALLOC_MMAP_THRESHOLD_=1 MB a checkpointed step's RSS rose 0.64 GB
# instead of 1.79 GB, its live bytes 0.42 GB either way.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # nf4 + double quantisation: 8-bit absmax per 64, fp32 per 256 blocks
INT8_BYTES = 1.0
OPTIMIZER_BYTES = {  # bytes of state per trainable parameter (fp32 states, as torch and lmforge keep them)
    "sgd": 0, "adafactor": 1, "adamw_bnb_8bit": 2, "adamw_8bit": 2, "paged_adamw_8bit": 2, "adamw_torch_8bit": 2,
    "lion_8bit": 1, "lion_32bit": 4, "paged_lion_8bit": 1, "paged_lion_32bit": 4, "rmsprop": 4,
}  # every other optimizer (AdamW, LAMB, ...): two fp32 states, 8 bytes
# Achieved fraction of the matmul peak (MFU over the FLOPs counted here), measured on SmolLM2-135M with
# benchmarks/sft_vs_trl.py (docs/training.md, "Measured"): native full fine-tune 43-48%, native LoRA 30-34%,
# hf engine 23%. QLoRA runs LoRA's bf16 matmuls (bitsandbytes 0.50 on CPU: gemm_4bit dequantises the weight, then
# F.linear), plus the dequantisations and fp32 elementwise ops: 238 and 168 tokens/s without and with gradient
# checkpointing in the estimate_accuracy run of 2026-11-29 (0.87x and 0.76x LoRA's), 28% and 29% of the peak;
# the hf engine's QLoRA is not measured, taken as its LoRA's times that ratio. benchmarks/estimate_accuracy.py
# prints estimated vs measured.
EFFICIENCY = {("native", "full"): 0.45, ("native", "adapter"): 0.32, ("native", "qlora"): 0.28,
              ("hf", "full"): 0.23, ("hf", "adapter"): 0.18, ("hf", "qlora"): 0.16}
# With gradient checkpointing, a native full fine-tune ran at a higher MFU than without (recomputed FLOPs included):
# 52.6% and 54.1% in two estimate_accuracy runs of 2026-11-29 against 48.6% and 47.5% without (the step's smaller
# activations, fewer fresh pages to touch). The first run sets this figure; adapters showed no such gain.
EFFICIENCY_CHECKPOINTED = {("native", "full"): 0.53}
GLOO_BYTES_PER_SECOND = 2e9  # gradient all-reduce between processes of one node over gloo (assumed; CPU)
STRATEGIES = ("none", "ddp", "fsdp", "zero1", "zero2", "zero3", "zero3_offload")
ESTIMATE_FILE = "estimate.json"  # in output_dir: what `train` estimated at start (estimate_report.log_at_start; report.py reads it)


# ============================================================================================ micro-batches
@dataclass
class MicroBatch:
    """Positions one micro-batch computes (padding included), its tokens, loss tokens and attention spans."""

    positions: float
    tokens: float
    loss_tokens: float
    attention: float  # sum of squared spans the attention computes


def micro_batches(data: DataShape, batch: int, per_sample_attention: bool, seed: int = 0):
    """(average, worst) micro-batch of ``batch`` rows: rows are padded to the longest in the micro-batch; the
    average is over seeded random batches of the sample's rows, the worst takes the longest rows."""
    n = len(data.row_lengths)
    rng = random.Random(seed)
    draws = [[rng.randrange(n) for _ in range(batch)] for _ in range(200)]

    def one(idx) -> MicroBatch:
        T = max(data.row_lengths[i] for i in idx)
        att = sum(data.row_attention[i] for i in idx) if per_sample_attention else len(idx) * T * T
        return MicroBatch(len(idx) * T, sum(data.row_lengths[i] for i in idx),
                          sum(data.row_loss[i] for i in idx), att)

    avg = [one(d) for d in draws]
    mean = MicroBatch(*(sum(getattr(m, f) for m in avg) / len(avg) for f in ("positions", "tokens", "loss_tokens",
                                                                               "attention")))
    longest = sorted(range(n), key=lambda i: data.row_lengths[i], reverse=True)[:batch]
    worst = one(longest + [longest[0]] * (batch - len(longest)))
    worst.loss_tokens = sum(sorted(data.row_loss, reverse=True)[:batch])
    worst.attention = max(worst.attention, sum(sorted(data.row_attention, reverse=True)[:batch])) \
        if per_sample_attention else worst.attention
    return mean, worst


# ============================================================================================ memory
@dataclass
class Memory:
    """Bytes per process of one strategy. ``device``: what lives where the compute runs (the GPU, or RAM on a
    CPU-only machine); ``host``: what offload moves to host RAM (on a CPU-only machine the same RAM)."""

    strategy: str
    engine: str
    weights: int
    masters: int
    gradients: int
    optimizer: int
    activations: int
    activations_checkpointed: int
    buffers: int  # communication buffers, transient gradient copies, dequantised layers
    offloaded: int  # bytes moved to host memory
    heap: int  # freed memory the C heap keeps (HEAP_SLACK, QLORA_HEAP)
    peak: int  # of the process, RSS on CPU (baseline included)
    note: str = ""


def _opt_bytes(optim: str) -> int:
    return OPTIMIZER_BYTES.get(optim, 8)


RECOMPUTED_MODELS = ("llama", "mistral", "qwen2")  # model types whose RMSNorm and MLP are Llama's by code: the native
# engine runs them as training/recompute.py's nodes (a config-only estimate cannot compare the code)


def activation_bytes(shape: ModelShape, mb: MicroBatch, compute_bytes: int, checkpointing: bool,
                     head_on_all: bool = False, frozen_base: bool = False,
                     adapter_inputs: int = 0, adapter_outputs: int = 0, dropout_mask_bytes: int = 0,
                     residual_bytes: int | None = None, recompute: bool = False) -> int:
    """Bytes saved for backward by one micro-batch (module docstring). ``head_on_all``: the LM head runs on every
    position (prompt tuning, the hf engine under DDP), not only where there is loss. Adapters: ``frozen_base``
    (a frozen linear or norm weight keeps no input for its own gradient), ``adapter_inputs`` and
    ``adapter_outputs`` (elements per position and layer of the adapted modules' inputs and of their rank-r
    outputs), ``dropout_mask_bytes`` (per input element, the mask LoRA's dropout keeps beside its output; 0
    without dropout) and ``residual_bytes`` (the residual stream's and elementwise ops' element size where it is
    not the compute dtype's: QLoRA, ``Estimator._adapter_activations``). ``recompute``: a full fine-tune on the native
    engine's recompute nodes (``RECOMPUTED_MODELS``)."""
    b = compute_bytes
    e = residual_bytes or b
    H, I, q, kv = shape.hidden, shape.intermediate, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    norm_extra = 2 * H * 4  # each RMSNorm also keeps a fp32 tensor (its fp32 input, or x * rsqrt in fp32)
    if not frozen_base and recompute:  # the norms keep their inputs (their outputs are remade: NormOutputs), the
        # attention q/k/v and its output, the SwiGLU node its gate and up (training/recompute.py)
        per_position = b * (2 * H + (q + 2 * kv) + q + 2 * I)
    elif not frozen_base:
        per_position = b * (2 * H + 2 * (q + 2 * kv) + q + 2 * H + 4 * I) + norm_extra
    else:  # what the input gradients need: the norms, q/k/v (attention), the MLP's gate, up and activation
        per_position = norm_extra + b * 2 * (q + 2 * kv) + e * 3 * I + b * adapter_outputs
        if dropout_mask_bytes or e != b:  # each adapted module keeps its own input: dropout's output or a cast
            per_position += adapter_inputs * (dropout_mask_bytes + b)
        elif adapter_outputs:  # LoRA without dropout keeps the linears' inputs (q/k/v share one, gate/up one)
            per_position += b * (2 * H + q + I)
    # no attention scores: the per-sample attention's backward recomputes them (training/attention.py), and the
    # hf engine's dense SDPA keeps none either
    one_layer = mb.positions * per_position
    if checkpointing:
        layers = shape.layers * mb.positions * H * e + one_layer  # each layer's input, + one layer recomputed
    else:
        layers = shape.layers * one_layer
    if head_on_all:  # the model's own forward: the head's logits, their fp32 copy and the log-softmax (saved) live
        # at once at the end of the forward; at the start of the backward the log-softmax, its gradient and that
        # gradient cast back: 10 bytes (bf16), 8 (fp32)
        logits = mb.positions * shape.vocab * ((b + 4 + 4) if b < 4 else 8)
    else:  # training/cross_entropy.py, in chunks: at its last chunk, that chunk's fp32 logits and their cast
        # gradient, the hidden states' gradient (saved), and a trained head's fp32 weight gradient and one chunk's part
        logits = min(mb.loss_tokens, rows_per_chunk(shape.vocab)) * shape.vocab * (4 + b) + mb.loss_tokens * H * b
        if not frozen_base:
            logits += shape.vocab * H * (4 + b)
    if e != b and shape.output_layer:  # autocast's copy of the fp32 LM head weight
        logits += shape.vocab * H * b
    final = mb.positions * (H * b + H * 4)  # final norm
    return int(layers + logits + final)


def flops_per_micro_batch(shape: ModelShape, mb: MicroBatch, train: Trainable, head_on_all: bool = False,
                          checkpointing: bool = False) -> float:
    """Matmul FLOPs of one micro-batch's forward + backward, as ``flops.per_token`` counts them: 2 per weight and
    position forward, 2 more for the input gradients, 2 more for a trained weight's gradient; the LM head on the
    loss positions only (``head_on_all``: on every position); attention over full squares of each span."""
    decoder = shape.linear_weights(include_head=False)
    head = shape.vocab * shape.hidden if shape.output_layer else 0
    head_positions = mb.positions if head_on_all else mb.loss_tokens
    backward = 4 if train.kind == "none" else 2  # input gradients always; weight gradients only for trained weights
    adapters = 6 * train.params if train.kind in ("lora", "dora", "qlora") else 0
    attention = 4 * shape.heads * shape.head_dim * mb.attention * shape.layers  # forward QK^T and AV
    linear = 2 * decoder * mb.positions + 2 * head * head_positions  # forward
    flops = linear * (1 + backward / 2) + 3 * attention + adapters * mb.positions
    if checkpointing:
        flops += 2 * decoder * mb.positions + attention  # each layer's forward runs again in the backward
    return flops


def memory(shape: ModelShape, train: Trainable, cfg: Config, engine: str, strategy: str, world: int,
           compute_bytes: int, act: int, act_gc: int, qlora_bits: int = 4) -> Memory:
    """Bytes per process of ``strategy`` on ``world`` processes (module docstring for what each holds)."""
    N, T = shape.total, train.params
    b = compute_bytes
    kind = train.kind
    opt = _opt_bytes(cfg.train.optim) * T
    frozen = N - T if kind not in ("lora", "dora", "qlora", "prompt_tuning") else N
    adapter = kind in ("lora", "dora", "qlora", "prompt_tuning")
    W = max(world, 1) if strategy != "none" else 1
    note = ""
    buffers = offloaded = 0
    carry = None  # gradients alive while the next micro-batch runs its forward (with accumulation): all of them
    if kind == "qlora":
        qbytes = NF4_BYTES if qlora_bits == 4 else INT8_BYTES
        weights = int(train.quantised * qbytes + (N - train.quantised) * 4 + T * 4)  # the rest cast to fp32
        masters, grads = 0, 4 * T
        buffers = max(i * o for i, o in shape.linears.values()) * b  # a layer dequantised for its matmul
    elif engine == "native" and strategy != "fsdp":
        if b < 4 and kind in ("none", "lora", "dora"):  # bf16 model + fp32 masters (MasterWeights)
            weights = N * b if kind == "none" else (frozen + T) * b
            # under bf16 a master is the model's weight + a 2-byte remainder; fused AdamW (optim.build_optimizer)
            # steps on a 1 MB chunk of rebuilt fp32 weights at a time, any other optimizer on all of them at once
            masters = (4 if cfg.model.dtype == "float16" else 2) * T
            if masters < 4 * T and cfg.train.optim not in ("adamw_torch", "adamw_torch_fused"):
                buffers = 4 * T
            grads = T * b + 4 * T  # each backward's bf16 gradients, then the fp32 master gradients
            if masters < 4 * T and not buffers and cfg.train.gradient_accumulation_steps == 1 and W == 1:
                grads = T * b  # one micro-batch, one process: fused AdamW's step widens them a chunk at a time
            carry = 4 * T  # between micro-batches only the master gradients stay
        else:
            weights = (frozen * b + T * 4) if adapter else N * 4
            masters, grads = 0, 4 * T
        if strategy == "ddp" and W > 1:
            buffers += 4 * T  # the flat fp32 buffer of the one all-reduce per step
    elif strategy == "fsdp":  # fp32 shards (the masters) for a full fine-tune; the frozen base in its dtype
        shard_bytes = (frozen * b + T * 4) if adapter else N * 4
        root = N - shape.layers * shape.layer_params
        gathered = (root + 2 * shape.layer_params) * b  # root for the whole step + a layer (and the next)
        weights, masters = int(shard_bytes / W) + gathered, 0
        grads = int(4 * T / W) + (4 * T if cfg.train.gradient_accumulation_steps > 1 else 4 * shape.layer_params)
        opt = int(opt / W)
        note = "unsharded gradients accumulate between micro-batches" if cfg.train.gradient_accumulation_steps > 1 \
            else ""
    elif strategy.startswith("zero"):  # DeepSpeed: bf16 weights, fp32 masters + states partitioned
        stage = int(strategy[4])
        held = (frozen + T) if adapter else N  # every parameter, in the compute dtype
        weights = held * b if stage < 3 else int(held * b / W)
        masters = int(4 * T / W) if b < 4 else 0
        grads = T * b if stage == 1 else int(T * b / W)
        opt = int(opt / W)
        if strategy == "zero3_offload":  # optimizer states, masters and parameters to host memory
            offloaded = opt + masters + weights
            weights = max(shape.layer_params, shape.total - shape.layers * shape.layer_params) * b  # one module
            masters = opt = 0
    else:  # hf engine without sharding: fp32 weights under autocast for a full fine-tune
        weights = (frozen * b + T * 4) if adapter else N * 4
        masters, grads = 0, 4 * T
        if strategy == "ddp" and W > 1:
            buffers = 4 * T  # DDP's gradient buckets
    carry = (grads if carry is None else carry) if cfg.train.gradient_accumulation_steps > 1 else 0
    chosen_act = act_gc if cfg.train.gradient_checkpointing else act
    static = weights + masters + opt + offloaded
    # HeapTrim's slack: its floor, or its share of RSS between steps (at least the runtime and the static memory)
    heap = max(HEAP_SLACK, int(SLACK_FRACTION * (BASELINE_BYTES + static))) + (
        int(QLORA_HEAP * act) if kind == "qlora" and b < 4 else 0)
    # the forward's end (activations, + gradients kept from earlier micro-batches) or the backward's (gradients)
    peak = BASELINE_BYTES + static + max(carry + int(chosen_act * ACTIVATION_OVERHEAD), grads + buffers) + heap
    return Memory(strategy, engine, int(weights), int(masters), int(grads), int(opt), int(act), int(act_gc),
                  int(buffers), int(offloaded), int(heap), int(peak), note)


# ============================================================================================ the estimate
@dataclass
class Estimate:
    config: str
    method: str
    engine: str
    strategy: str
    world: int
    compute: str
    model: dict
    parameters: int
    trainable: int
    trainable_describe: str
    data: dict
    step: dict
    memory: dict  # strategy -> Memory as a dict
    peak: int  # the configured strategy's peak per process
    time: dict
    machine: dict
    fits: bool
    fit_note: str
    change: dict | None = None  # the cheapest change that fits, with its estimate (when this config does not fit)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


class Estimator:
    """Holds what was read once (model shape, tokenizer, data sample, machine); ``estimate(cfg)`` is arithmetic,
    so candidate changes (``cheapest_change``) are estimated without reading anything again."""

    def __init__(self, cfg: Config, world: int = 1, config_name: str = "config", machine: Machine | None = None,
                 probe_now: bool = True, threads: int | None = None):
        self.cfg, self.world, self.config_name = cfg, world, config_name
        self.probe_now = probe_now  # False: the speed probe only from the cache (estimate_report.log_at_start under torchrun)
        self.compute = pick_dtype(cfg.model.dtype)
        config, tok, self.adapter, source = read_model_config(cfg)
        if config is None:  # from scratch: model.config's keys, with the tokenizer's vocabulary
            if cfg.model.train_tokenizer is not None:
                tok = sample_tokenizer(cfg)
                source = "model.config (tokenizer trained on the data sample)"
            else:
                tok = load_tokenizer(cfg.model, None)
            config = from_scratch_config(cfg.model, tok)
        self.tokenizer = tok
        self.model_config = config  # the probe builds one layer of it (estimate_probe.py)
        self.arch = arch = architecture_of(config)
        self.shape = model_shape(config, arch, source, len(tok), cfg.model.trust_remote_code)
        self.plan = plan.plan(cfg, arch)  # the run's plan: the same as `lmforge train` makes
        self.layout, self.packed = self.plan.layout, self.plan.packing
        self.data = sample_data(cfg, tok, self.packed, self.layout)
        self.token_loss = METHODS[cfg.method].token_loss
        self.machine = machine or this_machine(self.compute, threads, config)  # threads: the node's (log_at_start)

    # ------------------------------------------------------------------------------------------------ pieces
    def engine(self, cfg: Config) -> str:
        """The engine the plan picks for ``cfg`` (a candidate change may move a run to the other engine)."""
        return plan.choose_engine(cfg, self.arch)[0]

    def strategy_of(self, cfg: Config) -> str:
        t = cfg.train
        if t.distributed == "deepspeed":
            ds = zero.load(t.deepspeed)
            return f"zero{zero.stage(ds)}" + ("_offload" if zero.offloads(ds) else "")
        return t.distributed

    def _variant(self, cfg: Config, strategy: str) -> Config:
        c = copy.deepcopy(cfg)
        if strategy.startswith("zero"):
            c.train.distributed, c.train.deepspeed = "deepspeed", strategy
        else:
            c.train.distributed, c.train.deepspeed = strategy, None
        c.train.engine = cfg.train.engine if strategy == self.strategy_of(cfg) else None
        return c

    def estimate(self, cfg: Config | None = None, with_change: bool = True) -> Estimate:
        cfg = cfg or self.cfg
        t = cfg.train
        engine = self.engine(cfg)
        strategy = self.strategy_of(cfg)
        if strategy == "none" and self.world > 1:  # as train refuses it (distributed/launch.py)
            raise ConfigError(f"train.distributed: set ddp, fsdp or deepspeed to train on {self.world} processes")
        world = self.world
        b = 2 if self.compute != _float32() else 4
        train = trainable(self.shape, cfg, self.adapter)
        per_sample = self.packed and engine == "native"  # lmforge's per-sample attention; else dense over rows
        mean, worst = micro_batches(self.data, t.per_device_train_batch_size, per_sample, t.seed)
        head_on_all = train.kind == "prompt_tuning" or not self.token_loss or (engine == "hf" and world > 1)
        adapters = self._adapter_activations(train, cfg, engine, b)
        recompute = train.kind == "none" and b < 4 and self.shape.model_type in RECOMPUTED_MODELS

        def activations(eng: str, checkpointing: bool) -> int:
            return activation_bytes(self.shape, worst, b, checkpointing, head_on_all,
                                    recompute=recompute and eng == "native", **adapters)

        act, act_gc = activations(engine, False), activations(engine, True)
        mems = {}
        for s in STRATEGIES:
            if train.kind == "qlora" and (s == "fsdp" or s.startswith("zero3")):
                continue  # refused at config load: 4-bit weights cannot be sharded (distributed/checks.py)
            try:
                eng = engine if s == strategy else self.engine(self._variant(cfg, s))
            except ConfigError:
                continue  # no engine runs this config with that strategy (e.g. streaming under deepspeed)
            # the other strategies at this run's processes, or at 2 when it has one (sharding over 1 shows nothing)
            on = world if s == strategy else max(world, 2)
            eng = "hf" if s.startswith("zero") else eng
            mems[s] = memory(self.shape, train, cfg, eng, s, on, b, activations(eng, False), activations(eng, True),
                             cfg.peft.bits)
        if strategy not in mems:
            mems[strategy] = memory(self.shape, train, cfg, engine, strategy, world, b, act, act_gc, cfg.peft.bits)
        mine = mems[strategy]
        if cfg.method in ("dpo", "orpo", "kto") and engine == "hf" and train.kind == "none":
            if not getattr(getattr(cfg, cfg.method, None), "precompute_ref_log_probs", False) and cfg.method != "orpo":
                mine.weights += self.shape.total * 4  # a reference copy, loaded as the policy (training/preference.py)
                mine.peak += self.shape.total * 4
                mine.note = "includes TRL's reference model copy"
        fits, note = self._fits(mine, world)
        time = self._time(cfg, train, engine, strategy, world, mean, per_sample, fits)
        est = Estimate(
            config=self.config_name, method=cfg.method, engine=engine, strategy=strategy, world=world,
            compute=str(self.compute).replace("torch.", ""),
            model={k: getattr(self.shape, k) for k in ("source", "model_type", "architecture", "layers", "hidden",
                                                       "intermediate", "heads", "kv_heads", "head_dim", "vocab",
                                                       "tied")},
            parameters=self.shape.total, trainable=train.params, trainable_describe=train.describe,
            data={"rows_read": self.data.rows_read, "sampled": self.data.sampled, "rows": self.data.rows,
                  "tokens": self.data.tokens, "packed": self.data.packed, "max_length": self.data.max_length,
                  "mean_row_tokens": round(self.data.mean_row, 1), "loss_fraction": round(self.data.loss_fraction, 4),
                  "truncated": self.data.truncated, "dropped": self.data.dropped, "prepared": self.data.prepared,
                  "streamed": self.data.streamed},
            step=time.pop("step"), memory={k: asdict(v) for k, v in mems.items()}, peak=mine.peak, time=time,
            machine=asdict(self.machine), fits=fits, fit_note=note,
        )
        if not fits and with_change:
            est.change = self.cheapest_change(cfg)
        return est

    def _adapter_activations(self, train: Trainable, cfg: Config, engine: str, compute_bytes: int) -> dict:
        """``activation_bytes``' adapter arguments: a frozen base; per position and layer the adapted modules'
        inputs and rank-r outputs; LoRA dropout's mask per input element: torch's ``nn.Dropout`` (hf engine)
        keeps a bool, the native engine's ``FastDropout`` a multiplier in the input's dtype. QLoRA in bf16 runs
        its residual stream in fp32: ``prepare_model_for_kbit_training`` casts the norms and embeddings to fp32
        and bitsandbytes' ``Linear4bit`` returns its output in its input's dtype, so only the matmuls run in bf16
        (autocast), and each adapted module keeps a bf16 cast of its fp32 input."""
        if train.kind == "none":
            return {}
        if train.kind == "prompt_tuning" or not self.shape.layers:
            return {"frozen_base": True}
        targets = [n for n in peft_targets(self.shape, cfg.peft.target_modules) if n in self.shape.linears]
        residual = 4 if train.kind == "qlora" else compute_bytes
        out = {"frozen_base": True,
               "adapter_inputs": sum(self.shape.linears[n][0] for n in targets) // self.shape.layers,
               "adapter_outputs": cfg.peft.r * len(targets) // self.shape.layers}
        if residual != compute_bytes:
            out["residual_bytes"] = residual
        if cfg.peft.dropout:
            out["dropout_mask_bytes"] = residual if engine == "native" else 1
        return out

    def _time(self, cfg: Config, train: Trainable, engine: str, strategy: str, world: int, mb: MicroBatch,
              per_sample: bool, fits: bool) -> dict:
        """Seconds per step from the probe of this machine (``estimate_probe.py``: layers x one layer + the rest of
        a micro-batch, x accumulation, + the optimizer; the processes of a node share its cores) where it runs,
        else FLOPs per step over the peak x the fitted efficiency; + the gradient exchange between processes."""
        t, s = cfg.train, self.shape
        full = train.kind == "none"
        head_on_all = train.kind == "prompt_tuning" or not self.token_loss or (engine == "hf" and world > 1)
        flops_mb = flops_per_micro_batch(s, mb, train, head_on_all, t.gradient_checkpointing)
        accumulation = t.gradient_accumulation_steps
        flops_step = flops_mb * accumulation * world  # every process's share of the machine
        kind = "full" if full else ("qlora" if train.kind == "qlora" else "adapter")
        key = (engine if engine in ("native", "hf") else "hf", kind)
        eff = EFFICIENCY_CHECKPOINTED.get(key, EFFICIENCY[key]) if t.gradient_checkpointing else EFFICIENCY[key]
        compute_s = flops_step / (self.machine.peak_flops * eff)
        probe, why = self._probe(cfg, train, engine, strategy, mb, per_sample, fits)
        if probe is not None:
            micro_s = s.layers * probe["layer_seconds"] + probe["rest_seconds"]
            optim_s = probe["optimizer_seconds"] * train.params / max(probe["optimizer_params"], 1)
            compute_s = world * (accumulation * micro_s + optim_s)
            eff = flops_step / (self.machine.peak_flops * compute_s)  # the MFU this predicts
        comm = 0.0
        if world > 1:
            exchanged = 4 * train.params * 2 * (world - 1) / world
            if strategy == "fsdp" or strategy.startswith("zero3"):
                exchanged += 2 * accumulation * s.total * (2 if self.compute != _float32() else 4) * (world - 1) / world
            comm = exchanged / GLOO_BYTES_PER_SECOND
        step_s = compute_s + comm
        tokens_step = mb.tokens * accumulation * world
        rows_step = t.per_device_train_batch_size * accumulation * world
        steps_per_epoch = None if self.data.streamed else max(1, math.ceil(self.data.rows / rows_step))
        steps = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * steps_per_epoch)
        return {
            "step": {"rows": rows_step, "tokens": round(tokens_step), "positions": round(mb.positions * accumulation
                                                                                         * world),
                     "loss_tokens": round(mb.loss_tokens * accumulation * world), "steps": steps,
                     "steps_per_epoch": steps_per_epoch,
                     "epochs": round(steps / steps_per_epoch, 3) if steps_per_epoch else None,
                     "checkpointing": t.gradient_checkpointing},
            "flops_per_token": round(flops_mb / max(mb.tokens, 1)), "flops_per_step": flops_step,
            "efficiency": eff, "speed_from": "probe" if probe is not None else "fitted", "probe": probe,
            "fitted_because": why, "seconds_per_step": round(step_s, 3), "communication_seconds": round(comm, 3),
            "tokens_per_second": round(tokens_step / step_s, 1) if step_s else None,
            "run_seconds": round(steps * step_s, 1),
        }

    def _probe(self, cfg: Config, train: Trainable, engine: str, strategy: str, mb: MicroBatch, per_sample: bool,
               fits: bool) -> tuple[dict | None, str]:
        """(the probe's figures for this config with ``cached`` and ``batch`` added, "") or (None, why the fitted
        efficiency is used): the probe times the native engine's token-loss step of a full fine-tune or LoRA/DoRA
        on a CPU, and only a config that fits (its micro-batch could exhaust the memory)."""
        if not self.machine.probe:
            return None, "no probe on this machine" + (" (a GPU)" if self.machine.gpu_memory is not None else "")
        if engine != "native" or train.kind not in ("none", "lora", "dora") or not self.token_loss \
                or strategy not in ("none", "ddp"):
            return None, ("the probe times the native engine's full fine-tune or LoRA/DoRA with a token loss, no "
                          "sharding")
        if not fits:
            return None, "not probed: it does not fit"
        batch = probe_batch(cfg.train.per_device_train_batch_size, mb.positions, mb.tokens, mb.attention,
                            mb.loss_tokens, per_sample)
        try:
            figures, cached = probed(cfg, self.model_config, self.compute, batch, self.machine.threads or
                                     _threads(), self.probe_now)
        except Exception as e:  # noqa: BLE001 - the estimate falls back to the fitted efficiency and says why
            return None, f"the probe failed ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"
        if figures is None:
            return None, (f"not probed: the other processes of the run are starting beside it; `lmforge estimate "
                          f"--nproc-per-node {self.world}` measures it once for later runs")
        return {**figures, "cached": cached, "batch": batch.describe()}, ""

    def _fits(self, mem: Memory, world: int) -> tuple[bool, str]:
        m = self.machine
        if m.gpu_memory is not None:
            device = mem.peak - BASELINE_BYTES - mem.offloaded - mem.heap  # the C heap is host memory
            ok = device <= 0.95 * m.gpu_memory
            return ok, (f"{gigabytes(device)} per GPU of {gigabytes(m.gpu_memory)}" + ("" if ok else ": does not fit"))
        total = mem.peak * (world if mem.strategy != "none" else 1)  # the processes of this node share the RAM
        ok = total <= 0.9 * m.available
        procs = f" x {world} processes = {gigabytes(total)}" if world > 1 and mem.strategy != "none" else ""
        return ok, f"peak {gigabytes(mem.peak)} per process{procs}, {gigabytes(m.available)} RAM available" + \
            ("" if ok else ": does not fit")

    # ------------------------------------------------------------------------------------------------ advice
    def candidate_changes(self, cfg: Config) -> list[tuple[str, list[str], Config]]:
        """Changes in the order of their cost to the run: (description, overrides, changed config)."""
        out = []
        t = cfg.train

        def changed(overrides: list[str], what: str) -> None:
            tree = cfg.to_dict()
            out.append((what, overrides, load_config(None, overrides, tree=tree)))

        if not t.gradient_checkpointing:
            changed(["train.gradient_checkpointing=true"], "gradient checkpointing (recomputes activations, ~30% "
                                                           "more compute)")
        B, acc = t.per_device_train_batch_size, t.gradient_accumulation_steps
        while B > 1:
            B, acc = B // 2, acc * 2
            base = ["train.gradient_checkpointing=true"] if not t.gradient_checkpointing else []
            changed(base + [f"train.per_device_train_batch_size={B}", f"train.gradient_accumulation_steps={acc}"],
                    f"per-device batch {B} with {acc} accumulation steps (same rows per step)")
        gc = ["train.gradient_checkpointing=true"]
        if cfg.peft.kind == "none":
            changed(gc + ["peft.kind=lora"], "LoRA instead of a full fine-tune")
        if cfg.peft.kind in ("none", "lora", "dora") and t.distributed != "fsdp":
            changed(gc + ["peft.kind=qlora"], "QLoRA (4-bit frozen base)")
        if self.machine.gpu_memory is not None and self.world > 1 and cfg.peft.kind != "qlora":
            changed(gc + ["train.distributed=deepspeed", "train.deepspeed=zero3_offload", "train.engine=hf"],
                    "DeepSpeed ZeRO-3 with optimizer and parameter offload to host memory")
        return out

    def cheapest_change(self, cfg: Config) -> dict | None:
        tried = []
        for what, overrides, changed in self.candidate_changes(cfg):
            try:
                est = self.estimate(changed, with_change=False)
            except LmforgeError:
                continue
            tried.append(what)
            if est.fits:
                return {"change": what, "overrides": overrides, "peak": est.peak, "fit_note": est.fit_note,
                        "seconds_per_step": est.time["seconds_per_step"],
                        "tokens_per_second": est.time["tokens_per_second"], "run_seconds": est.time["run_seconds"]}
        return {"change": None, "tried": tried}


def _float32():
    import torch

    return torch.float32


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def gigabytes(n: float) -> str:
    return f"{n / GB:.2f} GB"


# ============================================================================================ output
def run_estimate(cfg: Config, world: int = 1, config_name: str = "config") -> Estimate:
    return Estimator(cfg, world, config_name).estimate()
