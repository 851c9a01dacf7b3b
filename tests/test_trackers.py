"""train.report_to trackers (tensorboard, wandb offline, mlflow file store, aim) on both engines: each tracker's
own files, read back with its own reader, hold the rows of metrics.jsonl, and a resumed run continues the same
tracker run with steps continuing and none twice. Nothing touches the network."""

import glob
import re
import json
import shutil
import struct
from pathlib import Path

import pytest

from conftest import base_config, chat_rows, write_config, write_jsonl
from lmforge.cli import main
from lmforge.config import load_config
from lmforge.errors import ConfigError

EXACT = ("loss", "eval_loss", "learning_rate", "grad_norm")  # equal in a rerun of a step after a resume (bitwise)


@pytest.fixture(autouse=True)
def no_network(tmp_path, monkeypatch):
    """No API key, no tracking server, nothing written to the real home directory."""
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_PROJECT", "MLFLOW_TRACKING_URI",
                "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))  # no ~/.netrc with a wandb key
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(home / var.lower()))


# ------------------------------------------------------------------------------ each tracker's own reader
def read_tensorboard(out: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar event of output_dir/runs, in the order written (duplicates kept), as metrics.jsonl names."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    series: dict[str, list] = {}
    for path in sorted(glob.glob(str(out / "runs" / "events.out.tfevents.*"))):
        for event in LegacyEventFileLoader(path).Load():
            for v in event.summary.value:
                group, _, key = v.tag.partition("/")
                series.setdefault(("eval_" if group == "eval" else "") + key, []).append((event.step, v.simple_value))
    return series


def _wandb_records(path: str):
    """The records of a .wandb file: W&B's LevelDB-style log (7-byte file header; 32 KiB blocks of chunks, each
    with a crc32, length and type header: full, or first/middle/last of one record) holding protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data, block = Path(path).read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, chunks = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def read_wandb(out: Path, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """The history of the offline run (all its offline-run-* directories, in order), duplicates kept."""
    # wandb names each directory by the second it started, and adds "-1", "-2", ... when two runs of a test start
    # in the same second: order by (second, suffix)
    dirs = glob.glob(str(out / "wandb" / "offline-run-*"))
    names = [re.fullmatch(rf"offline-run-(\d{{8}}_\d{{6}})-{re.escape(run_id)}(?:-(\d+))?", Path(d).name) for d in dirs]
    assert dirs and all(names), dirs  # one run only, ours
    dirs = [d for _, d in sorted(zip([(m[1], int(m[2] or 0)) for m in names], dirs))]
    series: dict[str, list] = {}
    for d in dirs:
        for record in _wandb_records(f"{d}/run-{run_id}.wandb"):
            if record.WhichOneof("record_type") == "run":
                assert record.run.run_id == run_id
            if record.WhichOneof("record_type") != "history":
                continue
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            for k, v in row.items():
                if not k.startswith("_"):
                    series.setdefault(k, []).append((row["_step"], v))
    return series


def read_mlflow(out: Path, run_id: str) -> dict[str, list[tuple[int, float]]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("lmforge")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # one run only
    assert runs[0].data.params["train.logging_steps"] == "1"  # the resolved config as parameters
    assert runs[0].info.status == "FINISHED"
    return {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in runs[0].data.metrics}


def read_aim(out: Path, run_hash: str) -> dict[str, list[tuple[int, float]]]:
    from aim import Repo

    repo = Repo(str(out / "aim"))
    assert repo.list_all_runs() == [run_hash]  # one run only
    run = repo.get_run(run_hash)
    assert run["hparams"]["train"]["logging_steps"] == 1
    series = {}
    for metric in run.metrics():
        steps, columns = metric.data.items_list()  # columns: val, epoch, time
        series[metric.name] = list(zip(steps, columns[0]))
    return series


READERS = {"tensorboard": read_tensorboard, "wandb": read_wandb, "mlflow": read_mlflow, "aim": read_aim}


def tracked(tracker: str, out: Path) -> tuple[str | None, dict[str, list[tuple[int, float]]]]:
    run_id = json.loads((out / "trackers.json").read_text())[tracker]["run_id"]
    reader = READERS[tracker]
    return run_id, reader(out) if tracker == "tensorboard" else reader(out, run_id)


def metrics_by_key(out: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as series, a metric's first value at each step (the hf engine repeats ``epoch`` in the eval
    row and the end-of-training row of a step; a tracker takes a metric once per step)."""
    series: dict[str, dict] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                series.setdefault(k, {}).setdefault(row["step"], float(v))
    return {k: list(v.items()) for k, v in series.items()}


def assert_same(series: dict, expected: dict, keys=None) -> None:
    """The tracker has each metric of metrics.jsonl at the same steps, once each, with the same values."""
    for k in keys or expected:
        got = sorted(series.get(k, []))
        assert [s for s, _ in got] == [s for s, _ in sorted(expected[k])], k  # the same steps, none twice
        assert [v for _, v in got] == pytest.approx([v for _, v in sorted(expected[k])], rel=1e-6), k


# ------------------------------------------------------------------------------ end to end, both engines
@pytest.mark.parametrize("engine", ["native", "hf"])
@pytest.mark.parametrize("tracker", ["aim", "wandb", "mlflow", "tensorboard"])
def test_tracker_gets_metrics_jsonl_and_a_resume_continues_its_run(tmp_path, tiny_model_dir, lmforge_cache,
                                                                   tracker, engine):
    pytest.importorskip({"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "aim": "aim"}[tracker])
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(24))
    val = write_jsonl(tmp_path / "v.jsonl", chat_rows(4, seed=1))
    out = tmp_path / "out"
    tree = base_config(tiny_model_dir, data, out, train={
        "engine": engine, "report_to": [tracker], "eval_steps": 2, "per_device_train_batch_size": 2})
    tree["data"]["eval"] = [{"path": str(val)}]
    cfg = write_config(tmp_path / "c.yaml", tree)
    assert main(["train", str(cfg)]) == 0
    first = metrics_by_key(out)
    assert [s for s, _ in first["loss"]] == [1, 2, 3, 4] and [s for s, _ in first["eval_loss"]] == [2, 4]
    run_id, series = tracked(tracker, out)
    assert_same(series, first)  # every metric: loss, learning_rate, tokens_per_second, mfu, eval_loss, ...
    if tracker == "tensorboard":
        assert "tokens_per_second" in series  # lmforge's rows, on the hf engine too (not transformers' own)

    # interrupted after step 4 was logged but before checkpoint-4 was complete: the rerun resumes from checkpoint-2
    # and logs steps 3 and 4 again to metrics.jsonl (bitwise the same losses); the tracker keeps one of each
    shutil.rmtree(out / "checkpoint-4")
    assert main(["train", str(cfg)]) == 0
    again = metrics_by_key(out)
    assert [s for s, _ in again["loss"]] == [1, 2, 3, 4] and again["loss"] == first["loss"]
    run_id_again, series = tracked(tracker, out)
    assert run_id_again == run_id  # the same tracker run
    assert_same(series, again, keys=EXACT)  # each step once, the values metrics.jsonl has

    # resumed with max_steps raised: steps 5 and 6 continue the same tracker run
    assert main(["train", str(cfg), "train.max_steps=6"]) == 0
    after = metrics_by_key(out)
    assert [s for s, _ in after["loss"]] == [1, 2, 3, 4, 5, 6]
    run_id_after, series = tracked(tracker, out)
    assert run_id_after == run_id
    assert_same(series, after, keys=EXACT)
    assert_same({k: [p for p in v if p[0] > 4] for k, v in series.items()},
                {k: [p for p in v if p[0] > 4] for k, v in after.items()})  # every metric of steps 5 and 6


# ------------------------------------------------------------------------------ names and errors
def _tree(tmp_path, **train):
    return {"method": "sft", "model": {"name_or_path": "x"}, "data": {"train": [{"path": "d.jsonl"}]},
            "train": {"output_dir": str(tmp_path / "out"), **train}}


def test_all_four_trackers_load():
    cfg = load_config(None, tree={"method": "sft", "model": {"name_or_path": "x"}, "data": {"train": [{"path": "d"}]},
                                  "train": {"report_to": ["tensorboard", "wandb", "mlflow", "aim"], "aim_repo": "r"}})
    assert cfg.train.report_to == ["tensorboard", "wandb", "mlflow", "aim"] and cfg.train.aim_repo == "r"


def test_unknown_tracker_is_refused_with_a_suggestion(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, tree=_tree(tmp_path, report_to=["aimm"]))
    assert "train.report_to" in str(e.value) and "did you mean 'aim'" in str(e.value)


def test_aim_repo_without_aim_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="train.aim_repo: set, but train.report_to has no aim"):
        load_config(None, tree=_tree(tmp_path, report_to=["wandb"], aim_repo="somewhere"))


def test_a_missing_tracker_package_names_pip_install(tmp_path, monkeypatch):
    import importlib.util

    from lmforge.training import tracking

    real = importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "aim" else real(name))
    with pytest.raises(ConfigError, match="pip install aim"):
        tracking.Trackers(tmp_path, ["tensorboard", "aim"])
    assert not (tmp_path / "runs").exists()  # checked before any tracker opened


