"""SageMaker training jobs: `lmforge launch sagemaker` outside, `lmforge launch sagemaker-entry` inside.

Outside (the user's machine), ``build_request`` turns a config into one boto3 ``create_training_job``
request (boto3 rather than the ``sagemaker`` SDK: one call, no extra dependency tree):
  * the resolved config is uploaded to ``s3://<bucket>/<prefix>/<job>/config.yaml`` and reaches the
    container as the ``lmforge_config`` input channel;
  * every ``s3://`` data source becomes an input channel (File or FastFile mode); the hyperparameter
    ``lmforge_channels`` maps each config key to its channel and the path inside it;
  * ``train.output_dir`` must be ``s3://``, and stays so inside the job: lmforge's own S3 output (cloud.py)
    uploads each checkpoint (every instance its processes' part) and the final model with its marker written
    last, and a restarted (spot) job resumes from the newest complete one, each instance downloading it.
    SageMaker's CheckpointConfig is deliberately not used: its sync of /opt/ml/checkpoints copies files as
    they appear, with no marker, so a job killed mid-upload would restore a partial checkpoint, and lmforge
    outside the job would not take its uploads for complete.

Inside (the container), ``plan_entry`` reads SageMaker's environment (``SM_HOSTS``, ``SM_CURRENT_HOST``,
``SM_NUM_GPUS``, ``SM_CHANNEL_<NAME>``, or /opt/ml/input/config/resourceconfig.json and
hyperparameters.json where the SM_* variables are absent, as they are without the sagemaker-training
toolkit), rewrites the config to read the channels, and builds the torchrun multi-node command that
``lmforge train`` itself uses (distributed/launch.py).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from lmforge.config import Config, load_config
from lmforge.errors import ConfigError, LmforgeError

# The container runs this; the image needs lmforge (same version as the launcher) and torch installed.
ENTRY_POINT = ["python3", "-m", "lmforge", "launch", "sagemaker-entry"]
CONFIG_CHANNEL = "lmforge_config"
CONFIG_FILE = "config.yaml"
IMAGE_ENV = "LMFORGE_SAGEMAKER_IMAGE"  # the default --image-uri
DEFAULT_PREFIX = "lmforge-jobs"  # key prefix for job files when --s3-prefix is not given
MAX_CHANNELS = 20  # SageMaker's limit on input channels per job
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")  # as data/sources.py reads
TERMINAL = ("Completed", "Failed", "Stopped")
_GLOB = re.compile(r"[*?\[]")
_JOB_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")


class JobFailed(LmforgeError):
    """The SageMaker job ended Failed or Stopped."""

    exit_code = 1


# --------------------------------------------------------------------------------------------- outside
@dataclass
class JobSpec:
    """What `lmforge launch sagemaker` was asked for (the CLI flags)."""

    config: str
    role: str
    image_uri: str | None = None
    overrides: list[str] = field(default_factory=list)
    instance_type: str = "ml.g5.2xlarge"
    instance_count: int = 1
    volume_size: int = 100
    max_run: int = 86400
    job_name: str | None = None
    s3_prefix: str | None = None
    input_mode: str = "File"
    spot: bool = False
    max_wait: int | None = None
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Channel:
    """One S3 input channel and the config keys it feeds (``relative``: the path inside the channel)."""

    name: str
    s3_uri: str
    keys: dict[str, str] = field(default_factory=dict)  # dotted config key -> path inside the channel


def split_s3(url: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key)."""
    bucket, _, key = url[len("s3://"):].partition("/")
    return bucket, key


def _is_url(path: str) -> bool:
    return "://" in path


def _source_location(path: str) -> tuple[str, str]:
    """An ``s3://`` data source -> (S3Prefix URI of its channel, its path inside the channel).

    A file (a data suffix) is its own prefix and lands as ``<channel>/<name>``; a glob's channel is the folder
    above its first wildcard; anything else is a folder (files, or a save_to_disk dataset) and gets a trailing
    slash, so that ``s3://b/train`` does not also pull in ``s3://b/train-old/...``.
    """
    bucket, key = split_s3(path)
    parts = key.split("/")
    wild = next((i for i, p in enumerate(parts) if _GLOB.search(p)), None)
    if wild is not None:
        base = "/".join(parts[:wild])
        return f"s3://{bucket}/{base}/" if base else f"s3://{bucket}/", "/".join(parts[wild:])
    if key.endswith(DATA_SUFFIXES):
        return path, parts[-1]
    return f"s3://{bucket}/{key.rstrip('/')}/", ""


