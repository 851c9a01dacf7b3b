"""`lmforge launch sagemaker CONFIG --role ARN ...` and, inside the job's container, `lmforge launch sagemaker-entry`."""

from __future__ import annotations

import json
import sys

import argparse

from lmforge.errors import ConfigError


def add_parser(sub, formatter):
    p = sub.add_parser("launch", formatter_class=formatter, help="run lmforge train on a cloud service (SageMaker)")
    targets = p.add_subparsers(dest="launch_target", metavar="TARGET")
    s = targets.add_parser("sagemaker", formatter_class=formatter,
                           help="submit a SageMaker training job that runs lmforge train on the config")
    s.add_argument("config", help="YAML config file; train.output_dir must be s3://")
    s.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.learning_rate=1e-5")
    s.add_argument("--role", required=True, help="IAM role ARN the job runs as (reads the data, writes output_dir)")
    s.add_argument("--image-uri", default=None,
                   help="training image with lmforge installed; None: $LMFORGE_SAGEMAKER_IMAGE, required when that is unset")
    s.add_argument("--instance-type", default="ml.g5.2xlarge", help="SageMaker instance type")
    s.add_argument("--instance-count", type=int, default=1, help="instances (nodes); one torchrun node each")
    s.add_argument("--volume-size", type=int, default=100, help="EBS volume per instance, GB")
    s.add_argument("--max-run", type=int, default=86400, help="stop the job after this many seconds")
    s.add_argument("--job-name", default=None, help="training job name; None: lmforge-METHOD-YYYYmmdd-HHMMSS")
    s.add_argument("--s3-prefix", default=None,
                   help="s3://BUCKET/PREFIX for the job's config and SageMaker's output"
                        "; None: s3://<output_dir's bucket>/lmforge-jobs")
    s.add_argument("--input-mode", choices=("File", "FastFile"), default="File",
                   help="data channels: File copies them to the instance first, FastFile streams them on read")
    s.add_argument("--spot", action="store_true", help="managed spot training (resumes from output_dir when restarted)")
    s.add_argument("--max-wait", type=int, default=None, help="--spot: seconds to wait for capacity plus run; "
                                                              "None: 2 x --max-run")
    s.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the container (repeatable), e.g. WANDB_API_KEY=...")
    s.add_argument("--region", default=None, help="AWS region; None: the AWS configuration's")
    s.add_argument("--dry-run", action="store_true", help="print the create_training_job request; submit nothing")
    s.add_argument("--wait", action="store_true", help="follow the job's status until it ends; exit 1 if it fails")
    s.add_argument("--poll-seconds", type=float, default=30.0, help="--wait: seconds between status checks")
    s.add_argument("--debug", action="store_true", help="show full tracebacks")
    e = targets.add_parser("sagemaker-entry", formatter_class=formatter,
                           help="inside a SageMaker job: run lmforge train under torchrun across the job's hosts")
    e.add_argument("--work-dir", default="/tmp/lmforge-sagemaker", help="where the rewritten config is written")
    # SageMaker starts a container with the argument `train` unless the job gives ContainerArguments
    e.add_argument("container_args", nargs="*", help=argparse.SUPPRESS)
    e.add_argument("--debug", action="store_true", help="show full tracebacks")
    p.set_defaults(_launch_parser=p)
    return p


def _env_pairs(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--env {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


def _run_sagemaker(args) -> int:
    from lmforge.config import load_config
    from lmforge.distributed import sagemaker

    cfg = load_config(args.config, args.overrides)
    spec = sagemaker.JobSpec(
        config=args.config, overrides=args.overrides, role=args.role, image_uri=args.image_uri,
        instance_type=args.instance_type, instance_count=args.instance_count, volume_size=args.volume_size,
        max_run=args.max_run, job_name=args.job_name, s3_prefix=args.s3_prefix, input_mode=args.input_mode,
        spot=args.spot, max_wait=args.max_wait, env=_env_pairs(args.env),
    )
    request, config_uri = sagemaker.build_request(spec, cfg)
    if args.dry_run:
        print(json.dumps(request, indent=2))
        print(f"[lmforge] dry run: nothing submitted; the config would go to {config_uri}", file=sys.stderr)
        return 0
    arn = sagemaker.submit(request, config_uri, sagemaker.config_text(cfg), region=args.region)
    name = request["TrainingJobName"]
    print(f"[lmforge] submitted {arn}\n[lmforge] config: {config_uri}\n[lmforge] output: {cfg.train.output_dir}",
          flush=True)
    if args.wait:
        try:
            sagemaker.wait(name, region=args.region, poll_seconds=args.poll_seconds,
                           say=lambda line: print(line, flush=True))
        except KeyboardInterrupt:
            print(f"[lmforge] stopped following; the job keeps running (aws sagemaker stop-training-job "
                  f"--training-job-name {name} stops it)", file=sys.stderr)
            return 130
    return 0


def _run_entry(args) -> int:
    import os
    from pathlib import Path

    from lmforge.distributed import launch, sagemaker
    from lmforge.errors import LmforgeError

    try:
        if args.container_args not in ([], ["train"]):
            raise ConfigError(f"sagemaker-entry: unexpected arguments {args.container_args} (it reads the job's "
                              "hyperparameters and channels, and takes none)")
        plan = sagemaker.plan_entry(dict(os.environ), Path(args.work_dir), debug=args.debug)
        os.environ.update(plan.env)
        print(f"[lmforge] SageMaker host {plan.args.node_rank + 1} of {plan.args.nnodes}, "
              f"{plan.args.nproc_per_node} process(es); config {plan.args.config}", flush=True)
        code = launch.relaunch(plan.args, plan.cfg)
    except LmforgeError as e:
        sagemaker.write_failure(str(e), dict(os.environ))
        raise
    if code:
        sagemaker.write_failure(f"lmforge train exited with code {code}; see the job's CloudWatch log", dict(os.environ))
    return code


def run(args) -> int:
    if args.launch_target == "sagemaker":
        return _run_sagemaker(args)
    if args.launch_target == "sagemaker-entry":
        return _run_entry(args)
    args._launch_parser.print_help()
    return 2
