"""The run report: ``report.md`` and ``report.html`` in ``train.output_dir`` at the end of training (rank 0).

Both hold the same content, built once as a list of blocks (``_Report``) and rendered twice: the run summary,
data counts, training losses and speed, measured resources (peak RSS, tokens/s, MFU), **estimated vs measured**
(the estimate ``train`` wrote at start, ``estimate.json``, beside peak RSS, tokens/s, MFU, step and run time,
with their ratios), eval metrics over time, the **before/after answers** on up to ``eval.report_samples`` eval
prompts, and the plots. report.html has the plots inline as base64 PNGs and every text escaped, so it opens
offline with nothing else beside it.

Before/after answers are greedy, ``eval.max_new_tokens`` long, generated with the eval metrics' decode path
(``eval_metrics.eval_samples`` / ``generate_completions``). The base answers of an adapter run come from the
same model with the adapter disabled (PEFT's ``disable_adapter()``); a full fine-tune has no base left at the
end, so ``record_base_answers`` generates them before step 1 and keeps them in ``BASE_ANSWERS`` (a resumed run
reuses the file), which costs a few seconds instead of a second copy of the model.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import os
import resource
from pathlib import Path

import torch.distributed as dist

from lmforge.config import Config
from lmforge.training.outputs import read_metrics
from lmforge.training.estimate import ESTIMATE_FILE, GB
from lmforge.training.eval_metrics import eval_samples, generate_completions
BASE_ANSWERS = "report_base_answers.json"  # in output_dir: a full fine-tune's base answers, written before step 1
PROMPT_CHARS = 300  # a long prompt is shown by its last characters (where the question usually is)


# ---------------------------------------------------------------------------------------- before/after answers
def _rank() -> int:
    # torch.distributed may not be initialised yet when the HF engine starts (the Trainer does it), so RANK too
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))


def _skip_reason(cfg: Config, model) -> str | None:
    """Why this run cannot show before/after answers, or None when it can."""
    if not cfg.data.eval:
        return "no eval data (data.eval): the answers are generated for eval prompts"
    if cfg.train.distributed in ("fsdp", "deepspeed"):
        return (f"train.distributed: {cfg.train.distributed} shards the model across processes; before/after "
                "answers are generated on one process only (try `lmforge generate` on the final model)")
    if model.config.is_encoder_decoder:
        return "encoder-decoder model: before/after answers cover causal LMs only"
    if cfg.method == "reward":
        return "a reward model scores text; it does not generate answers"
    return None


def _samples(cfg: Config, tokenizer):
    limited = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, max_samples=cfg.eval.report_samples))
    return eval_samples(limited, tokenizer)


def _answers(cfg: Config, model, tokenizer, samples) -> list[str]:
    was_training = model.training
    model.eval()
    try:
        return generate_completions(model, tokenizer, [s.prompt_ids for s in samples], cfg.eval.max_new_tokens,
                                    cfg.train.per_device_eval_batch_size)
    finally:
        model.train(was_training)


def record_base_answers(cfg: Config, model, tokenizer, resumed: bool) -> None:
    """Before step 1 of a full fine-tune (rank 0): the base model's answers, kept in output_dir/BASE_ANSWERS.
    Adapter runs and resumed runs do nothing here (see the module docstring)."""
    out = Path(cfg.train.output_dir) / BASE_ANSWERS
    if _rank() != 0 or resumed or cfg.peft.kind != "none":
        return
    out.unlink(missing_ok=True)  # never an earlier run's answers
    if cfg.eval.report_samples == 0 or _skip_reason(cfg, model):
        return
    samples = _samples(cfg, tokenizer)
    if samples:
        base = _answers(cfg, model, tokenizer, samples)
        out.write_text(json.dumps({"prompt_ids": [s.prompt_ids for s in samples], "answers": base}))


def before_after(cfg: Config, model, tokenizer, out: Path) -> list[dict] | str:
    """Rows {prompt, reference, base, trained} for the report, or the reason there are none."""
    reason = _skip_reason(cfg, model)
    if reason:
        return reason
    samples = _samples(cfg, tokenizer)
    if not samples:
        return "the eval rows have no completion or assistant answer to compare against (e.g. text rows)"
    trained = _answers(cfg, model, tokenizer, samples)
    if cfg.peft.kind != "none":
        from peft import PeftModel

        if not isinstance(model, PeftModel):
            return f"peft.kind {cfg.peft.kind}: the trained model is not a PEFT model, so its base cannot be shown"
        with model.disable_adapter():  # the same weights without the adapter: the base model
            base = _answers(cfg, model, tokenizer, samples)
    else:
        path = out / BASE_ANSWERS
        if not path.exists():
            return ("a full fine-tune's base answers are generated before step 1; this run resumed from a "
                    "checkpoint of a run that did not record them")
        kept = json.loads(path.read_text())
        if kept["prompt_ids"] != [s.prompt_ids for s in samples]:
            return f"the eval prompts changed since {BASE_ANSWERS} was written (before step 1)"
        base = kept["answers"]
    prompts = [tokenizer.decode(s.prompt_ids, skip_special_tokens=True).strip() for s in samples]
    return [{"prompt": p if len(p) <= PROMPT_CHARS else "…" + p[-PROMPT_CHARS:], "reference": s.reference,
             "base": b, "trained": t} for p, s, b, t in zip(prompts, samples, base, trained)]


# ---------------------------------------------------------------------------------------- rendering
def md_cell(text: str) -> str:
    """A table cell in report.md: escaped, one line (a newline becomes <br>, a pipe \\|)."""
    text = html.escape(text, quote=False) if text else "(empty)"
    return text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


class _Report:
    """Blocks rendered both as markdown and as a standalone HTML page."""

    def __init__(self, out: Path):
        self.out, self.blocks = out, []

    def heading(self, text: str, level: int = 2):
        self.blocks.append(("h", level, text))

    def items(self, lines: list[str]):
        self.blocks.append(("ul", lines))

    def table(self, header: list[str], rows: list[list[str]]):
        self.blocks.append(("table", header, rows))

    def image(self, rel: str, alt: str):
        self.blocks.append(("img", rel, alt))

    def markdown(self) -> str:
        lines = []
        for b in self.blocks:
            if b[0] == "h":
                lines += ["#" * b[1] + " " + b[2], ""]
            elif b[0] == "ul":
                lines += [f"- {x}" for x in b[1]] + [""]
            elif b[0] == "table":
                lines += ["| " + " | ".join(map(md_cell, b[1])) + " |", "|" + "---|" * len(b[1])]
                lines += ["| " + " | ".join(map(md_cell, r)) + " |" for r in b[2]] + [""]
            else:
                lines += [f"![{b[2]}]({b[1]})", ""]
        return "\n".join(lines)

    def html(self) -> str:
        e = html.escape
        parts = ["<!doctype html>", '<html><head><meta charset="utf-8"><title>lmforge run report</title>',
                 "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
                 "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:4px 8px;vertical-align:top;"
                 "text-align:left;white-space:pre-wrap}img{max-width:100%}</style></head><body>"]
        for b in self.blocks:
            if b[0] == "h":
                parts.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
            elif b[0] == "ul":
                parts.append("<ul>" + "".join(f"<li>{e(x)}</li>" for x in b[1]) + "</ul>")
            elif b[0] == "table":
                head = "".join(f"<th>{e(h)}</th>" for h in b[1])
                body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in b[2])
                parts.append(f"<table><tr>{head}</tr>{body}</table>")
            else:
                data = base64.b64encode((self.out / b[1]).read_bytes()).decode()
                parts.append(f'<p><img alt="{e(b[2])}" src="data:image/png;base64,{data}"></p>')
        return "\n".join(parts + ["</body></html>", ""])


def _resources(rows: list[dict]) -> list[str]:
    """Measured peak RSS, tokens/s and MFU, over every logged step."""
    lines = [f"peak RSS (this process): {_peak_rss() / GB:.2f} GB"]
    speeds = [r["tokens_per_second"] for r in rows if "tokens_per_second" in r]
    mfus = [r["mfu"] for r in rows if "mfu" in r]
    if speeds:
        lines.append(f"tokens/s (non-padding, all ranks): mean {sum(speeds) / len(speeds):.1f}, "
                     f"median {sorted(speeds)[len(speeds) // 2]:.1f}")
    if mfus:
        lines.append(f"MFU: mean {100 * sum(mfus) / len(mfus):.2f}%")
    return lines


# ---------------------------------------------------------------------------------------- estimate vs measured
def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB; this process (rank 0)


def measured_speed(rows: list[dict]) -> dict:
    """Speed from metrics.jsonl's training rows, steady state: ``tokens_per_second`` and ``mfu``, means over the
    logged windows after the first (it holds the warm-up step; the only window when there is one);
    ``seconds_per_step`` over those windows; ``train_seconds`` spent in training steps over every window and the
    ``steps`` they cover. A window's seconds are its tokens (``tokens_seen`` since the row before) over its
    tokens/s: both engines time training steps only, not evaluation or checkpoints. A window whose token count
    went back (the hf engine counts from 0 again in a resumed process) is left out of the timings. Keys are
    missing when no row carries what they need."""
    train = [r for r in rows if "loss" in r]
    out = {}
    speeds = [r for r in train if r.get("tokens_per_second")]
    steady = speeds[1:] or speeds
    if steady:
        out["tokens_per_second"] = sum(r["tokens_per_second"] for r in steady) / len(steady)
    mfus = [r["mfu"] for r in steady if "mfu" in r]
    if mfus:
        out["mfu"] = sum(mfus) / len(mfus)
    windows, step, seen = [], 0, 0  # (steps, seconds) per training row; step and tokens at the row before
    for r in rows:
        tokens = r.get("tokens_seen")
        if tokens is None:
            continue
        if "loss" in r and r.get("tokens_per_second") and tokens > seen and r["step"] > step:
            windows.append((r["step"] - step, (tokens - seen) / r["tokens_per_second"]))
        step, seen = r["step"], tokens
    if windows:
        later = windows[1:] or windows
        out["seconds_per_step"] = sum(s for _, s in later) / sum(n for n, _ in later)
        out["train_seconds"], out["steps"] = sum(s for _, s in windows), sum(n for n, _ in windows)
    return out


def estimate_table(est: dict, rows: list[dict], peak_rss: int) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the report's estimated-vs-measured table: ``est`` is output_dir/estimate.json,
    ``rows`` metrics.jsonl, ``peak_rss`` this process's peak (bytes). MFU is estimated as the engines log it:
    FLOPs per token x tokens/s over the machine's matmul peak; the time in training steps as the estimated
    seconds per step x the steps the measured windows cover."""
    m, t = measured_speed(rows), est["time"]
    steps = m.get("steps")
    est_run = t["seconds_per_step"] * steps if steps and t.get("seconds_per_step") is not None else None
    est_mfu = t["flops_per_token"] * t["tokens_per_second"] / est["machine"]["peak_flops"] \
        if t.get("tokens_per_second") and est["machine"].get("peak_flops") else None
    mfu = m.get("mfu")
    table = [  # (what, estimated, measured, format)
        (f"peak RSS per process ({'rank 0' if est['world'] > 1 else 'this process'}), GB", est["peak"] / GB,
         peak_rss / GB, "{:.2f}"),
        ("tokens/s (all processes)", t.get("tokens_per_second"), m.get("tokens_per_second"), "{:.1f}"),
        ("MFU, %", est_mfu and 100 * est_mfu, mfu and 100 * mfu, "{:.1f}"),
        ("seconds per step", t.get("seconds_per_step"), m.get("seconds_per_step"), "{:.3f}"),
        (f"seconds in training steps ({steps} steps logged)" if steps else "seconds in training steps", est_run,
         m.get("train_seconds"), "{:.1f}" if max(est_run or 0, m.get("train_seconds") or 0) >= 10 else "{:.3f}"),
    ]
    out = []
    for what, e, got, fmt in table:
        ratio = f"{got / e:.2f}" if e and got is not None else ""
        out.append([what, fmt.format(e) if e is not None else "not estimated",
                    fmt.format(got) if got is not None else "not logged", ratio])
    return ["figure", "estimated", "measured", "measured / estimated"], out


