"""The plumbing every method shares: model + tokenizer, data, TrainingArguments, callbacks, the final save.

A method module (``methods/sft.py``, ``methods/dpo.py``, ...) reads top to bottom as: build the pieces
with these helpers, construct its trainer, call ``run_trainer``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from lmforge import cloud, plan
from lmforge.adapters import (
    apply_peft, count_parameters, freeze_except, quantization_kwargs,
)
from lmforge.config import Config
from lmforge.distributed import strategy
from lmforge.distributed.ranks import local_rank, nodes
from lmforge.errors import ConfigError
from lmforge.log import is_main_process, log
from lmforge.models import (  # resolve_model_and_tokenizer lives in models.py (prepare/inspect load no trainer)
    architecture, load_model, pick_dtype, resolve_model_and_tokenizer,
)
from lmforge.registry import METHODS
from lmforge.training import flops
from lmforge.training.callbacks import OutputsCallback, ProfileCallback, TokenCounter
from lmforge.training.outputs import truncate_metrics_after
from lmforge.training.checkpoint import (
    STAGING, TrainerHooks, move_aside_old_run, resolve_resume, save_final_atomically, weights_bytes,
)
from lmforge.training.optim import default_learning_rate, hf_optim_name
from lmforge.training.report import record_base_answers, write_report
from lmforge.training.stopping import StepGuard
from lmforge.training.tracking import Profiler, hf_report_to


@dataclass
class Precision:
    """Compute dtype, and the dtype weights are loaded in.

    Full fine-tuning keeps fp32 master weights under bf16 autocast (pure bf16 AdamW loses small updates);
    adapters leave the frozen base in the compute dtype, which halves memory and skips a cast per step.
    """

    compute: torch.dtype
    weights: torch.dtype

    @property
    def bf16(self) -> bool:
        return self.compute == torch.bfloat16

    @property
    def fp16(self) -> bool:
        return self.compute == torch.float16


def precision_for(cfg: Config) -> Precision:
    compute = pick_dtype(cfg.model.dtype)
    if compute == torch.float16 and not torch.cuda.is_available():
        raise ConfigError("model.dtype: float16 training needs a GPU; use bfloat16 or float32 on CPU")
    # full fine-tunes load fp32 weights (the masters of bf16 compute); fp64 keeps fp64
    weights = compute if cfg.peft.kind != "none" else torch.promote_types(compute, torch.float32)
    return Precision(compute, weights)


# ------------------------------------------------------------------------------------ model + tokenizer
def load_model_and_tokenizer(cfg: Config, auto_class=None, task_type: str = "CAUSAL_LM"):
    """Returns (model with adapters applied, tokenizer, precision). Starting from an adapter dir continues it."""
    prec = precision_for(cfg)
    model_dir, adapter_dir, tokenizer = resolve_model_and_tokenizer(cfg)
    if adapter_dir is not None:
        prec = Precision(prec.compute, prec.compute)  # a continued adapter: the frozen base stays in compute dtype
    extra = quantization_kwargs(cfg.peft, prec.compute) if model_dir is not None else {}
    model = load_model(cfg.model, model_dir, tokenizer, auto_class=auto_class, seed=cfg.train.seed,
                       dtype=prec.weights, **extra)
    if adapter_dir is not None:
        from peft import PeftModel

        log(f"continuing the adapter in {adapter_dir}")
        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    else:
        torch.manual_seed(cfg.train.seed)  # adapter init (LoRA A, prompt embeddings) is part of "seed for init"
        model = apply_peft(model, cfg.peft, task_type=task_type, tokenizer_path=str(model_dir) if model_dir else None)
    if cfg.train.trainable:
        freeze_except(model, cfg.train.trainable)
    trainable, total = count_parameters(model)
    log(f"model: {total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable, compute {prec.compute}")
    return model, tokenizer, prec


# ------------------------------------------------------------------------------------ arguments
def training_args(cfg: Config, prec: Precision, has_eval: bool, args_cls=None, **method_kwargs):
    """Map lmforge's train section onto TrainingArguments (or a TRL config class) with lmforge's defaults."""
    from transformers import TrainingArguments

    args_cls = args_cls or TrainingArguments
    t = cfg.train
    warmup = t.warmup_ratio if t.warmup_ratio is not None else t.warmup_steps
    kwargs = dict(
        output_dir=t.output_dir, max_steps=t.max_steps, num_train_epochs=t.num_train_epochs,
        learning_rate=default_learning_rate(cfg), lr_scheduler_type=t.lr_scheduler_type,
        lr_scheduler_kwargs=t.lr_scheduler_kwargs, warmup_steps=warmup, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, optim=hf_optim_name(t.optim), adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2,
        adam_epsilon=t.adam_epsilon, per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, seed=t.seed, data_seed=t.seed,
        logging_steps=t.logging_steps, logging_first_step=True, save_strategy=t.save_strategy, save_steps=t.save_steps,
        save_total_limit=t.save_total_limit, eval_strategy="steps" if has_eval and t.eval_strategy != "no" else "no",
        eval_steps=t.eval_steps or t.save_steps, gradient_checkpointing=t.gradient_checkpointing,
        torch_compile=t.torch_compile, report_to=hf_report_to(t.report_to), run_name=t.run_name,
        dataloader_num_workers=t.dataloader_num_workers, bf16=prec.bf16, fp16=prec.fp16,
        use_cpu=not torch.cuda.is_available(), remove_unused_columns=False, disable_tqdm=True,
    )  # lmforge writes tensorboard (output_dir/runs/), wandb, mlflow, aim itself (OutputsCallback, tracking.py)
    kwargs.update(strategy.trainer_kwargs(cfg, prec))  # ddp / fsdp / deepspeed (lmforge/distributed)
    kwargs.update(method_kwargs)
    names = {f.name for f in dataclasses.fields(args_cls)}
    if "activation_checkpointing" in names:  # transformers 5 renamed it; the old name only warns
        kwargs["activation_checkpointing"] = kwargs.pop("gradient_checkpointing")
    unknown = sorted(set(kwargs) - names)
    if unknown:  # every keyword is lmforge's own mapping, never a user's key: a mismatch is a bug here
        raise TypeError(f"training_args: {args_cls.__name__} has no field {', '.join(unknown)}; lmforge passes a "
                        "keyword this transformers/trl version does not know")
    try:
        return args_cls(**kwargs)
    except (ValueError, ImportError) as e:
        raise ConfigError(f"train: {e}") from None


def trainer_hooks(cfg: Config, flops_per_token: float | None = None, prec: Precision | None = None,
                  model_config=None) -> TrainerHooks:
    """What an HF/TRL trainer gets from lmforge in its constructor (``LmforgeTrainerMixin``): the outputs callback
    (metrics.jsonl, plots, progress; with ``flops_per_token`` also mfu, over the peak at ``model_config``'s
    shapes), the signal/NaN guard, the token counter, the resolved config and train.optim."""
    callback, counter = outputs_callback(cfg, flops_per_token, prec, model_config)
    guard = StepGuard(cfg.train.on_nan, cfg.train.output_dir)  # signals and NaN losses (stopping.py)
    callbacks = [callback, guard]
    if cfg.train.profile is not None and is_main_process():
        callbacks.append(ProfileCallback(Profiler(cfg, Path(cfg.train.output_dir))))
    return TrainerHooks(config_yaml(cfg), cfg.train.optim, guard, counter, callbacks=callbacks)


def outputs_callback(cfg: Config, flops_per_token: float | None = None, prec: Precision | None = None,
                     model_config=None) -> tuple[OutputsCallback, TokenCounter]:
    """metrics.jsonl, plots and progress; with ``flops_per_token`` (``flops.per_token``) also mfu."""
    counter = TokenCounter()
    peak = flops.process_peak(prec.compute, model_config) if flops_per_token and prec is not None else None
    cb = OutputsCallback(cfg.train.output_dir, counter,
                         perplexity=METHODS[cfg.method].token_loss,  # eval_loss is a token NLL only there
                         flops_per_token=flops_per_token, peak_flops=peak, report_to=cfg.train.report_to)
    return cb, counter


# ------------------------------------------------------------------------------------ run
def config_yaml(cfg: Config, run_plan: plan.RunPlan | None = None) -> str:
    """The resolved config as YAML; with the plan, as comments above it (``load_config`` reads the file back)."""
    head = "".join(f"# plan: {line}\n" for line in run_plan.lines()) if run_plan is not None else ""
    return head + yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def planned(cfg: Config) -> tuple[Config, plan.RunPlan]:
    """The run plan (``plan.py``) for ``cfg`` on its model's architecture, and the config with the plan's engine
    (config.yaml records which engine ran). The same config gives the same plan: calling it again is harmless."""
    run_plan = plan.plan(cfg, architecture(cfg))
    return plan.with_engine(cfg, run_plan.engine), run_plan


@dataclass(frozen=True)
class Run:
    """What a method starts from: the config as it runs (the plan's engine; a local mirror for an output_dir
    URL), the plan, and the checkpoint to resume from."""

    cfg: Config
    plan: plan.RunPlan
    resume: str | None


def start(cfg: Config) -> Run:
    """Plan the run, set up train.distributed (the process group must exist before data preparation, which runs
    rank 0 first), then open the output directory."""
    cfg, run_plan = planned(cfg)
    for line in run_plan.lines():
        log(f"plan: {line}")
    strategy.setup(cfg)
    cfg, resume = open_output_dir(cfg, run_plan)
    return Run(cfg, run_plan, resume)


def open_output_dir(cfg: Config, run_plan: plan.RunPlan) -> tuple[Config, str | None]:
    """Create output_dir, save config.yaml (the plan as its opening comment), and return the config to train with
    and the checkpoint to resume from. An output_dir URL trains in a local mirror that uploads (cloud.py): the
    returned config names the mirror."""
    saved_config = config_yaml(cfg, run_plan)  # with the output_dir as the user gave it, a URL included
    if cloud.is_remote(cfg.train.output_dir):
        if cfg.train.resume not in ("auto", "never"):
            raise ConfigError(f"train.resume: {cfg.train.resume}: with an output_dir URL, resume is auto or never")
        url = cfg.train.output_dir
        mirror, resume = open_remote_output_dir(url, cfg.train.resume)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, output_dir=str(mirror)))
        log(f"train.output_dir {url}: training in {mirror} (on each node), each checkpoint and the final model "
            "uploaded when complete")
    else:
        check_shared(cfg.train.output_dir)
        resume = resolve_resume(cfg.train.resume, cfg.train.output_dir)
    out = Path(cfg.train.output_dir)
    if resume:
        written_by = json.loads((Path(resume) / "trainer_state.json").read_text()).get("engine", "hf")
        if written_by != cfg.train.engine:
            raise ConfigError(f"train.resume: {resume} was written by the {written_by} engine; resume it with "
                              f"train.engine: {written_by} (one engine's checkpoints do not resume in the other), "
                              "or start afresh with train.resume: never")
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(saved_config)
        if resume:
            step = json.loads((Path(resume) / "trainer_state.json").read_text())["global_step"]
            truncate_metrics_after(out, step)
            log(f"resuming from {resume} (step {step})")
        elif cfg.train.resume == "never" and (aside := move_aside_old_run(out)):
            log(f"train.resume: never: the earlier run's checkpoints and metrics.jsonl in {out} were moved to "
                f"{aside}, so train.resume: auto can only find this run's checkpoints")
        else:
            (out / "metrics.jsonl").unlink(missing_ok=True)
    return cfg, resume


def check_shared(output_dir: str) -> None:
    """Several nodes with a local output_dir: it must be one directory they all see, as rank 0 renames each
    checkpoint into place there once every rank wrote its part. On a disk of each node's own the other nodes'
    parts would be missing from every checkpoint: refused at start, on every rank alike (none is left waiting)."""
    if nodes() <= 1 or not torch.distributed.is_initialized():
        return
    token = [uuid.uuid4().hex if is_main_process() else None]
    torch.distributed.broadcast_object_list(token, src=0)
    probe = Path(output_dir) / ".lmforge-shared"
    if is_main_process():
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text(token[0])
    torch.distributed.barrier()
    seen = local_rank() != 0 or (probe.exists() and probe.read_text() == token[0])
    every = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, seen)
    torch.distributed.barrier()
    if is_main_process():
        probe.unlink(missing_ok=True)
    if not all(every):
        raise ConfigError(f"train.output_dir: {output_dir} is not one directory shared by the {nodes()} nodes (a "
                          "file written there on node 0 is not seen on every node): give all nodes a shared "
                          "directory (NFS, Lustre, ...), or an output_dir URL (s3://..., gs://..., any fsspec "
                          "URL), with which nodes share nothing but the bucket")


def open_remote_output_dir(url: str, resume: str) -> tuple[Path, str | None]:
    """The local mirror of an output_dir URL on this node, and the checkpoint in it to resume from.

    Global rank 0 alone decides from the bucket (``resume: auto``: its newest complete checkpoint; ``never``:
    the bucket's checkpoints set aside) and tells every rank, so that all resume from the same step; then local
    rank 0 of each node sets up that node's mirror and downloads the checkpoint into it (nodes share no disk)."""
    name = None
    if is_main_process():
        if resume == "auto":
            name = cloud.newest_complete_checkpoint(url)
        else:
            cloud.set_aside_remote_checkpoints(url)
    group = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    if group:
        chosen = [name]
        torch.distributed.broadcast_object_list(chosen, src=0)
        name = chosen[0]
    if local_rank() == 0:
        cloud.open_mirror(url, name, fetch_metrics=is_main_process())
    if group:
        torch.distributed.barrier()  # each node's mirror is set up, with the checkpoint to resume
    mirror = cloud.local_mirror(url)
    return mirror, str(mirror / name) if name else None


def run_trainer(trainer, cfg: Config, tokenizer, resume: str | None, data_lines: list[str]) -> Path:
    """Train (resuming if asked), then save the final model/adapter + tokenizer and the report."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # OutputsCallback shows progress and writes metrics instead
    trainer.add_callback(strategy.StrategyCheck(cfg, trainer))  # fails the run if another strategy is running
    record_base_answers(cfg, trainer.model, tokenizer, resumed=resume is not None)
    with trainer.lmforge.guard.signals():
        trainer.train(resume_from_checkpoint=resume)
    if trainer.args.should_save:
        shutil.rmtree(Path(cfg.train.output_dir) / STAGING, ignore_errors=True)
    strategy.before_final_save(trainer)  # sharded FSDP state is gathered into a plain model

    def write(staged: Path) -> None:
        trainer.save_model(str(staged))  # every rank: FSDP / ZeRO-3 gather collectively; process 0 writes
        if trainer.args.should_save:
            tokenizer.save_pretrained(staged)

    model = trainer.accelerator.unwrap_model(trainer.model)
    return finish_run(cfg, write, trainer.accelerator.wait_for_everyone, trainer.args.should_save, model, tokenizer,
                      "hf", trainer.state.global_step, data_lines, expected_bytes=weights_bytes(trainer.model))


def finish_run(cfg: Config, write, barrier, is_main: bool, model, tokenizer, engine: str, steps: int,
               data_lines: list[str], expected_bytes: int | None = None) -> Path:
    """The one final save of both engines: ``write(staged_dir)`` on every rank writes the model or adapter and the
    tokenizer, moved into output_dir only when every rank is done (``save_final_atomically``); then, on the main
    process, report.md / report.html, one log line and the upload of an output_dir URL."""
    out = Path(cfg.train.output_dir)
    save_final_atomically(out, write, barrier, is_main, expected_bytes=expected_bytes)
    if is_main:
        write_report(out, {"method": cfg.method, "model": cfg.model.name_or_path or "from scratch",
                           "adapter": cfg.peft.kind, "engine": engine, "max_steps": steps}, data_lines,
                     cfg, model, tokenizer)
        log(f"final {'adapter' if hasattr(model, 'peft_config') else 'model'} saved to {out}")
        upload_outputs(out)
    return out


def upload_outputs(out: Path) -> None:
    """An output_dir URL: the final model, report and metrics go up from the local mirror (rank 0)."""
    url = cloud.remote_of(out)
    if url:
        cloud.upload_outputs(out)
        log(f"uploaded to {url}")
