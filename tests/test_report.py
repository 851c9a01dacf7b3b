"""The run report (report.md + report.html): before/after answers on eval prompts, checked against greedy
generations of the base model and of the saved final model, both engines, full and LoRA; the HTML is
self-contained (inline base64 plot, escaped text) and, where Chromium is installed, renders."""

import base64
import html
import re
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

    page = (out / "report.html").read_text()
    assert all(html.escape(a) in page for a in base + trained if a)
    png = re.search(r'<img alt="loss" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert png and base64.b64decode(png.group(1)) == (out / "plots" / "loss.png").read_bytes()
    assert not re.search(r'(src|href)="(https?:|//|file:|plots/)', page)  # nothing outside the page
    assert (out / BASE_ANSWERS).exists() == (peft == "none")


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
