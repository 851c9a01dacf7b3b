"""What ``lmforge estimate`` prints (``render``) and what ``lmforge train`` logs and writes at start (``log_at_start``):
the text of an ``estimate.Estimate``; the arithmetic is ``estimate.py``."""

from __future__ import annotations

import copy
import os
from pathlib import Path

from lmforge import cloud
from lmforge.config import Config
from lmforge.distributed.ranks import world_size
from lmforge.log import is_main_process, log
from lmforge.training.estimate import (
    ACTIVATION_OVERHEAD, BASELINE_BYTES, ESTIMATE_FILE, GB, Estimate, Estimator, gigabytes,
)
from lmforge.training.estimate_probe import BUSY
from lmforge.training.flops import node_threads


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def one_line(est: Estimate) -> str:
    t = est.time
    line = (f"estimate: peak {gigabytes(est.peak)} per process ({est.fit_note.split(', ', 1)[-1]}), "
            f"{t['tokens_per_second']} tokens/s ({_speed_source(t)}), {t['seconds_per_step']} s per step, "
            f"{est.step['steps']} steps in "
            f"about {_duration(t['run_seconds'])}")
    if not est.fits:
        line += "; DOES NOT FIT" + (f": try {' '.join(est.change['overrides'])}" if est.change and
                                    est.change.get("change") else "")
    return line


def _data_line(d: dict) -> str:
    what = f"{'packed rows' if d['packed'] else 'samples'} of <= {d['max_length']} tokens"
    if d["streamed"]:
        return (f"data         streamed (data.streaming): the first {d['sampled']:,} {what} read from the stream "
                f"({d['rows_read']:,} rows), {d['mean_row_tokens']} tokens per row, {100 * d['loss_fraction']:.0f}% "
                "carry loss")
    source = (f"prepared data in {d['prepared']}; {d['sampled']:,} rows read" if d["prepared"]
              else f"{d['sampled']:,} tokenised for this estimate")
    return (f"data         {d['rows_read']:,} rows ({source}) -> {d['rows']:,} {what}, {d['tokens']:,} tokens, "
            f"{d['mean_row_tokens']} per row, {100 * d['loss_fraction']:.0f}% carry loss"
            + (f"; {d['truncated']:,} truncated" if d["truncated"] else "")
            + (f"; {d['dropped']:,} dropped" if d["dropped"] else ""))


def _speed_source(t: dict) -> str:
    p = t.get("probe")
    if not p:
        return "fitted efficiency"
    return "probe cached " + p["measured_at"][:10] if p["cached"] else f"probe measured now, {p['probe_seconds']} s"


def _probe_line(t: dict) -> str:
    p = t.get("probe")
    if not p:
        return (f"             speed from the efficiency fitted on SmolLM2-135M on a Zen 4, not measured here: "
                f"{t.get('fitted_because') or 'no probe'}")
    when = (f"cached, measured {p['measured_at']}" if p["cached"] else f"measured now in {p['probe_seconds']} s") \
        + f", load {p.get('load_average')}, other processes {100 * p.get('others_busy', 0):.0f}% of the CPUs" \
        + ("" if p["cached"] or p.get("others_busy", 0) <= BUSY else ": not cached, measure again on a quiet machine")
    return (f"             measured on this machine ({when}): one decoder layer forward + backward "
            f"{1e3 * p['layer_seconds']:.1f} ms, the rest (embeddings, head, loss) {1e3 * p['rest_seconds']:.1f} ms, "
            f"the optimizer {1e3 * p['optimizer_seconds']:.1f} ms per {p['optimizer_params'] / 1e6:.2f}M parameters; "
            f"on {p['batch']}")