def plan_channels(cfg: Config, where: str) -> list[Channel]:
    """The input channels for the config's ``s3://`` data sources; one channel per distinct S3 location."""
    by_uri: dict[str, Channel] = {}
    for role in ("train", "eval"):
        for i, src in enumerate(getattr(cfg.data, role)):
            if src.path is None:  # a custom loader: runs inside the container as written
                continue
            key = f"data.{role}.{i}.path"
            if src.path.startswith("s3://"):
                uri, relative = _source_location(src.path)
                ch = by_uri.setdefault(uri, Channel(f"{role}_{i}", uri))
                ch.keys[key] = relative
            elif not _is_url(src.path) and not Path(src.path).is_absolute():
                raise ConfigError(f"{where}: data.{role}[{i}].path: {src.path} is on this machine, which the SageMaker "
                                  "job cannot read: upload it (aws s3 cp --recursive) and give its s3:// URL")
    if len(by_uri) > MAX_CHANNELS:
        raise ConfigError(f"{where}: data: {len(by_uri)} distinct S3 locations, but a SageMaker job takes at most "
                          f"{MAX_CHANNELS - 1} data channels; put the sources under fewer S3 folders")
    return list(by_uri.values())


def check_config(cfg: Config, where: str, instance_count: int) -> None:
    """Refuse what cannot work on SageMaker, before anything is uploaded or submitted."""
    out = cfg.train.output_dir
    if not out.startswith("s3://") or not split_s3(out)[0]:
        raise ConfigError(
            f"{where}: train.output_dir: {out} is not an s3:// URL. A SageMaker job's disks are deleted when it "
            "ends, so its checkpoints and final model must go to S3 (uploaded as each completes; a restarted spot "
            "job resumes from there): set train.output_dir=s3://BUCKET/runs/NAME")
    if cfg.train.resume not in ("auto", "never"):
        raise ConfigError(f"{where}: train.resume: {cfg.train.resume}: with an s3:// output_dir, auto or never "
                          "(auto resumes from the newest complete checkpoint in the bucket)")
    for key in ("name_or_path", "tokenizer"):
        value = getattr(cfg.model, key)
        if value and not _is_url(value) and not Path(value).is_absolute() and Path(value).exists():
            raise ConfigError(f"{where}: model.{key}: {value} is on this machine, which the SageMaker job cannot "
                              "read: upload it to S3 and give its s3:// URL")
    if instance_count > 1 and cfg.train.distributed == "none":
        raise ConfigError(f"{where}: train.distributed: set ddp, fsdp or deepspeed to train on {instance_count} "
                          "instances")
    # ddp, fsdp and deepspeed all span instances: each instance keeps a mirror of output_dir, uploads the part of
    # every checkpoint its processes wrote, and the marker is written once all parts are in S3 (cloud.py)


def default_job_name(cfg: Config, now: _dt.datetime | None = None) -> str:
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return f"lmforge-{cfg.method}-{now:%Y%m%d-%H%M%S}"


def job_prefix(spec: JobSpec, cfg: Config) -> tuple[str, str]:
    """(bucket, key prefix) under which the job's files go: --s3-prefix, else the output_dir's bucket."""
    if spec.s3_prefix:
        if not spec.s3_prefix.startswith("s3://") or not split_s3(spec.s3_prefix)[0]:
            raise ConfigError(f"--s3-prefix: expected s3://BUCKET[/PREFIX], got {spec.s3_prefix}")
        bucket, prefix = split_s3(spec.s3_prefix)
        return bucket, prefix.strip("/")
    return split_s3(cfg.train.output_dir)[0], DEFAULT_PREFIX


