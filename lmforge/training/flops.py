"""Where the time goes: FLOPs per token (counted, not guessed) and this machine's matmul peak, for MFU.

``mfu`` = FLOPs per trained token x tokens/s (of every process) / (each process's peak FLOP/s x processes). The
FLOPs are counted once by ``torch.utils.flop_counter.FlopCounterMode`` over a real forward + backward, so they
include what lmforge actually runs (the LM head only on loss positions, attention over padded or packed rows)
and nothing it skips. The peak is a short matmul benchmark of the compute dtype at the model's own linear shapes
(``measure_shape_peak``), cached per machine kind (CPU model and flags, threads, torch version) and shapes, because
the project's machines differ by 5x in bf16 and one machine's matmuls by several x between shapes. A process's
peak is its share of its node's peak (``process_peak``), the node's being the figure `lmforge estimate` uses.
"""

from __future__ import annotations

import math
import os
import platform
import time

import torch

from lmforge.cache import cached_measurement
from lmforge.training.losses import token_loss_sum


def _extra_formulas() -> dict:
    """FLOP formulas for ops torch's counter does not list (torch 2.13): the CPU flash-attention kernels SDPA
    dispatches to on CPU (it counts the CUDA kernels only, so attention would count as 0 here), and QLoRA's
    4-bit matmul (bitsandbytes' ``gemm_4bit`` op: its inner matmul runs below the counter, so the forward of
    every 4-bit layer counted as 0; its backward is a plain matmul, counted)."""
    from torch.utils import flop_counter

    aten = torch.ops.aten

    def forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)

    def gemm_4bit(a, b, b_shape, *args, out_shape=None, **kwargs) -> int:  # (..., K) @ the (N, K) weight^T
        return 2 * math.prod(a[:-1]) * b_shape[0] * b_shape[1]

    formulas = {aten._scaled_dot_product_flash_attention_for_cpu: forward,
                aten._scaled_dot_product_flash_attention_for_cpu_backward: backward}
    try:
        formulas[torch.ops.bitsandbytes.gemm_4bit] = gemm_4bit
    except AttributeError:  # bitsandbytes not imported: no 4-bit layer to count
        pass
    return formulas


class Counter:
    """``with Counter(active) as c: ...`` counts the matmul FLOPs inside when active; ``c.total`` after."""

    def __init__(self, active: bool):
        self.active, self.total, self.mode = active, 0, None

    def __enter__(self):
        if self.active:
            from torch.utils.flop_counter import FlopCounterMode

            self.mode = FlopCounterMode(display=False, custom_mapping=_extra_formulas())
            self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        if self.mode is not None:
            self.mode.__exit__(*exc)
            self.total = self.mode.get_total_flops()
        return False


def per_token(model, batch: dict, autocast=None) -> float:
    """FLOPs per non-padding token of a forward + backward of ``model`` on ``batch`` (a collated batch with
    ``num_tokens``), counted outside any training step: the counter's dispatch mode changes SDPA's kernel
    choice (and so the last bits of its results), so it never runs on a step that trains. The RNG is forked,
    so dropout draws stay those of an uncounted run, and the gradients are cleared afterwards."""
    import contextlib

    batch = dict(batch)
    tokens = int(batch.pop("num_tokens"))
    with torch.random.fork_rng(devices=[]), Counter(active=True) as counter:
        with autocast or contextlib.nullcontext():
            loss, _ = token_loss_sum(model, batch)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.total / max(tokens, 1)


def mfu(flops_per_token: float, tokens_per_second: float, peak: float, processes: int) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the peak of every process's machine share."""
    return flops_per_token * tokens_per_second / (peak * processes)


def cpu_kind() -> str:
    """The CPU model and the flags that decide bf16 speed, e.g. "AMD EPYC [avx512_bf16]"."""
    name, flags = platform.processor() or "cpu", set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name") and name in ("cpu", "x86_64", ""):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    fast = sorted(flags & {"avx512_bf16", "amx_bf16", "avx512f"})
    return f"{name} [{' '.join(fast) or 'no avx512'}]"


