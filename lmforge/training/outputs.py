"""The files a run writes as it goes, the same on both engines: metrics.jsonl (one JSON object per logged step),
plots/loss.png redrawn from it, and what the progress bar shows of a row."""

from __future__ import annotations

import json
import math
from pathlib import Path

PLOT_EVERY_SECONDS = 20.0


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(rows: list[dict], out: Path) -> None:
    """plots/loss.png: train and eval loss against step, plus other logged curves (e.g. rewards/margins)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        return [p[0] for p in pts], [p[1] for p in pts]

    extra = sorted({k for r in rows for k in r if k.startswith(("rewards/", "eval_rewards/")) or k in (
        "nll_loss", "log_odds_ratio", "eval_rouge", "eval_bleu", "eval_exact_match", "reward", "eval_reward")})
    fig, axes = plt.subplots(1, 2 if extra else 1, figsize=(11 if extra else 6, 4), squeeze=False)
    ax = axes[0][0]
    for key, style in (("loss", "-"), ("eval_loss", "o-")):
        xs, ys = series(key)
        if xs:
            ax.plot(xs, ys, style, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    if extra:
        ax2 = axes[0][1]
        for key in extra:
            xs, ys = series(key)
            if xs:
                ax2.plot(xs, ys, "-" if not key.startswith("eval_") else "o-", label=key)
        ax2.set_xlabel("step")
        ax2.legend(fontsize=7)
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(out)


def refresh_plot(output_dir: Path) -> None:
    """Redraw plots/loss.png from metrics.jsonl; a failure is reported, never raised."""
    try:
        plot_metrics(read_metrics(output_dir / "metrics.jsonl"), output_dir / "plots" / "loss.png")
    except Exception as e:  # a plot must never kill a training run
        print(f"[lmforge] could not refresh the plot: {e}", flush=True)


def progress_postfix(row: dict) -> dict[str, str]:
    """What the progress bar shows of a logged training row: loss, reward (GRPO), tokens/s, MFU."""
    post = {"loss": f"{row['loss']:.4f}"} if "loss" in row else {}
    if "reward" in row:  # online RL: the reward is what rises (its loss stays near 0)
        post["reward"] = f"{row['reward']:.3f}"
    if "tokens_per_second" in row:
        post["tok/s"] = f"{row['tokens_per_second']:.0f}"
    if "mfu" in row:
        post["mfu"] = f"{100 * row['mfu']:.0f}%"
    return post


def truncate_metrics_after(output_dir: str | Path, step: int) -> None:
    """On resume, drop metric rows logged after the checkpoint so curves continue without duplicates."""
    path = Path(output_dir) / "metrics.jsonl"
    rows = read_metrics(path)
    kept = [r for r in rows if r.get("step", 0) <= step]
    if len(kept) != len(rows):
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