def build_request(spec: JobSpec, cfg: Config) -> tuple[dict, str]:
    """The ``create_training_job`` request and the s3:// URI the config goes to. Raises ConfigError."""
    where = spec.config
    check_config(cfg, where, spec.instance_count)
    image = spec.image_uri or os.environ.get(IMAGE_ENV)
    if not image:
        raise ConfigError(f"--image-uri: required (or set {IMAGE_ENV}): a training image with lmforge installed, e.g. "
                          "an AWS PyTorch training image plus `pip install lmforge[cloud]`, pushed to ECR "
                          "(docs/distributed.md, SageMaker)")
    name = spec.job_name or default_job_name(cfg)
    if not _JOB_NAME.match(name):
        raise ConfigError(f"--job-name: {name!r}: 1-63 letters, digits and hyphens, starting with a letter or digit")
    if spec.input_mode not in ("File", "FastFile"):
        raise ConfigError(f"--input-mode: File or FastFile, got {spec.input_mode!r} (lmforge reads files, not pipes)")
    if spec.instance_count < 1 or spec.volume_size < 1 or spec.max_run < 1:
        raise ConfigError("--instance-count, --volume-size and --max-run must be >= 1")
    bucket, prefix = job_prefix(spec, cfg)
    base = f"s3://{bucket}/{prefix}/" if prefix else f"s3://{bucket}/"
    config_uri = f"{base}{name}/{CONFIG_FILE}"
    channels = plan_channels(cfg, where)

    def s3_channel(channel_name: str, uri: str, mode: str) -> dict:
        return {"ChannelName": channel_name, "InputMode": mode,
                "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": uri,
                                                "S3DataDistributionType": "FullyReplicated"}}}

    request = {
        "TrainingJobName": name,
        "RoleArn": spec.role,
        "AlgorithmSpecification": {"TrainingImage": image, "TrainingInputMode": spec.input_mode,
                                   "ContainerEntrypoint": list(ENTRY_POINT)},
        # what the entry point runs: the config in its channel, the data keys to point at channels, where to write
        "HyperParameters": {
            "lmforge_config": CONFIG_FILE,
            "lmforge_channels": json.dumps({c.name: c.keys for c in channels}, sort_keys=True),
        },
        "InputDataConfig": [s3_channel(CONFIG_CHANNEL, config_uri, "File")]
                           + [s3_channel(c.name, c.s3_uri, spec.input_mode) for c in channels],
        "OutputDataConfig": {"S3OutputPath": base},
        "ResourceConfig": {"InstanceType": spec.instance_type, "InstanceCount": spec.instance_count,
                           "VolumeSizeInGB": spec.volume_size},
        "StoppingCondition": {"MaxRuntimeInSeconds": spec.max_run},
        "Environment": {"PYTHONUNBUFFERED": "1", **spec.env},
    }
    if len(request["HyperParameters"]["lmforge_channels"]) > 2500:
        raise ConfigError(f"{where}: data: too many sources for one SageMaker job (the channel map exceeds the "
                          "2500-character limit of a hyperparameter); put the sources under fewer S3 folders")
    if spec.spot:
        if cfg.train.resume == "never":
            raise ConfigError(f"{where}: train.resume: never with --spot: each spot interruption would start the "
                              "run over; use resume: auto (the default)")
        max_wait = spec.max_wait or 2 * spec.max_run
        if max_wait < spec.max_run:
            raise ConfigError(f"--max-wait ({max_wait} s) must be >= --max-run ({spec.max_run} s)")
        request["EnableManagedSpotTraining"] = True
        request["StoppingCondition"]["MaxWaitTimeInSeconds"] = max_wait
    elif spec.max_wait is not None:
        raise ConfigError("--max-wait: only means something with --spot (time to wait for spot capacity)")
    return request, config_uri


def config_text(cfg: Config) -> str:
    """The resolved config as uploaded (what the job trains on; its data and output paths rewritten inside)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def _aws_call(what: str, fn: Callable, **kwargs):
    """Run one boto3 call; AWS's errors become one clear message (credentials, region, access, validation)."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return fn(**kwargs)
    except ClientError as e:
        err = e.response.get("Error", {})
        raise LmforgeError(f"{what}: {err.get('Code', 'error')}: {err.get('Message', e)}") from None
    except BotoCoreError as e:  # no credentials, no region, endpoint unreachable
        raise LmforgeError(f"{what}: {e}") from None