SHAPE_TOKENS = 1024  # rows of the model-shape peak's matmuls: a micro-batch's tokens (e.g. 8 packed rows of ~128)
PEAK_SECONDS = 0.8  # the model-shape peak's timed rounds stop after this long (at least one round of every shape)


def linear_shapes(model_config) -> tuple[tuple[int, int, int], ...]:
    """The linear layers of a decoder as ``(count, in_features, out_features)``: per layer q, k, v, o, gate, up and
    down, and the LM head; () when the config does not give them (e.g. experts, an encoder): the square peak then."""
    get = lambda *names: next((getattr(model_config, n) for n in names if getattr(model_config, n, None)), None)  # noqa: E731
    h, inter, layers = get("hidden_size"), get("intermediate_size"), get("num_hidden_layers")
    heads, vocab = get("num_attention_heads"), get("vocab_size")
    if not all((h, inter, layers, heads, vocab)) or get("num_experts", "num_local_experts"):
        return ()
    kv, d = get("num_key_value_heads") or heads, get("head_dim") or h // heads
    per_layer = [(h, heads * d), (h, kv * d), (h, kv * d), (heads * d, h), (h, inter), (h, inter), (inter, h)]
    counts: dict[tuple[int, int], int] = {}
    for shape in per_layer:
        counts[shape] = counts.get(shape, 0) + layers
    counts[(h, vocab)] = counts.get((h, vocab), 0) + 1
    return tuple((c, k, n) for (k, n), c in sorted(counts.items()))


def measure_peak(dtype: torch.dtype, n: int = 1024, seconds: float = 0.5) -> float:
    """Best FLOP/s of an n x n x n matmul in ``dtype`` over about ``seconds``."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(3):
        a @ b
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t0))
    return best


def measure_shape_peak(dtype: torch.dtype, shapes, tokens: int = SHAPE_TOKENS, seconds: float = PEAK_SECONDS) -> float:
    """FLOP/s of one training step's linear matmuls at ``tokens`` rows, as autograd runs them: per layer of
    ``shapes`` (``linear_shapes``) the forward ``x W^T``, the input gradient ``g W`` and the weight gradient
    ``g^T x``; each layer's best time over rounds of ``seconds``, weighted by how many the model has."""
    ops = []
    for count, k, n in shapes:
        x, w, g = (torch.randn(*s).to(dtype) for s in ((tokens, k), (n, k), (tokens, n)))
        ops.append((count, 6 * tokens * k * n, lambda x=x, w=w, g=g: (torch.nn.functional.linear(x, w), g @ w, g.t() @ x)))
    best = [math.inf] * len(ops)
    for _, _, op in ops:  # warm-up: oneDNN makes each shape's kernel on first use
        op()
    end = time.perf_counter() + seconds
    while True:
        for i, (_, _, op) in enumerate(ops):
            t0 = time.perf_counter()
            op()
            best[i] = min(best[i], time.perf_counter() - t0)
        if time.perf_counter() > end:
            break
    return sum(c * f for c, f, _ in ops) / sum(c * t for (c, _, _), t in zip(ops, best))


def peak_key(dtype: torch.dtype, threads: int, shapes=()) -> str:
    """The cache key of a peak: the machine kind, threads, torch, dtype and (the model-shape peak) the shapes."""
    key = f"{cpu_kind()} | threads {threads} | torch {torch.__version__} | {dtype}"
    if shapes:
        key += f" | {SHAPE_TOKENS} tokens x linears " + " ".join(f"{c}*{k}x{n}" for c, k, n in shapes)
    return key


