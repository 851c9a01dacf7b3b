"""`lmforge launch sagemaker` against moto's S3 + SageMaker server on 127.0.0.1, and the container entry point
given the SM_* environment of a 2-host job."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest
import yaml

from conftest import base_config, write_config, write_jsonl
from lmforge.cli import main
from lmforge.config import load_config
from lmforge.distributed import launch, sagemaker

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.moto_server.threaded_moto_server")

ROLE = "arn:aws:iam::123456789012:role/lmforge-training"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/lmforge:0.1.0"
BUCKET = "lmforge-test"
SOURCES = {  # each kind of s3 data source and the channel it becomes
    "file": f"s3://{BUCKET}/data/train.jsonl",
    "folder": f"s3://{BUCKET}/data/more",
    "glob": f"s3://{BUCKET}/data/shards/*.jsonl",
}


@pytest.fixture()
def aws(monkeypatch):
    """moto's server on a free loopback port, and the AWS environment that points boto3 at it."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    # moto's backends are process-wide: start from empty S3 and SageMaker (jobs of earlier tests would show)
    urllib.request.urlopen(urllib.request.Request(f"http://{host}:{port}/moto-api/reset", method="POST")).close()
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", sagemaker.IMAGE_ENV):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield boto3
    server.stop()


@pytest.fixture()
def config(tmp_path, tiny_model_dir):
    tree = base_config(tiny_model_dir, SOURCES["file"], f"s3://{BUCKET}/runs/sm", train={"distributed": "ddp"})
    tree["data"]["train"] = [{"path": SOURCES["file"], "weight": 2.0}, {"path": SOURCES["glob"]}]
    tree["data"]["eval"] = [{"path": SOURCES["folder"]}]
    return write_config(tmp_path / "sm.yaml", tree)


def _argv(config, *extra, overrides=()):
    return ["launch", "sagemaker", str(config), *overrides, "--role", ROLE, "--image-uri", IMAGE, "--instance-type",
            "ml.g5.12xlarge", "--instance-count", "2", "--job-name", "lmforge-test-job", *extra]


def _channels(request) -> dict[str, dict]:
    return {c["ChannelName"]: c for c in request["InputDataConfig"]}


def test_dry_run_prints_the_request_and_submits_nothing(aws, config, capsys):
    assert main(_argv(config, "--dry-run", "--input-mode", "FastFile", "--max-run", "3600")) == 0
    request = json.loads(capsys.readouterr().out)
    assert request["ResourceConfig"] == {"InstanceType": "ml.g5.12xlarge", "InstanceCount": 2, "VolumeSizeInGB": 100}
    assert request["AlgorithmSpecification"]["TrainingImage"] == IMAGE
    assert request["AlgorithmSpecification"]["ContainerEntrypoint"] == sagemaker.ENTRY_POINT
    assert request["RoleArn"] == ROLE
    assert request["StoppingCondition"] == {"MaxRuntimeInSeconds": 3600}
    uris = {name: c["DataSource"]["S3DataSource"]["S3Uri"] for name, c in _channels(request).items()}
    assert uris == {
        "lmforge_config": f"s3://{BUCKET}/lmforge-jobs/lmforge-test-job/config.yaml",
        "train_0": SOURCES["file"],  # a file is its own prefix
        "train_1": f"s3://{BUCKET}/data/shards/",  # a glob: the folder above the wildcard
        "eval_0": f"s3://{BUCKET}/data/more/",  # a folder: trailing slash, so data/more-old/ is not pulled in
    }
    modes = {name: c["InputMode"] for name, c in _channels(request).items()}
    assert modes == {"lmforge_config": "File", "train_0": "FastFile", "train_1": "FastFile", "eval_0": "FastFile"}
    assert json.loads(request["HyperParameters"]["lmforge_channels"]) == {
        "train_0": {"data.train.0.path": "train.jsonl"}, "train_1": {"data.train.1.path": "*.jsonl"},
        "eval_0": {"data.eval.0.path": ""}}
    assert "CheckpointConfig" not in request  # lmforge uploads output_dir itself, marker last (cloud.py)
    # nothing submitted, nothing uploaded
    assert aws.client("sagemaker").list_training_jobs()["TrainingJobSummaries"] == []
    assert "Contents" not in aws.client("s3").list_objects_v2(Bucket=BUCKET)


