"""The run report (report.md + report.html): before/after answers on eval prompts, checked against greedy
generations of the base model and of the saved final model, both engines, full and LoRA; the HTML is
self-contained (inline base64 plot, escaped text) and, where Chromium is installed, renders."""

import base64
import html
import json
import re
import resource
import shutil
import subprocess

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import base_config, chat_rows, write_config, write_jsonl
from lmforge.cli import main
from lmforge.config import load_config
from lmforge.training.eval_metrics import eval_samples
from lmforge.training.report import BASE_ANSWERS, md_cell

N_SAMPLES = 3
NEW_TOKENS = 12


def _run(tmp_path, tiny_model_dir, engine, peft="none", report_samples=N_SAMPLES):
    data = write_jsonl(tmp_path / "d" / "train.jsonl", chat_rows(32))
    val = write_jsonl(tmp_path / "v" / "val.jsonl", chat_rows(6, seed=5))
    sections = {"train": {"engine": engine, "learning_rate": 1e-2, "save_steps": 4,
                          "per_device_eval_batch_size": 1},  # unpadded, as the direct generations below
                "data": {"eval": [{"path": str(val)}]},
                "eval": {"max_new_tokens": NEW_TOKENS, "report_samples": report_samples}}
    if peft != "none":
        sections["peft"] = {"kind": peft, "r": 4, "alpha": 8}
    tree = base_config(tiny_model_dir, data, tmp_path / "out", **sections)
    cfg_path = write_config(tmp_path / "c.yaml", tree)
    assert main(["train", str(cfg_path)]) == 0
    return tmp_path / "out", load_config(cfg_path)


@torch.no_grad()
def _greedy(model, prompts, tokenizer):
    """Each prompt alone (no padding), greedy: what the report's base / trained columns must hold."""
    model.eval()
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        out.append(tokenizer.decode(gen[0, len(p):], skip_special_tokens=True).strip())
    return out


@pytest.mark.parametrize("engine", ["native", "hf"])
@pytest.mark.parametrize("peft", ["none", "lora"])
def test_before_after_answers(tmp_path, tiny_model_dir, lmforge_cache, engine, peft):
    out, cfg = _run(tmp_path, tiny_model_dir, engine, peft)
    tok = AutoTokenizer.from_pretrained(out)
    prompts = [s.prompt_ids for s in eval_samples(cfg, tok)][:N_SAMPLES]
    assert len(prompts) == N_SAMPLES
    base = _greedy(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), prompts, tok)
    if peft == "none":
        trained_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    else:
        from peft import AutoPeftModelForCausalLM

        trained_model = AutoPeftModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    trained = _greedy(trained_model, prompts, tok)
    assert base != trained  # training changed the answers, so the columns below can tell them apart

    md = (out / "report.md").read_text()
    assert "## Before/after answers" in md
    table = md.split("## Before/after answers")[1].split("\n## ")[0]
    rows = [line for line in table.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) == N_SAMPLES
    for row, b, t in zip(rows, base, trained):
        assert row.endswith(f"| {md_cell(b)} | {md_cell(t)} |"), (row, b, t)
    references = [s.reference for s in eval_samples(cfg, tok)][:N_SAMPLES]
    assert all(f"| {md_cell(r)} |" in row for row, r in zip(rows, references))
    assert "peak RSS" in md and "MFU" in md
    _check_estimate_table(out)

    page = (out / "report.html").read_text()
    assert all(html.escape(a) in page for a in base + trained if a)
    png = re.search(r'<img alt="loss" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert png and base64.b64decode(png.group(1)) == (out / "plots" / "loss.png").read_bytes()
    assert not re.search(r'(src|href)="(https?:|//|file:|plots/)', page)  # nothing outside the page
    assert (out / BASE_ANSWERS).exists() == (peft == "none")


def _table(md: str, heading: str) -> dict[str, list[str]]:
    """A report.md table under ``heading``: first cell -> the other cells."""
    section = md.split(f"## {heading}")[1].split("\n## ")[0]
    lines = [x for x in section.splitlines() if x.startswith("| ")][1:]  # the header left out
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in x.strip("|").split(" | ")] for x in lines)}