def peak_flops(dtype: torch.dtype, threads: int | None = None, model_config=None) -> float:
    """This machine's matmul peak for ``dtype`` (FLOP/s) at ``threads`` torch threads (default: this process's),
    measured once and cached; CUDA is not measured here. With ``model_config``, at the model's own linear shapes
    (``measure_shape_peak``: what its training step's matmuls reach here), else (or when the config does not give
    them) the best of a 1024^3 matmul. Processes that start together (the ranks of a run) measure one at a time,
    under a file lock, and one that waited reads the figure the first wrote: measured side by side each would see
    the others' load, and the cache would keep that figure for good."""
    threads = threads or torch.get_num_threads()
    shapes = linear_shapes(model_config) if model_config is not None else ()
    busy = []

    def measure() -> float:
        value, others = measured_alone(lambda: measure_shape_peak(dtype, shapes) if shapes else measure_peak(dtype),
                                       threads)
        busy.append(others)
        return value

    return cached_measurement("peak_flops.json", peak_key(dtype, threads, shapes), measure,
                              "measuring the matmul peak", keep=lambda _: busy[-1] <= BUSY)[0]


BUSY = 0.25  # a measurement during which other processes used more than this share of the CPUs is used, not cached


def measured_alone(measure, threads: int):
    """``(measure(), others)``, run at ``threads`` torch threads; ``others``: the share of the machine's CPUs other
    processes used meanwhile. With threads on every core, a busy neighbour slows a measurement many times over
    (measured: a decoder layer 5.2 s instead of 0.11 s; 1024-token matmuls 4 ms instead of 0.1), and a cache
    would keep that figure for good."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    busy, own, t0 = _cpu_busy(), own_cpu_seconds(), time.perf_counter()
    try:
        value = measure()
    finally:
        torch.set_num_threads(before)
    mine = own_cpu_seconds() - own
    return value, round(max(0.0, (_cpu_busy() - busy - mine) / ((time.perf_counter() - t0) * (os.cpu_count() or 1))), 2)


def own_cpu_seconds() -> float:
    """CPU seconds of this process and its descendants, living (``/proc``) or reaped (``os.times``). Why the living
    ones: Inductor compiles the recompute kernels in a pool of worker processes that outlive the compile, and a
    probe's build in a fresh process counted them as other processes keeping the machine busy (0.11-0.18 of 2
    CPUs, AMX kind; a probe is not cached above ``BUSY``)."""
    tick = os.sysconf("SC_CLK_TCK")
    times = os.times()
    total = times.user + times.system + times.children_user + times.children_system
    parents: dict[int, list[int]] = {}
    cpu: dict[int, float] = {}
    for entry in os.scandir("/proc") if os.path.isdir("/proc") else ():
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        pid = int(entry.name)
        parents.setdefault(int(fields[1]), []).append(pid)  # ppid -> children
        cpu[pid] = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    frontier = list(parents.get(os.getpid(), []))
    while frontier:
        pid = frontier.pop()
        total += cpu.get(pid, 0.0)
        frontier += parents.get(pid, [])
    return total


def _cpu_busy() -> float:
    """Seconds every CPU of the machine has been busy (``/proc/stat``), 0 where it cannot be read."""
    try:
        with open("/proc/stat") as fh:
            fields = [float(x) for x in fh.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0.0
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def node_threads() -> int:
    """The torch threads of every process on this node together: under torchrun each worker has its share of the
    cores (``launch.py`` sets OMP_NUM_THREADS), so the node's are this process's x LOCAL_WORLD_SIZE, at most the
    CPU count."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = torch.get_num_threads()
    return min(os.cpu_count() or 1, threads * local) if local > 1 else threads


def process_peak(dtype: torch.dtype, model_config=None) -> float:
    """The peak one process's MFU is measured against: its share of this node's peak, measured at the node's
    threads as `lmforge estimate` measures it (the estimate.json a run writes holds that figure). Not the peak
    of the process's own threads, measured apart: the engines' MFU would then differ from the estimate's by
    whatever the two measurements differ by (a 2-process DDP run on 2 cores logged 89.9% MFU against a cached
    1-thread peak of 115 GFLOP/s, 48% against the node's 435; measured alone, 1 thread gives 210)."""
    return peak_flops(dtype, node_threads(), model_config) / int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