def test_submit_creates_the_job_and_uploads_the_config(aws, config, capsys):
    assert main(_argv(config, "--dry-run", overrides=["train.learning_rate=3e-4"])) == 0
    request = json.loads(capsys.readouterr().out)
    assert main(_argv(config, overrides=["train.learning_rate=3e-4"])) == 0
    assert "submitted arn:aws:sagemaker:" in capsys.readouterr().out
    job = aws.client("sagemaker").describe_training_job(TrainingJobName="lmforge-test-job")
    for key in ("RoleArn", "ResourceConfig", "InputDataConfig", "HyperParameters", "StoppingCondition",
                "OutputDataConfig"):
        assert job[key] == request[key], key
    for key in ("TrainingImage", "TrainingInputMode", "ContainerEntrypoint"):
        assert job["AlgorithmSpecification"][key] == request["AlgorithmSpecification"][key], key
    body = aws.client("s3").get_object(Bucket=BUCKET, Key="lmforge-jobs/lmforge-test-job/config.yaml")["Body"].read()
    uploaded = yaml.safe_load(body)
    assert uploaded["train"]["learning_rate"] == 3e-4  # the override travels with the config
    assert uploaded == load_config(config, ["train.learning_rate=3e-4"]).to_dict()


def test_s3_prefix_places_the_job_files(aws, config, capsys):
    aws.client("s3").create_bucket(Bucket="jobs")
    assert main(_argv(config, "--s3-prefix", "s3://jobs/team/a")) == 0
    job = aws.client("sagemaker").describe_training_job(TrainingJobName="lmforge-test-job")
    assert job["OutputDataConfig"] == {"S3OutputPath": "s3://jobs/team/a/"}
    aws.client("s3").head_object(Bucket="jobs", Key="team/a/lmforge-test-job/config.yaml")


def test_wait_follows_the_job_to_its_end(aws, config, capsys):
    # moto creates training jobs already Completed: --wait must notice and return at once with 0
    codes = []
    follower = threading.Thread(target=lambda: codes.append(main(_argv(config, "--wait", "--poll-seconds", "0.1"))),
                                daemon=True)
    follower.start()
    follower.join(timeout=60)
    assert not follower.is_alive(), "--wait did not return for a Completed job"
    assert codes == [0]
    assert "lmforge-test-job: Completed" in capsys.readouterr().out


def test_wait_streams_transitions_and_fails_with_the_reason(aws, config, capsys):
    from moto.sagemaker.models import sagemaker_backends

    assert main(_argv(config)) == 0
    job = sagemaker_backends["123456789012"]["us-east-1"].training_jobs["lmforge-test-job"]
    job.training_job_status, job.secondary_status = "InProgress", "Training"

    def fail_later():  # the server's job fails after a few polls
        time.sleep(0.5)
        job.failure_reason = "AlgorithmError: lmforge train exited with code 2"
        job.training_job_status, job.secondary_status = "Failed", "Failed"

    threading.Thread(target=fail_later, daemon=True).start()
    said = []
    with pytest.raises(sagemaker.JobFailed, match="Failed: AlgorithmError: lmforge train exited with code 2") as e:
        sagemaker.wait("lmforge-test-job", poll_seconds=0.05, timeout=30, say=said.append)
    assert e.value.exit_code == 1
    statuses = [line.split(": ", 1)[1] for line in said if line.startswith("[lmforge] lmforge-test-job: ") and "(" in line]
    assert statuses == ["InProgress (Training)", "Failed (Failed)"]


def test_local_output_dir_is_refused(aws, config, tmp_path, capsys):
    code = main(_argv(config, overrides=[f"train.output_dir={tmp_path / 'runs'}"]))
    assert code == 2
    err = capsys.readouterr().err
    assert "train.output_dir" in err and "s3://" in err and "deleted when it ends" in err
    assert aws.client("sagemaker").list_training_jobs()["TrainingJobSummaries"] == []