def _estimate_section(rep: _Report, out: Path, rows: list[dict]) -> None:
    path = out / ESTIMATE_FILE
    try:
        est = json.loads(path.read_text())
        header, table = estimate_table(est, rows, _peak_rss())
    except FileNotFoundError:
        rep.items([f"no {ESTIMATE_FILE} in output_dir (LMFORGE_NO_ESTIMATE was set, or the estimate failed: the "
                   "log's `estimate:` line says why); `lmforge estimate CONFIG` predicts these before a run"])
        return
    except (OSError, ValueError, KeyError, TypeError) as e:
        rep.items([f"{ESTIMATE_FILE} unreadable ({type(e).__name__}: {e})"])
        return
    rep.items([f"estimated at the start of `train` ({ESTIMATE_FILE}): {est['world']} process"
               f"{'es' if est['world'] > 1 else ''}, {est['engine']} engine, {est['strategy']}, compute "
               f"{est['compute']}, {est['machine']['cpu']}; measured: peak RSS of this process, the rest from "
               "metrics.jsonl after the first logged window (warm-up)"])
    rep.table(header, table)


def _eval_table(evals: list[dict]) -> tuple[list[str], list[list[str]]]:
    keys = sorted({k for r in evals for k in r if k.startswith("eval_") and isinstance(r[k], (int, float))})
    return ["step"] + keys, [[str(r["step"])] + [f"{r[k]:.4g}" if k in r else "" for k in keys] for r in evals]