def _boto3():
    try:
        import boto3
    except ImportError:
        raise LmforgeError("lmforge launch sagemaker needs boto3: pip install 'lmforge[cloud]'") from None
    return boto3


def submit(request: dict, config_uri: str, text: str, region: str | None = None) -> str:
    """Upload the config, then create the training job; returns the job's ARN."""
    boto3 = _boto3()
    bucket, key = split_s3(config_uri)
    s3 = boto3.client("s3", region_name=region)
    _aws_call(f"uploading the config to {config_uri}", s3.put_object, Bucket=bucket, Key=key, Body=text.encode())
    sm = boto3.client("sagemaker", region_name=region)
    out = _aws_call(f"creating training job {request['TrainingJobName']}", sm.create_training_job, **request)
    return out["TrainingJobArn"]


def wait(name: str, region: str | None = None, poll_seconds: float = 30.0, timeout: float | None = None,
         say: Callable[[str], None] = print) -> dict:
    """Poll ``describe_training_job`` until a terminal status, saying each status change; returns the last
    description. Raises JobFailed (exit 1) on Failed/Stopped, with SageMaker's FailureReason."""
    sm = _boto3().client("sagemaker", region_name=region)
    seen: set[tuple] = set()
    last = None
    start = time.monotonic()
    while True:
        job = _aws_call(f"describing training job {name}", sm.describe_training_job, TrainingJobName=name)
        for t in job.get("SecondaryStatusTransitions", []):
            mark = (t.get("Status"), str(t.get("StartTime")))
            if mark not in seen:
                seen.add(mark)
                say(f"[lmforge] {name}: {t.get('Status')}: {t.get('StatusMessage', '')}".rstrip(": "))
        status = (job["TrainingJobStatus"], job.get("SecondaryStatus"))
        if status != last:
            last = status
            say(f"[lmforge] {name}: {status[0]} ({status[1]})")
        if status[0] in TERMINAL:
            break
        if timeout is not None and time.monotonic() - start > timeout:
            raise LmforgeError(f"{name}: still {status[0]} after {timeout:.0f} s; the job keeps running "
                               f"(aws sagemaker describe-training-job --training-job-name {name})")
        time.sleep(poll_seconds)
    if job["TrainingJobStatus"] != "Completed":
        reason = job.get("FailureReason") or "no failure reason given"
        raise JobFailed(f"training job {name} {job['TrainingJobStatus']}: {reason}")
    return job


# --------------------------------------------------------------------------------------------- inside
@dataclass
class SageMakerEnv:
    """What the container knows about the job: hosts, this host, GPUs, where channels and config live."""

    hosts: list[str]
    current_host: str
    num_gpus: int
    hyperparameters: dict[str, str]
    channel_dirs: dict[str, Path]
    network_interface: str | None = None

    @classmethod
    def from_environ(cls, environ: dict[str, str]) -> "SageMakerEnv":
        input_dir = Path(environ.get("SM_INPUT_DIR", "/opt/ml/input"))
        config_dir = Path(environ.get("SM_INPUT_CONFIG_DIR", input_dir / "config"))
        resource = _read_json(config_dir / "resourceconfig.json")
        hosts = json.loads(environ["SM_HOSTS"]) if "SM_HOSTS" in environ else resource.get("hosts")
        current = environ.get("SM_CURRENT_HOST") or resource.get("current_host")
        if not hosts or not current:
            raise ConfigError(f"not inside a SageMaker training job: no SM_HOSTS/SM_CURRENT_HOST and no "
                              f"{config_dir / 'resourceconfig.json'}")
        if current not in hosts:
            raise ConfigError(f"SM_CURRENT_HOST {current!r} is not one of SM_HOSTS {hosts}")
        # SageMaker writes hyperparameters.json (values are strings); the toolkit's SM_HPS has them JSON-decoded
        hps = _read_json(config_dir / "hyperparameters.json") or json.loads(environ.get("SM_HPS", "{}"))
        names = set(_channel_map(hps)) | {CONFIG_CHANNEL}
        # SM_CHANNEL_<NAME> where the sagemaker-training toolkit set it; else SageMaker's fixed layout
        channel_dirs = {n: Path(environ.get(f"SM_CHANNEL_{n.upper()}", input_dir / "data" / n)) for n in names}
        return cls(hosts=list(hosts), current_host=current, num_gpus=_num_gpus(environ), hyperparameters=hps,
                   channel_dirs=channel_dirs, network_interface=resource.get("network_interface_name"))