def _check_estimate_table(out):
    """output_dir/estimate.json is what `train` estimated at start, and report.md sets its figures beside those
    of metrics.jsonl, computed here by hand (4 steps logged one by one; the first is the warm-up)."""
    est = json.loads((out / "estimate.json").read_text())
    assert {"peak", "memory", "step", "time", "machine", "world", "engine", "strategy", "fits"} <= set(est)
    assert est["world"] == 1 and est["step"]["steps"] == 4 and est["peak"] > 0
    t = est["time"]
    train = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    tps = sum(r["tokens_per_second"] for r in train[1:]) / 3
    seconds = [(r["tokens_seen"] - before) / r["tokens_per_second"]
               for r, before in zip(train, [0] + [r["tokens_seen"] for r in train[:-1]])]
    rows = _table((out / "report.md").read_text(), "Estimate vs measured")
    peak = rows["peak RSS per process (this process), GB"]
    assert peak[0] == f"{est['peak'] / 2**30:.2f}"
    assert 0.1 < float(peak[1]) <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 + 0.01  # this process
    assert abs(float(peak[2]) - float(peak[1]) / (est["peak"] / 2**30)) < 0.02  # of the unrounded figures
    assert rows["tokens/s (all processes)"] == [f"{t['tokens_per_second']:.1f}", f"{tps:.1f}",
                                                f"{tps / t['tokens_per_second']:.2f}"]
    est_mfu = 100 * (t["flops_per_token"] * t["tokens_per_second"] / est["machine"]["peak_flops"])
    if all("mfu" in r for r in train):
        mfu = 100 * (sum(r["mfu"] for r in train[1:]) / 3)  # in the report's order: a mean near x.x5 rounds alike
        assert rows["MFU, %"] == [f"{est_mfu:.1f}", f"{mfu:.1f}", f"{mfu / est_mfu:.2f}"]
    step = sum(seconds[1:]) / 3
    assert rows["seconds per step"] == [f"{t['seconds_per_step']:.3f}", f"{step:.3f}",
                                        f"{step / t['seconds_per_step']:.2f}"]
    run, est_run = sum(seconds), 4 * t["seconds_per_step"]
    fmt = "{:.1f}" if max(run, est_run) >= 10 else "{:.3f}"
    assert rows["seconds in training steps (4 steps logged)"] == [fmt.format(est_run), fmt.format(run),
                                                                   f"{run / est_run:.2f}"]


def test_resume_rewrites_the_estimate(tmp_path, tiny_model_dir, lmforge_cache):
    """A resumed run writes estimate.json again for its own config (here 6 steps instead of 4), and its report's
    table covers every logged step, those before the resume included."""
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(32))
    tree = base_config(tiny_model_dir, data, tmp_path / "out")
    assert main(["train", str(write_config(tmp_path / "c.yaml", tree))]) == 0
    out = tmp_path / "out"
    assert json.loads((out / "estimate.json").read_text())["step"]["steps"] == 4
    tree["train"].update(max_steps=6, resume="auto")
    assert main(["train", str(write_config(tmp_path / "c.yaml", tree))]) == 0
    est = json.loads((out / "estimate.json").read_text())
    assert est["step"]["steps"] == 6
    rows = _table((out / "report.md").read_text(), "Estimate vs measured")
    estimated = float(rows["seconds in training steps (6 steps logged)"][0])
    assert abs(estimated - 6 * est["time"]["seconds_per_step"]) < 0.05  # printed to 3 decimals, or 1 past 10 s


def test_report_samples_zero_leaves_the_section_out(tmp_path, tiny_model_dir, lmforge_cache):
    out, _ = _run(tmp_path, tiny_model_dir, "native", report_samples=0)
    md = (out / "report.md").read_text()
    assert "## Data" in md and "Before/after" not in md
    assert "Before/after" not in (out / "report.html").read_text()
    assert not (out / BASE_ANSWERS).exists()


def test_no_eval_data_says_why(tmp_path, tiny_model_dir, lmforge_cache):
    data = write_jsonl(tmp_path / "d" / "train.jsonl", chat_rows(16))
    tree = base_config(tiny_model_dir, data, tmp_path / "out", train={"max_steps": 2, "save_steps": 2})
    assert main(["train", str(write_config(tmp_path / "c.yaml", tree))]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Before/after answers" in md and "skipped: no eval data (data.eval)" in md


def test_text_is_escaped(tmp_path):
    from lmforge.training.report import _Report

    rep = _Report(tmp_path)
    rep.table(["a"], [["<script>x|y</script>\nz"]])
    assert "&lt;script&gt;x\\|y&lt;/script&gt;<br>z" in rep.markdown()
    assert "<script>" not in rep.html() and "&lt;script&gt;x|y&lt;/script&gt;" in rep.html()


def test_html_report_renders_in_headless_chromium(tmp_path, tiny_model_dir, lmforge_cache):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("headless Chromium not installed (Debian package `chromium`)")
    out, _ = _run(tmp_path, tiny_model_dir, "native", report_samples=1)
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
                    (out / "report.html").resolve().as_uri()], check=True, timeout=120, capture_output=True)
    assert shot.exists()
    try:
        from PIL import Image
    except ImportError:
        assert shot.stat().st_size > 20_000  # a blank page compresses to a few kB
        return
    colours = Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 50  # text and the loss plot, not a blank page
    # the train-loss curve is drawn in matplotlib's first colour (#1f77b4): the inline plot rendered
    blue = sum(n for n, (r, g, b) in colours or [] if abs(r - 0x1F) < 30 and abs(g - 0x77) < 30 and abs(b - 0xB4) < 30)
    assert blue > 50