def _plan_lines(out: Path) -> list[str]:
    """The run plan, as config.yaml's opening comments record it (``run.config_yaml``)."""
    path = out / "config.yaml"
    if not path.exists():
        return []
    return [line[len("# plan: "):] for line in path.read_text().splitlines() if line.startswith("# plan: ")]


def write_report(output_dir: str | Path, cfg_summary: dict, data_lines: list[str], cfg: Config | None = None,
                 model=None, tokenizer=None) -> None:
    """report.md and report.html (rank 0, after the final save). With cfg, model and tokenizer, and
    ``eval.report_samples`` > 0, they show before/after answers (generated here, see the module docstring)."""
    out = Path(output_dir)
    rows = read_metrics(out / "metrics.jsonl")
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    rep = _Report(out)
    rep.heading("lmforge run report", 1)
    rep.items([f"{k}: {v}" for k, v in cfg_summary.items()])
    plan_lines = _plan_lines(out)
    if plan_lines:
        rep.heading("Plan (what ran, and why)")
        rep.items(plan_lines)
    rep.heading("Data")
    rep.items(list(data_lines))
    rep.heading("Training")
    lines = []
    if train:
        lines.append(f"steps: {train[-1]['step']}; first loss {train[0]['loss']:.4f}, last loss {train[-1]['loss']:.4f}")
        rewards = [r["reward"] for r in train if "reward" in r]  # online RL: the reward is what should rise
        if rewards:
            fifth = max(1, len(rewards) // 5)
            lines.append(f"reward: mean {sum(rewards[:fifth]) / fifth:.4f} over the first {fifth} logged step(s), "
                         f"{sum(rewards[-fifth:]) / fifth:.4f} over the last {fifth} (a loss near 0 is normal in GRPO)")
    if evals:
        e = evals[-1]
        ppl = f", perplexity {e['eval_perplexity']:.2f}" if "eval_perplexity" in e else ""
        reward = f", eval_reward {e['eval_reward']:.4f}" if "eval_reward" in e else ""
        lines.append(f"last eval (step {e['step']}): eval_loss {e['eval_loss']:.4f}{ppl}{reward}")
    rep.items(lines or ["no training steps logged"])
    rep.heading("Resources (measured)")
    rep.items(_resources(train))
    rep.heading("Estimate vs measured")
    _estimate_section(rep, out, rows)
    if evals:
        rep.heading("Eval metrics over time")
        rep.table(*_eval_table(evals))
    if cfg is not None and model is not None and cfg.eval.report_samples > 0:
        rep.heading("Before/after answers")
        answers = before_after(cfg, model, tokenizer, out)
        if isinstance(answers, str):
            rep.items([f"skipped: {answers}"])
        else:
            rep.items([f"greedy, up to {cfg.eval.max_new_tokens} new tokens, first {len(answers)} eval prompts "
                       f"(eval.report_samples: {cfg.eval.report_samples}); base = "
                       + ("the model with the adapter disabled" if cfg.peft.kind != "none"
                          else "the starting weights, before step 1")])
            rep.table(["#", "prompt", "reference", "base", "trained"],
                      [[str(i + 1), a["prompt"], a["reference"], a["base"], a["trained"]]
                       for i, a in enumerate(answers)])
    plots = sorted((out / "plots").glob("*.png")) if (out / "plots").is_dir() else []
    if plots:
        rep.heading("Plots")
        for p in plots:
            rep.image(f"plots/{p.name}", p.stem)
    (out / "report.md").write_text(rep.markdown())
    (out / "report.html").write_text(rep.html())