def _channel_map(hps: dict) -> dict[str, dict[str, str]]:
    value = hps.get("lmforge_channels", "{}")
    return json.loads(value) if isinstance(value, str) else value


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


def _num_gpus(environ: dict[str, str]) -> int:
    if "SM_NUM_GPUS" in environ:
        return int(environ["SM_NUM_GPUS"])
    import torch

    return torch.cuda.device_count()


def launch_args(env: SageMakerEnv, config_path: str, debug: bool = False) -> argparse.Namespace:
    """The ``lmforge train`` launch flags for this host (what distributed/launch.py turns into torchrun)."""
    return argparse.Namespace(
        config=config_path, overrides=[], debug=debug,
        nproc_per_node=max(env.num_gpus, 1),  # a CPU instance runs one process
        nnodes=len(env.hosts), node_rank=env.hosts.index(env.current_host),
        master_addr=env.hosts[0], master_port=None,  # torchrun: --standalone on one host, 29500 on several
    )


def _set_key(tree: dict, dotted: str, value: str) -> None:
    """Set ``data.train.0.path``-style keys (list indices as numbers) in a config tree."""
    *parents, last = dotted.split(".")
    node = tree
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    node[int(last) if isinstance(node, list) else last] = value


def _channel_path(channel_dir: Path, relative: str) -> str:
    if not relative:
        return str(channel_dir)
    path = channel_dir / relative
    if not path.exists() and not _GLOB.search(relative):
        # a single S3 object may land under another relative path; it is the one file of that name there
        found = sorted(channel_dir.rglob(Path(relative).name))
        if len(found) == 1:
            return str(found[0])
    return str(path)


def rewrite_config(tree: dict, env: SageMakerEnv) -> dict:
    """The uploaded config with each s3 data source read from its channel (output_dir stays in S3)."""
    for channel, keys in _channel_map(env.hyperparameters).items():
        for dotted, relative in keys.items():
            _set_key(tree, dotted, _channel_path(env.channel_dirs[channel], relative))
    return tree


@dataclass
class EntryPlan:
    """What this host runs: the rewritten config, its ``lmforge train`` launch flags, environment to add."""

    cfg: Config
    args: argparse.Namespace
    env: dict[str, str]


def plan_entry(environ: dict[str, str], work_dir: Path, debug: bool = False) -> EntryPlan:
    """Inside the job: write the rewritten config to ``work_dir``; return it with this host's launch flags."""
    env = SageMakerEnv.from_environ(environ)
    source = env.channel_dirs[CONFIG_CHANNEL] / env.hyperparameters.get("lmforge_config", CONFIG_FILE)
    try:
        tree = yaml.safe_load(source.read_text())
    except OSError as e:
        raise ConfigError(f"{source}: cannot read the job's config ({e.strerror})") from None
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / CONFIG_FILE
    path.write_text(yaml.safe_dump(rewrite_config(tree, env), sort_keys=False))
    extra = {}
    if env.network_interface:  # the interface between the job's hosts, for NCCL's and gloo's connections
        extra = {k: env.network_interface for k in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME") if k not in environ}
    return EntryPlan(load_config(path), launch_args(env, str(path), debug), extra)


def write_failure(message: str, environ: dict[str, str]) -> None:
    """SageMaker shows /opt/ml/output/failure as the job's FailureReason (first 1024 characters)."""
    out = Path(environ.get("SM_OUTPUT_DIR", "/opt/ml/output"))
    if out.is_dir():
        (out / "failure").write_text(message[:1024])