def render(est: Estimate) -> str:
    d, s, t, m = est.data, est.step, est.time, est.model
    procs = f"{est.world} process{'es' if est.world > 1 else ''}"
    lines = [
        f"lmforge estimate: {est.config} ({est.method}, {est.engine} engine, {est.strategy}, {procs}, "
        f"compute {est.compute})",
        f"model        {m['source']}",
        f"             {m['model_type']} ({m['architecture']}), {m['layers']} layers, hidden {m['hidden']}, "
        f"intermediate {m['intermediate']}, heads {m['heads']}/{m['kv_heads']} kv, vocab {m['vocab']}"
        + (", tied embeddings" if m["tied"] else ""),
        f"parameters   {est.parameters:,} ({est.parameters / 1e6:.1f}M); trainable {est.trainable:,} "
        f"({100 * est.trainable / max(est.parameters, 1):.2f}%): {est.trainable_describe}",
        _data_line(d),
        f"step         {s['rows']} rows = {s['tokens']:,} tokens ({s['positions']:,} positions with padding, "
        f"{s['loss_tokens']:,} with loss); {s['steps']:,} steps"
        + (f" ({s['epochs']} epochs)" if s["epochs"] is not None else " (train.max_steps)"),
        "",
        f"memory per process, GB (* = this config, {procs}; "
        + (f"the others on {max(est.world, 2)} processes)" if est.world == 1 else "every strategy on as many)"),
        f"  {'strategy':<15}{'weights':>9}{'masters':>9}{'grads':>8}{'optim':>8}{'activ.':>8}{'(ckpt)':>8}"
        f"{'buffers':>9}{'offload':>9}{'heap':>6}{'peak':>8}",
    ]
    for name, mem in est.memory.items():
        mark = "*" if name == est.strategy else " "
        g = lambda k: f"{mem[k] / GB:.2f}"  # noqa: E731
        lines.append(f"{mark} {name:<15}{g('weights'):>9}{g('masters'):>9}{g('gradients'):>8}{g('optimizer'):>8}"
                     f"{g('activations'):>8}{g('activations_checkpointed'):>8}{g('buffers'):>9}{g('offloaded'):>9}"
                     f"{g('heap'):>6}{g('peak'):>8}" + (f"  ({mem['note']})" if mem["note"] else ""))
    lines += [
        f"  peak = {BASELINE_BYTES / GB:.2f} GB runtime + weights + masters + optimizer + offloaded + the larger of "
        f"{ACTIVATION_OVERHEAD} x activations ({'with' if est.step['checkpointing'] else 'without'} checkpointing) "
        "and gradients + buffers, + heap",
        "",
        f"time         {t['flops_per_token'] / 1e9:.2f} GFLOP per token, {t['flops_per_step'] / 1e12:.2f} TFLOP per "
        f"step; {est.machine['peak_flops'] / 1e9:.0f} GFLOP/s {est.compute} matmul peak x {t['efficiency']:.0%} "
        + ("MFU as measured" if t.get("probe") else "efficiency (fitted)") + f" ({est.machine['cpu']})",
        _probe_line(t),
        f"             {t['seconds_per_step']} s per step"
        + (f" ({t['communication_seconds']} s exchanging gradients)" if t["communication_seconds"] else "")
        + f", {t['tokens_per_second']} tokens/s; the run: {_duration(t['run_seconds'])} for {s['steps']:,} steps",
        f"fits         {'yes' if est.fits else 'NO'}: {est.fit_note}",
    ]
    if est.method == "grpo":  # the samples above are each prompt's completions at max_completion_length
        lines.insert(-1, "             grpo: training on every completion at grpo.max_completion_length tokens; the "
                         "rollouts (sampling them, usually most of a step) are not in this time or memory")
    if est.change is not None:
        c = est.change
        if c.get("change"):
            lines.append(f"cheapest change that fits: {c['change']}: {' '.join(c['overrides'])}")
            lines.append(f"             peak {gigabytes(c['peak'])} per process, {c['tokens_per_second']} tokens/s, "
                         f"{c['seconds_per_step']} s per step, run {_duration(c['run_seconds'])}")
        else:
            lines.append(f"no single change fits (tried: {'; '.join(c.get('tried', []))}): a smaller model or "
                         "data.max_length, or a machine with more memory")
    return "\n".join(lines)


def log_at_start(cfg: Config, config_name: str = "config") -> None:
    """``lmforge train``'s one-line estimate (rank 0), also written as ``output_dir/ESTIMATE_FILE``: the same
    object as ``lmforge estimate CONFIG --json`` for this config and process count, which the run report
    (``report.py``) sets beside what was measured. An estimate that fails never stops the run: it logs why, and
    an earlier run's estimate.json is removed so the report cannot show it as this run's.

    A resumed run rewrites estimate.json rather than keeping the first run's: the report compares it with this
    process's peak RSS, and a resumed run may differ from the first in what the estimate depends on (processes,
    batch, the machine, the prepared data now in the cache).

    Under torchrun each worker has its share of the node's cores (``launch.py`` sets OMP_NUM_THREADS), but the
    estimate counts the whole node's matmul peak shared by its processes, as ``lmforge estimate`` measures it
    beside the run: so the peak is taken at the node's threads (``flops.node_threads``), the figure the engines'
    MFU is measured against too (``flops.process_peak``)."""
    if not is_main_process():
        return
    out = Path(cloud.local_mirror(cfg.train.output_dir) if cloud.is_remote(cfg.train.output_dir)
               else cfg.train.output_dir)  # a URL trains in its local mirror, uploaded at the end (cloud.py)
    path, tmp = out / ESTIMATE_FILE, out / f".{ESTIMATE_FILE}.{os.getpid()}.tmp"  # hidden: never uploaded

    def drop(why: str) -> None:
        for f in (tmp, path):
            try:
                f.unlink(missing_ok=True)
            except OSError:
                pass
        if why:
            log(why)

    if os.environ.get("LMFORGE_NO_ESTIMATE"):
        drop("")
        return
    try:
        # under torchrun the other ranks load the model while rank 0 estimates: a probe measured now would see their
        # load, so it is only read from the cache there
        est = Estimator(copy.deepcopy(cfg), world_size(), config_name, probe_now=world_size() == 1,
                        threads=node_threads()).estimate()
    except Exception as e:  # noqa: BLE001 - the estimate is advice; the run reports real errors itself
        drop(f"estimate: unavailable ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})")
        return
    log(one_line(est))
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp.write_text(est.to_json())
        os.replace(tmp, path)
    except OSError as e:
        drop(f"estimate: not written to {path} ({e})")
