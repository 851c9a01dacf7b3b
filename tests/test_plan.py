"""One plan decides what runs (lmforge/plan.py): every config key is honoured or refused by each engine, the
automatic engine choice comes from the same table, keys that mean nothing in a run are refused, and the plan is
saved and shown. And the layers point one way: the library never imports the recipes, and no module imports
another that imports it back (counting imports placed inside functions)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from conftest import base_config, chat_rows, write_jsonl

from lmforge import plan
from lmforge.config import iter_fields, load_config
from lmforge.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _tree(**overrides) -> dict:
    tree = base_config(Path("/nonexistent/model"), Path("/nonexistent/data.jsonl"), Path("/nonexistent/out"))
    for key, value in overrides.items():
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


# ----------------------------------------------------------------------------------------------- the table
@pytest.mark.parametrize("engine", sorted(plan.ENGINES))
def test_every_config_key_is_honoured_or_refused_by_each_engine(engine):
    """A new key must be declared for both engines (plan.ENGINES), or this fails: nothing is ignored by default."""
    e = plan.ENGINES[engine]
    uncovered = [key for key, *_ in iter_fields() if not e.covers(key)]
    assert not uncovered, f"the {engine} engine neither honours nor refuses {uncovered}: declare them in plan.py"


@pytest.mark.parametrize("engine, refusal", [(name, r) for name, e in sorted(plan.ENGINES.items()) for r in e.refuses],
                         ids=lambda x: x if isinstance(x, str) else x.key)
def test_each_refusal_is_a_load_error_naming_its_key(engine, refusal):
    """With the engine asked for, the refusal's example is refused at load, the key named; without train.engine the
    other engine runs it (or, if both refuse, the error names both)."""
    with pytest.raises(ConfigError) as e:
        load_config(None, tree=_tree(**{"train.engine": engine, **refusal.example}))
    assert f"{refusal.key}:" in str(e.value) and f"train.engine: {engine}" in str(e.value)
    cfg = load_config(None, tree=_tree(**refusal.example))  # the engine unset: no error at load
    chosen, why = plan.choose_engine(cfg)
    assert chosen != engine
    if chosen == "hf":  # away from the default: the native refusal is the reason given
        assert refusal.key in why


def test_the_default_engine_is_native_and_the_reason_is_the_tables():
    cfg = load_config(None, tree=_tree())
    p = plan.plan(cfg, "decoder")
    assert (p.engine, p.layout, p.packing, p.module) == ("native", "causal", True, "sft")
    p = plan.plan(load_config(None, tree=_tree(**{"train.optim": "adafactor"})), "decoder")
    assert p.engine == "hf" and p.engine_reason.startswith("train.optim:")
    p = plan.plan(cfg, "encoder-decoder")  # the native engine trains causal LMs only
    assert (p.engine, p.module, p.layout, p.packing) == ("hf", "seq2seq", "seq2seq", False)
    assert p.engine_reason.startswith("train.engine:")


def test_a_config_no_engine_can_run_names_both_reasons():
    with pytest.raises(ConfigError) as e:  # streaming is native-only, torch_compile hf-only
        load_config(None, tree=_tree(**{"data.streaming": True, "train.torch_compile": True}))
    assert "train.torch_compile:" in str(e.value) and "data.streaming" in str(e.value)


@pytest.mark.parametrize("key, value, others", [
    ("dpo.beta", 0.5, {}), ("kto.desirable_weight", 2.0, {}), ("orpo.beta", 0.3, {"method": "dpo"}),
    ("data.shuffle_buffer", 10, {}), ("data.max_prompt_length", 32, {}),
])
def test_a_key_that_means_nothing_in_this_run_is_refused(key, value, others):
    with pytest.raises(ConfigError) as e:
        load_config(None, tree=_tree(**{key: value, **others}))
    assert f"{key}:" in str(e.value) and "ignored" in str(e.value)


def test_adapter_settings_kept_while_peft_kind_is_switched_are_named_in_the_plan():
    """peft.r in a config run with peft.kind=none (switched on the command line) is not refused, but the plan
    says it is not used."""
    cfg = load_config(None, tree=_tree(**{"peft.r": 8, "peft.num_virtual_tokens": 5}))
    unused = [line for line in plan.plan(cfg, "decoder").lines() if line.startswith("not used in this run:")]
    assert len(unused) == 2 and "peft.r: applies to peft.kind lora" in unused[0]
    assert "peft.num_virtual_tokens" in unused[1]
    assert not plan.plan(load_config(None, tree=_tree(**{"peft.r": 8, "peft.kind": "lora"})), "decoder").unused


def test_a_metric_only_lmforge_eval_computes_is_refused_in_a_training_config():
    with pytest.raises(ConfigError, match="eval.metrics: reward_accuracy is a metric of `lmforge eval"):
        load_config(None, tree=_tree(**{"method": "reward", "eval.metrics": ["reward_accuracy"]}))


def test_architecture_scoped_keys_are_refused_once_the_architecture_is_known():
    cfg = load_config(None, tree=_tree(**{"train.predict_with_generate": True}))
    assert plan.plan(cfg, "encoder-decoder").engine == "hf"
    with pytest.raises(ConfigError, match="train.predict_with_generate:"):
        plan.plan(cfg, "decoder")
    cfg = load_config(None, tree=_tree(**{"data.mlm_probability": 0.3, "method": "pretrain"}))
    assert plan.plan(cfg, "encoder-only").layout == "mlm"
    with pytest.raises(ConfigError, match="data.mlm_probability:"):
        plan.plan(cfg, "decoder")


def test_the_native_dpo_losses_the_table_lists_are_the_ones_dpo_computes():
    from lmforge.methods import dpo

    assert set(plan.NATIVE_DPO_LOSSES) == set(dpo.NATIVE_LOSSES)


# ----------------------------------------------------------------------------------------------- saved and shown
def test_the_plan_is_saved_shown_and_config_yaml_still_loads(tmp_path, tiny_model_dir, lmforge_cache, capsys):
    from lmforge.cli import main
    from lmforge.methods import sft

    write_jsonl(tmp_path / "d.jsonl", chat_rows(8))
    tree = base_config(tiny_model_dir, tmp_path / "d.jsonl", tmp_path / "run", train={"max_steps": 1, "save_steps": 1})
    out = sft.train(load_config(None, tree=tree))
    text = (out / "config.yaml").read_text()
    assert text.startswith("# plan: method: sft on a decoder model") and "# plan: engine: native (" in text
    again = load_config(str(out / "config.yaml"))
    assert again.train.engine == "native"
    report = (out / "report.md").read_text()
    assert "Plan (what ran, and why)" in report and "packing on" in report
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(tree))
    assert main(["inspect", str(path), "--n", "1"]) == 0
    shown = capsys.readouterr().out
    assert "run plan:" in shown and "engine: native (" in shown and "data: causal samples, packing on" in shown


def test_train_profile_writes_a_trace_on_the_hf_engine_too(tmp_path, tiny_model_dir, lmforge_cache):
    """train.profile was honoured by the native engine only: a run on the hf engine wrote no trace."""
    from lmforge.methods import sft

    write_jsonl(tmp_path / "d.jsonl", chat_rows(8))
    tree = base_config(tiny_model_dir, tmp_path / "d.jsonl", tmp_path / "run",
                       train={"engine": "hf", "max_steps": 2, "save_steps": 2, "profile": {"start_step": 1, "steps": 1}})
    out = sft.train(load_config(None, tree=tree))
    traces = list((out / "profiler").glob("*.pt.trace.json"))
    assert len(traces) == 1 and json.loads(traces[0].read_text())["traceEvents"]


# ----------------------------------------------------------------------------------------------- layers
def _imports() -> dict[str, set[str]]:
    """lmforge module -> the lmforge modules it imports, at module level or inside functions."""
    files = {}
    for f in (ROOT / "lmforge").rglob("*.py"):
        parts = f.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f

    def known(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, f in files.items():
        package = mod if f.name == "__init__.py" else mod.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            found |= {known(n) for n in names if n.startswith("lmforge")} - {None, mod}
        graph[mod] = found
    return graph


def test_the_library_never_imports_the_recipes():
    library = ("lmforge.config", "lmforge.registry", "lmforge.plan", "lmforge.log", "lmforge.errors", "lmforge.models",
               "lmforge.data", "lmforge.training", "lmforge.inference", "lmforge.evaluation", "lmforge.distributed")
    up = sorted(f"{m} -> {t}" for m, targets in _imports().items() if m.startswith(library)
                for t in targets if t.startswith(("lmforge.methods", "lmforge.commands", "lmforge.cli")))
    assert not up, "the library imports a recipe or a command: " + "; ".join(up)


def test_no_import_cycle_between_lmforge_modules():
    """Counting imports inside functions: moving an import into a function hides a cycle, it does not remove it."""
    graph = _imports()
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)