@pytest.mark.parametrize("overrides,extra,message", [
    (["train.distributed=none"], [], "train.distributed: set ddp, fsdp or deepspeed to train on 2 instances"),
    (["train.resume=never"], ["--spot", "--instance-count", "1"], "train.resume: never with --spot"),
    (["train.resume=/tmp/ckpt"], [], "train.resume: /tmp/ckpt: with an s3:// output_dir, auto or never"),
])
def test_what_cannot_run_on_sagemaker_is_refused(config, capsys, overrides, extra, message):
    assert main(_argv(config, "--dry-run", *extra, overrides=overrides)) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


def test_local_data_path_is_refused(config, capsys):
    assert main(_argv(config, "--dry-run", overrides=["data.train=[{path: data/train.jsonl}]"])) == 2
    assert "data.train[0].path: data/train.jsonl is on this machine" in capsys.readouterr().err


def test_missing_role_exits_2(config, capsys):
    with pytest.raises(SystemExit) as e:
        main(["launch", "sagemaker", str(config), "--image-uri", IMAGE, "--dry-run"])
    assert e.value.code == 2
    assert "--role" in capsys.readouterr().err


def test_missing_image_exits_2_unless_configured(config, capsys, monkeypatch):
    monkeypatch.delenv(sagemaker.IMAGE_ENV, raising=False)
    assert main(["launch", "sagemaker", str(config), "--role", ROLE, "--dry-run"]) == 2
    assert "--image-uri: required" in capsys.readouterr().err
    monkeypatch.setenv(sagemaker.IMAGE_ENV, IMAGE)
    assert main(["launch", "sagemaker", str(config), "--role", ROLE, "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["AlgorithmSpecification"]["TrainingImage"] == IMAGE


# --------------------------------------------------------------------------------------------- the container
def _job_dirs(tmp_path, config, hosts, current, gpus):
    """What SageMaker gives a container of this job: channels filled, hyperparameters, SM_* variables."""
    cfg = load_config(config)
    request, _ = sagemaker.build_request(sagemaker.JobSpec(config=str(config), role=ROLE, image_uri=IMAGE,
                                                           instance_count=len(hosts)), cfg)
    root = tmp_path / current
    env = {"SM_HOSTS": json.dumps(hosts), "SM_CURRENT_HOST": current, "SM_NUM_GPUS": str(gpus), "SM_NUM_CPUS": "8",
           "SM_INPUT_CONFIG_DIR": str(root / "config"), "SM_OUTPUT_DIR": str(root / "output")}
    (root / "config").mkdir(parents=True)
    (root / "config" / "hyperparameters.json").write_text(json.dumps(request["HyperParameters"]))
    for name in ("lmforge_config", "train_0", "train_1", "eval_0"):
        env[f"SM_CHANNEL_{name.upper()}"] = str(root / "data" / name)
    (root / "data" / "lmforge_config").mkdir(parents=True)
    (root / "data" / "lmforge_config" / "config.yaml").write_text(sagemaker.config_text(cfg))
    write_jsonl(root / "data" / "train_0" / "train.jsonl", [{"text": "a b c"}])
    write_jsonl(root / "data" / "train_1" / "00.jsonl", [{"text": "a b c"}])
    write_jsonl(root / "data" / "eval_0" / "val.jsonl", [{"text": "a b c"}])
    return root, env


@pytest.mark.parametrize("current,rank", [("algo-1", 0), ("algo-2", 1)])
def test_entry_builds_torchrun_arguments_for_each_host(tmp_path, config, current, rank):
    root, env = _job_dirs(tmp_path, config, ["algo-1", "algo-2"], current, gpus=4)
    plan = sagemaker.plan_entry(env, root / "work")
    cfg, args = plan.cfg, plan.args
    cmd = launch.torchrun_command(args, [args.config])
    i = cmd.index("torch.distributed.run")
    assert cmd[i + 1:] == ["--nproc-per-node", "4", "--nnodes", "2", "--node-rank", str(rank),
                           "--master-addr", "algo-1", "--master-port", "29500",
                           "-m", "lmforge", "train", str(root / "work" / "config.yaml")]
    # the rewritten config reads the channels; output_dir stays in S3
    assert [s.path for s in cfg.data.train] == [str(root / "data" / "train_0" / "train.jsonl"),
                                                str(root / "data" / "train_1" / "*.jsonl")]
    assert cfg.data.train[0].weight == 2.0
    assert [s.path for s in cfg.data.eval] == [str(root / "data" / "eval_0")]
    assert cfg.train.output_dir == f"s3://{BUCKET}/runs/sm"
    assert cfg.train.learning_rate == load_config(config).train.learning_rate


def test_entry_reads_resourceconfig_without_sm_variables(tmp_path, config):
    """Without the sagemaker-training toolkit there are no SM_* variables: SageMaker's files say the same."""
    root, env = _job_dirs(tmp_path, config, ["algo-1", "algo-2", "algo-3"], "algo-3", gpus=0)
    (root / "config" / "resourceconfig.json").write_text(json.dumps(
        {"current_host": "algo-3", "hosts": ["algo-1", "algo-2", "algo-3"], "network_interface_name": "eth0"}))
    env = {"SM_INPUT_DIR": str(root), "SM_INPUT_CONFIG_DIR": env["SM_INPUT_CONFIG_DIR"], "SM_NUM_GPUS": "0"}
    plan = sagemaker.plan_entry(env, root / "work")
    args = plan.args
    assert (args.nproc_per_node, args.nnodes, args.node_rank, args.master_addr) == (1, 3, 2, "algo-1")
    assert plan.cfg.data.eval[0].path == str(root / "data" / "eval_0")  # /opt/ml/input/data/<channel> layout
    assert plan.env == {"NCCL_SOCKET_IFNAME": "eth0", "GLOO_SOCKET_IFNAME": "eth0"}
    cmd = launch.torchrun_command(args, [args.config])
    assert cmd[cmd.index("--nnodes"):cmd.index("-m", 3)] == ["--nnodes", "3", "--node-rank", "2", "--master-addr",
                                                             "algo-1", "--master-port", "29500"]


def _container(root, request, cfg, rows):
    """An /opt/ml tree as SageMaker lays it out for one host (no SM_* variables: files only)."""
    (root / "input" / "config").mkdir(parents=True)
    (root / "input" / "config" / "hyperparameters.json").write_text(json.dumps(request["HyperParameters"]))
    (root / "input" / "config" / "resourceconfig.json").write_text(json.dumps(
        {"current_host": "algo-1", "hosts": ["algo-1"]}))
    (root / "input" / "data" / "lmforge_config").mkdir(parents=True)
    (root / "input" / "data" / "lmforge_config" / "config.yaml").write_text(sagemaker.config_text(cfg))
    write_jsonl(root / "input" / "data" / "train_0" / "train.jsonl", rows)
    (root / "output").mkdir()


def _run_entry(root, tmp_path, cache):
    import os
    import subprocess
    import sys

    env = {**os.environ, "SM_NUM_GPUS": "0", "SM_INPUT_DIR": str(root / "input"), "SM_OUTPUT_DIR": str(root / "output"),
           "LMFORGE_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "lmforge", "launch", "sagemaker-entry", "--work-dir",
                           str(tmp_path / "work"), "train"], env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_entry_trains_into_s3_and_a_restarted_job_resumes(aws, tmp_path, tiny_model_dir):
    """One CPU host end to end, output_dir in the loopback S3: the entry point trains the tiny model from its
    channel; a restarted job (a new container, nothing local) resumes from the bucket's checkpoint."""
    from conftest import corpus

    s3 = aws.client("s3")
    tree = base_config(tiny_model_dir, f"s3://{BUCKET}/data/train.jsonl", f"s3://{BUCKET}/runs/e2e",
                       method="pretrain", train={"max_steps": 2, "save_steps": 2})
    rows = [{"text": t} for t in corpus(32)]
    cfg = load_config(None, tree=tree)
    request, _ = sagemaker.build_request(sagemaker.JobSpec(config="e2e.yaml", role=ROLE, image_uri=IMAGE), cfg)
    _container(tmp_path / "job1", request, cfg, rows)
    proc = _run_entry(tmp_path / "job1", tmp_path, tmp_path / "cache1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--standalone" in proc.stdout  # one host: torchrun picks its own port
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="runs/e2e/")["Contents"]}
    assert {"runs/e2e/checkpoint-2/.lmforge-complete", "runs/e2e/.lmforge-complete", "runs/e2e/config.json"} <= keys
    assert not (tmp_path / "job1" / "output" / "failure").exists()

    # the job restarts (as after a spot interruption) in a fresh container, here with 2 more steps to go
    cfg = load_config(None, tree={**tree, "train": {**tree["train"], "max_steps": 4}})
    _container(tmp_path / "job2", request, cfg, rows)
    proc = _run_entry(tmp_path / "job2", tmp_path, tmp_path / "cache2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stdout + proc.stderr and "checkpoint-2" in proc.stdout + proc.stderr
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="runs/e2e/")["Contents"]}
    assert "runs/e2e/checkpoint-4/.lmforge-complete" in keys


