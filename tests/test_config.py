"""Config: typed schema, unknown keys with suggestions, overrides, HF aliases, shipped configs."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lmforge.cli import main
from lmforge.config import load_config
from lmforge.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
MIN = {"model": {"name_or_path": "x"}, "data": {"train": [{"path": "d.jsonl"}]}}


def _tree(**sections):
    tree = yaml.safe_load(yaml.safe_dump(MIN))
    for k, v in sections.items():
        tree.setdefault(k, {}).update(v)
    return tree


def test_misspelt_key_names_key_and_suggests():
    with pytest.raises(ConfigError) as e:
        load_config(None, tree=_tree(train={"learning_rat": 1e-4}))
    assert "train.learning_rat" in str(e.value) and "did you mean 'learning_rate'" in str(e.value)


def test_wrong_type_names_key_and_expectation():
    with pytest.raises(ConfigError) as e:
        load_config(None, tree=_tree(train={"max_steps": "many"}))
    assert "train.max_steps" in str(e.value) and "integer" in str(e.value)


def test_bad_choice_suggests():
    with pytest.raises(ConfigError) as e:
        load_config(None, tree=_tree(peft={"kind": "lora2"}))
    assert "peft.kind" in str(e.value) and "'lora'" in str(e.value)


def test_overrides_and_yaml_1e_floats(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(MIN) + "train:\n  learning_rate: 1e-5\n")
    cfg = load_config(path, ["train.max_steps=7", "peft.kind=lora", "data.max_length=64"])
    assert cfg.train.learning_rate == 1e-5 and cfg.train.max_steps == 7
    assert cfg.peft.kind == "lora" and cfg.data.max_length == 64


def test_hf_names_that_transformers_5_renamed_still_work():
    cfg = load_config(None, tree=_tree(train={"warmup_ratio": 0.1, "evaluation_strategy": "steps"},
                                       model={"torch_dtype": "float32"}))
    assert cfg.train.warmup_ratio == 0.1 and cfg.model.dtype == "float32"


def test_cli_exit_code_2_and_no_traceback(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_tree(data={"max_lenght": 5})))
    r = subprocess.run([sys.executable, "-m", "lmforge", "train", str(path)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "data.max_lenght" in r.stderr and "max_length" in r.stderr
    assert "Traceback" not in r.stderr


def test_unreadable_yaml_names_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name_or_path: [unclosed\n")
    assert main(["train", str(path)]) == 2


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")) + sorted(ROOT.glob("examples/**/*.yaml")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_configs_validate(path):
    load_config(path)


def test_config_reference_doc_is_current():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "config_reference.py"), "--check"])
    assert r.returncode == 0, "docs/config.md is stale: run scripts/config_reference.py"


@pytest.mark.parametrize("key, value, expected", [
    ("adam_beta1", 1.0, "must be in [0, 1)"), ("adam_beta2", -0.1, "must be in [0, 1)"),
    ("adam_beta2", float("nan"), "must be in [0, 1)"), ("adam_epsilon", 0, "must be > 0"),
    ("adam_epsilon", -1e-8, "must be > 0"), ("weight_decay", -0.01, "must be >= 0"),
])
def test_optimizer_numbers_are_checked_at_load(key, value, expected):
    """A bad beta, epsilon or weight decay is a config error naming the key, not a torch traceback at step 1."""
    with pytest.raises(ConfigError) as e:
        load_config(None, tree=_tree(train={key: value}))
    assert f"train.{key}: {expected}" in str(e.value)
    load_config(None, tree=_tree(train={"adam_beta1": 0.0, "adam_beta2": 0.95, "adam_epsilon": 1e-12,
                                        "weight_decay": 0.0}))  # the edges that are allowed


def test_a_bad_adam_beta_exits_2_from_the_cli(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(MIN))
    assert main(["train", str(path), "train.adam_beta2=1"]) == 2
    err = capsys.readouterr().err
    assert "train.adam_beta2: must be in [0, 1)" in err and "Traceback" not in err