def test_transformers_reports_only_to_trackers_lmforge_does_not_write():
    from lmforge.training.tracking import hf_report_to, lmforge_trackers

    assert hf_report_to(["tensorboard", "wandb", "mlflow", "aim"]) == "none"
    assert hf_report_to(["wandb", "comet_ml"]) == ["comet_ml"]
    assert lmforge_trackers(["wandb", "comet_ml", "wandb", "none"]) == ["wandb"]
    assert not {"tensorboard", "wandb", "mlflow", "aim"} & set(hf_report_to(["all"]))


def test_aim_repo_setting_is_used(tmp_path, monkeypatch):
    pytest.importorskip("aim")
    import yaml

    from lmforge.training.tracking import Trackers

    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"train": {"aim_repo": str(tmp_path / "elsewhere")}}))
    trackers = Trackers(tmp_path, ["aim"])
    trackers.log({"step": 1, "loss": 2.5, "note": "text is not a metric"})
    trackers.close()
    from aim import Repo

    run_hash = json.loads((tmp_path / "trackers.json").read_text())["aim"]["run_id"]
    metrics = {m.name: m.data.items_list() for m in Repo(str(tmp_path / "elsewhere")).get_run(run_hash).metrics()}
    assert list(metrics) == ["loss"] and metrics["loss"][0] == [1] and metrics["loss"][1][0] == [2.5]
    assert not (tmp_path / "aim").exists()


def test_wandb_is_offline_unless_an_api_key_is_set_up(tmp_path, monkeypatch):
    from lmforge.training.tracking import _wandb_api_key

    assert not _wandb_api_key()  # the fixture's empty home, no WANDB_API_KEY: offline
    netrc = tmp_path / "home" / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    netrc.chmod(0o600)
    assert _wandb_api_key()  # `wandb login` wrote ~/.netrc
    netrc.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    assert _wandb_api_key()