@pytest.mark.parametrize("strategy", [["train.distributed=fsdp"],
                                      ["train.distributed=deepspeed", "train.deepspeed=zero3"]])
def test_sharded_strategies_span_instances(aws, tmp_path, config, capsys, strategy):
    """FSDP and ZeRO-3 on 2 instances (spot included): each instance uploads its processes' part of a checkpoint,
    so nothing needs a shared disk. The request holds both hosts and the channels; each host's entry point
    builds its torchrun node; the loopback SageMaker accepts the job."""
    tree = yaml.safe_load(config.read_text())
    for item in strategy:
        key, value = item.split("=")
        tree["train"][key.split(".")[1]] = value
    sharded = write_config(tmp_path / "sharded.yaml", tree)
    assert main(_argv(sharded, "--dry-run", "--spot")) == 0
    request = json.loads(capsys.readouterr().out)
    assert request["ResourceConfig"]["InstanceCount"] == 2 and request["EnableManagedSpotTraining"] is True
    assert set(_channels(request)) == {"lmforge_config", "train_0", "train_1", "eval_0"}
    for rank, host in enumerate(["algo-1", "algo-2"]):
        root, env = _job_dirs(tmp_path / host, sharded, ["algo-1", "algo-2"], host, gpus=2)
        plan = sagemaker.plan_entry(env, root / "work")
        assert plan.cfg.train.distributed == tree["train"]["distributed"]
        assert plan.cfg.train.output_dir == f"s3://{BUCKET}/runs/sm"  # every host writes its part there
        cmd = launch.torchrun_command(plan.args, [plan.args.config])
        i = cmd.index("torch.distributed.run")
        assert cmd[i + 1:i + 13] == ["--nproc-per-node", "2", "--nnodes", "2", "--node-rank", str(rank),
                                     "--master-addr", "algo-1", "--master-port", "29500", "-m", "lmforge"]
    assert main(_argv(sharded, "--spot")) == 0
    job = aws.client("sagemaker").describe_training_job(TrainingJobName="lmforge-test-job")
    assert job["ResourceConfig"]["InstanceCount"] == 2
    assert job["InputDataConfig"] == request["InputDataConfig"]


def test_entry_reads_the_toolkits_decoded_hyperparameters(tmp_path, config):
    """The sagemaker-training toolkit's SM_HPS holds hyperparameters JSON-decoded (the channel map as a dict)."""
    root, env = _job_dirs(tmp_path, config, ["algo-1"], "algo-1", gpus=1)
    hps = json.loads((root / "config" / "hyperparameters.json").read_text())
    (root / "config" / "hyperparameters.json").unlink()
    env["SM_HPS"] = json.dumps({**hps, "lmforge_channels": json.loads(hps["lmforge_channels"])})
    plan = sagemaker.plan_entry(env, root / "work")
    assert plan.cfg.data.train[0].path == str(root / "data" / "train_0" / "train.jsonl")
    cmd = launch.torchrun_command(plan.args, [plan.args.config])
    assert "--standalone" in cmd and "--nnodes" not in cmd  # one host: torchrun picks its own port
