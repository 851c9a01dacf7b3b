"""What the native engine writes and shows while it trains: the logging window, metrics.jsonl and plots, the
``train.profile`` trace and the progress bar; and the ``report_to`` trackers of both engines (``Trackers``:
tensorboard, wandb, mlflow, aim), which the HF engine's ``callbacks.OutputsCallback`` feeds the same rows of
metrics.jsonl. Both engines share ``outputs.refresh_plot`` and ``outputs.progress_postfix``."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

from lmforge.config import Config
from lmforge.errors import ConfigError
from lmforge.log import log
from lmforge.training.outputs import PLOT_EVERY_SECONDS, read_metrics, refresh_plot
from lmforge.registry import LMFORGE_TRACKERS


class Window:
    """Loss, metrics and tokens/s over the steps since the last log (loss and metrics averaged per step, as
    the HF engine)."""

    def __init__(self, keys: tuple[str, ...] = ()):
        self.keys = ("loss",) + tuple(keys)
        self.values: dict[str, list[float]] = {k: [] for k in self.keys}
        self.tokens, self.seconds = 0, 0.0

    def add(self, loss: float, tokens: int, seconds: float, stats: dict[str, float] | None = None) -> None:
        for k, v in {"loss": loss, **(stats or {})}.items():
            self.values[k].append(v)
        self.tokens += tokens
        self.seconds += seconds

    def take(self) -> dict:
        out = {k: sum(v) / len(v) if v else None for k, v in self.values.items()}
        out.update(tokens=self.tokens, seconds=self.seconds)
        self.values = {k: [] for k in self.keys}
        self.tokens, self.seconds = 0, 0.0
        return out


STATE_FILE = "trackers.json"  # in output_dir: each tracker's run id and the last step it got of each metric
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "aim": "aim"}


class Tracker:
    """What the native engine writes of each logged row, on rank 0 only: metrics.jsonl, plots/loss.png and the
    ``report_to`` trackers (``Trackers``, which the HF engine's ``OutputsCallback`` feeds the same way)."""

    def __init__(self, out: Path, report_to: list[str]):
        self.out, self.every, self.last_plot = out, PLOT_EVERY_SECONDS, 0.0
        self.trackers = Trackers(out, report_to)

    def write(self, row: dict, plot: bool = False) -> None:
        with open(self.out / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        self.trackers.log(row)
        if plot or time.monotonic() - self.last_plot > self.every:
            self.plot()

    def plot(self) -> None:
        self.last_plot = time.monotonic()
        refresh_plot(self.out)

    def close(self) -> None:
        self.plot()
        self.trackers.close()


def lmforge_trackers(report_to: list[str]) -> list[str]:
    """The trackers of ``report_to`` that lmforge writes itself (``all``: those installed)."""
    if "all" in report_to:
        return [n for n in LMFORGE_TRACKERS if importlib.util.find_spec(_PACKAGES[n]) is not None]
    return list(dict.fromkeys(n for n in report_to if n in LMFORGE_TRACKERS))


def hf_report_to(report_to: list[str]) -> list[str] | str:
    """``TrainingArguments.report_to``: only the trackers lmforge does not write itself, so none gets a row twice
    (under transformers' names beside lmforge's)."""
    if "all" in report_to:
        from transformers.integrations import get_available_reporting_integrations

        names = [n for n in get_available_reporting_integrations() if n not in LMFORGE_TRACKERS]
    else:
        names = [n for n in report_to if n not in LMFORGE_TRACKERS + ("none",)]
    return names or "none"


class Trackers:
    """The ``train.report_to`` trackers lmforge writes itself (tensorboard, wandb, mlflow, aim), for both engines,
    on rank 0 only: each gets every row of metrics.jsonl as it is written, under the same names, at its step.

    A resumed run continues the same tracker runs (one curve per metric): output_dir/trackers.json keeps each
    tracker's run (wandb run id, mlflow run id, aim run hash) and the last step it got of each metric. Rows a
    resumed run logs again (those between its checkpoint and an interruption) are not sent twice: the tracker
    keeps the values it got first, which the rerun reproduces bitwise unless the config changed. (Offline wandb
    and MLflow cannot replace a logged point, and MLflow would keep both.)"""

    def __init__(self, out: Path, report_to: list[str]):
        self.out = out
        self.backends: dict = {}
        names = lmforge_trackers(report_to)
        if not names:
            return
        missing = [_PACKAGES[n] for n in names if importlib.util.find_spec(_PACKAGES[n]) is None]
        if missing:
            raise ConfigError(f"train.report_to: {', '.join(missing)} is not installed: pip install {' '.join(missing)} "
                              "(or pip install 'lmforge[trackers]')")
        config = _run_config(out)
        # a run continues its trackers' runs exactly when it continues metrics.jsonl: open_output_dir keeps it
        # on resume (cut at the checkpoint's step) and removes it for a fresh run
        earlier = _read_state(out) if read_metrics(out / "metrics.jsonl") else {}
        self.state: dict[str, dict] = {}
        for name in names:
            run_id = earlier.get(name, {}).get("run_id")
            try:
                backend = _BACKENDS[name](out, run_id, config)
            except Exception as e:
                if run_id is None:
                    raise
                log(f"train.report_to: could not continue the {name} run {run_id} ({type(e).__name__}: {e}); "
                    "starting a new one")
                backend = _BACKENDS[name](out, None, config)
            self.backends[name] = backend
            same = backend.run_id == run_id and name in earlier
            self.state[name] = {"run_id": backend.run_id, "last": earlier[name].get("last", {}) if same else {}}
        self._save()

    def log(self, row: dict) -> None:
        step = row.get("step")
        if not self.backends or not isinstance(step, int):
            return
        values = {k: float(v) for k, v in row.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for name, backend in list(self.backends.items()):
            last = self.state[name]["last"]
            new = {k: v for k, v in values.items() if step > last.get(k, -1)}  # not a step it already has
            if not new:
                continue
            try:
                backend.log(step, new)
            except Exception as e:  # a tracker must never kill a training run; metrics.jsonl keeps every row
                log(f"train.report_to: {name} failed ({type(e).__name__}: {e}); it gets no more metrics in this run")
                del self.backends[name]
                continue
            last.update(dict.fromkeys(new, step))
        self._save()

    def close(self) -> None:
        for name, backend in self.backends.items():
            try:
                backend.close()
            except Exception as e:
                log(f"train.report_to: closing {name} failed ({type(e).__name__}: {e})")
        self.backends = {}

    def _save(self) -> None:
        tmp = self.out / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        tmp.replace(self.out / STATE_FILE)


def _read_state(out: Path) -> dict:
    try:
        return json.loads((out / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _run_config(out: Path) -> dict:
    """The run's resolved config (config.yaml, written before training starts): the parameters the trackers record
    with a new run, its train.run_name and train.aim_repo."""
    import yaml

    path = out / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


def _run_name(out: Path, config: dict) -> str:
    return (config.get("train") or {}).get("run_name") or out.resolve().name


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


class _TensorBoard:
    """output_dir/runs: train/KEY and eval/KEY (``eval_`` dropped), the names transformers' integration uses."""

    def __init__(self, out: Path, run_id: str | None, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.run_id = None  # one event directory; a resumed run appends a new event file to it
        self.writer = SummaryWriter(str(out / "runs"))

    def log(self, step: int, values: dict[str, float]) -> None:
        prefix = "eval/" if any(k.startswith("eval_") for k in values) else "train/"
        for k, v in values.items():
            self.writer.add_scalar(prefix + k.removeprefix("eval_"), v, step)

    def close(self) -> None:
        self.writer.close()


def _wandb_api_key() -> bool:
    """An API key from WANDB_API_KEY or ``wandb login`` (~/.netrc)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return bool(netrc.netrc().authenticators(host))
    except (OSError, netrc.NetrcParseError):
        return False


class _Wandb:
    """A wandb run in output_dir/wandb; offline (``wandb sync`` uploads it later) unless WANDB_MODE says otherwise
    or an API key is set up. A resumed run reopens the same run id (offline: a new offline-run-* directory of
    the same run, which ``wandb sync`` appends)."""

    def __init__(self, out: Path, run_id: str | None, config: dict):
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_api_key() else "offline")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "lmforge", name=_run_name(out, config), dir=str(out),
            id=run_id, resume="allow",
            config=None if run_id else config, mode=mode, reinit="create_new",
            settings=wandb.Settings(console="off", quiet=True))
        self.run_id = self.run.id
        if mode == "offline":
            log(f"wandb: offline run {self.run_id} in {out / 'wandb'}; upload it with `wandb sync "
                f"{out / 'wandb'}/offline-run-*-{self.run_id}*`")

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class _Mlflow:
    """An MLflow run in MLFLOW_TRACKING_URI, or a file store in output_dir/mlruns; experiment
    MLFLOW_EXPERIMENT_NAME or lmforge; the resolved config as its parameters."""

    def __init__(self, out: Path, run_id: str | None, config: dict):
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (out / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):  # MLflow 3 refuses its file store (in maintenance, not removed) unless told
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "lmforge"
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            run_id = self.client.create_run(experiment_id, run_name=_run_name(out, config)).info.run_id
            params = [Param(k, str(v)[:6000]) for k, v in _flatten(config).items()]  # MLflow's length limit
            for i in range(0, len(params), 100):  # at most 100 parameters per batch
                self.client.log_batch(run_id, params=params[i:i + 100])
        self.run_id = run_id

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class _Aim:
    """An Aim run in train.aim_repo (default output_dir/aim), the resolved config as its hparams."""

    def __init__(self, out: Path, run_id: str | None, config: dict):
        from aim import Run

        repo = (config.get("train") or {}).get("aim_repo") or str(out / "aim")
        quiet = dict(system_tracking_interval=None, capture_terminal_logs=False, log_system_params=False)
        if run_id:
            self.run = Run(run_hash=run_id, repo=repo, **quiet)
        else:
            self.run = Run(repo=repo, experiment=os.environ.get("AIM_EXPERIMENT") or "lmforge", **quiet)
            self.run.name = _run_name(out, config)
            self.run["hparams"] = config
        self.run_id = self.run.hash

    def log(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.run.track(v, name=k, step=step)

    def close(self) -> None:
        from aim.sdk.index_manager import RepoIndexManager

        repo, run_hash = self.run.repo, self.run.hash
        self.run.close()
        # Aim 3.29 indexes finished runs when `aim up` starts; indexing here lets aim.Repo(...).get_run(hash)
        # and queries see the run at once
        RepoIndexManager.get_index_manager(repo).index(run_hash)


_BACKENDS = {"tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _Mlflow, "aim": _Aim}


class Profiler:
    """``train.profile: {start_step, steps}``: a torch.profiler trace of those steps in output_dir/profiler."""

    def __init__(self, cfg: Config, out: Path):
        p = cfg.train.profile
        self.first, self.last = (p.start_step, p.start_step + p.steps - 1) if p else (0, -1)
        self.dir, self.prof = out / "profiler", None

    def before_step(self, step: int) -> None:
        if step == self.first:
            from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler

            self.prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True,
                                on_trace_ready=tensorboard_trace_handler(str(self.dir)))
            self.prof.__enter__()

    def after_step(self, step: int) -> None:
        if self.prof is not None and step == self.last:
            self.prof.__exit__(None, None, None)
            log(f"profile of steps {self.first}-{self.last} written to {self.dir}")
            self.prof = None


def progress_bar(total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)
