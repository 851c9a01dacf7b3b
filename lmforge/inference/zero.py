"""`lmforge generate --zero-inference [--offload-dir DIR]` and `--kernel-inject`: DeepSpeed for inference.

ZeRO-Inference: the model runs as a ZeRO-3 engine whose parameters live offloaded to CPU memory (or to files
under ``--offload-dir``, DeepSpeed's NVMe offload) and are fetched layer by layer for each forward pass, so
a model larger than the accelerator's (or, with NVMe, the machine's) memory still generates. The weights
are loaded already partitioned: transformers' ``HfDeepSpeedConfig`` makes ``from_pretrained`` build the
model under ``deepspeed.zero.Init``, so the full model never sits in memory at once. No optimizer: nothing
is trained, so cpu_adam is never compiled. lmforge's decode loop runs on the engine's module unchanged
(ZeRO's hooks gather each layer's parameters as its forward starts). On several processes (sharded.py) the
parameters are partitioned over them and ``LockStep`` keeps their forward passes matched.

Kernel injection (DeepSpeed-Inference's fused CUDA kernels, ``deepspeed.init_inference``) exists only for
CUDA GPUs; elsewhere it is refused before anything loads.
"""

from __future__ import annotations

import os
import socket
import sys
import traceback
from dataclasses import replace
from pathlib import Path

import torch

from lmforge.distributed import extensions
from lmforge.errors import ConfigError, UnsupportedError
from lmforge.inference.backends import HfBackend
from lmforge.inference.generate import Generator
from lmforge.inference.loading import load_for_inference
from lmforge.models import is_adapter_dir, pick_dtype, resolve_model_path


def check(zero_inference: bool, kernel_inject: bool, offload_dir: str | None, backend: str) -> None:
    """Refuse flag combinations that cannot run (ConfigError / UnsupportedError: exit 2)."""
    if kernel_inject and zero_inference:
        raise ConfigError("--kernel-inject and --zero-inference are two DeepSpeed engines; choose one")
    if offload_dir is not None and not zero_inference:
        raise ConfigError("--offload-dir: only used with --zero-inference (where ZeRO-3 offloads the parameters)")
    for flag, on in (("--zero-inference", zero_inference), ("--kernel-inject", kernel_inject)):
        if on and backend != "hf":
            raise ConfigError(f"{flag}: runs transformers models through DeepSpeed; it cannot be combined with "
                              f"--backend {backend} (which has its own engine)")
    if kernel_inject and not torch.cuda.is_available():
        raise UnsupportedError("--kernel-inject: DeepSpeed-Inference kernel injection needs a CUDA GPU and this "
                               "machine has none; --zero-inference (ZeRO-3 with offloaded parameters) runs on CPU")


def inference_config(model_config, dtype: torch.dtype, offload_dir: str | None = None) -> dict:
    """A ZeRO-3 config for inference: parameters offloaded to CPU, or to NVMe files under ``offload_dir``.

    The bucket and persistence sizes follow the transformers DeepSpeed guide's ZeRO-Inference values
    (parameters under 10 x hidden size, the norms and biases, stay resident)."""
    hidden = getattr(model_config.get_text_config(decoder=True), "hidden_size", None) or 1024
    pin = torch.cuda.is_available()  # pinned host memory needs CUDA
    offload: dict = {"device": "cpu", "pin_memory": pin}
    if offload_dir is not None:
        offload = {"device": "nvme", "nvme_path": str(offload_dir), "pin_memory": pin}
    return {
        "train_micro_batch_size_per_gpu": 1,  # required by DeepSpeed's config check, unused without training
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "zero_optimization": {
            "stage": 3,
            "offload_param": offload,
            "stage3_param_persistence_threshold": 10 * hidden,
            "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            "reduce_bucket_size": hidden * hidden,
        },
    }


class ZeroBackend(HfBackend):
    """The hf backend with the model inside a ZeRO-3 inference engine (one process)."""

    name = "hf+zero3"

    def __init__(self, model: str, dtype: str = "auto", batching: str = "continuous", batch_size: int | None = None,
                 offload_dir: str | None = None):
        import deepspeed
        from transformers import AutoConfig
        from transformers.integrations import HfDeepSpeedConfig
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        path = resolve_model_path(model)
        if is_adapter_dir(path):
            # merging LoRA into weights that ZeRO-3 has partitioned is not something PEFT supports
            raise UnsupportedError(f"--zero-inference: {model} is an adapter; merge it into its base first "
                                   "(lmforge merge --model ADAPTER --output DIR) and generate from DIR")
        config = inference_config(AutoConfig.from_pretrained(path), pick_dtype(dtype), _offload_dir(offload_dir))
        _process_group()
        # while this object lives, from_pretrained builds the model under deepspeed.zero.Init (loads partitioned)
        hf_config = HfDeepSpeedConfig(config)
        try:
            loaded = load_for_inference(model, dtype)
            engine, *_ = deepspeed.initialize(model=loaded.model, config=config)
        finally:
            del hf_config
            unset_hf_deepspeed_config()  # later loads in this process are plain again
        engine.module.eval()
        self.engine = engine  # holds the offloaded parameters; the module's hooks fetch them
        self.loaded = replace(loaded, model=engine.module)
        self.generator = Generator(self.loaded)
        self.batching, self.batch_size = batching, batch_size
        self.lockstep = None
        if engine.dp_world_size > 1:  # the parameters are partitioned across the ranks (sharded.py)
            if loaded.is_encoder_decoder:
                # generate runs the encoder on its own, a forward LockStep does not see
                raise UnsupportedError("--zero-inference on several processes: encoder-decoder models are not "
                                       "supported; use one process")
            self.lockstep = LockStep(engine.module)


class LockStep:
    """Keeps the forward passes of ranks that share one ZeRO-3 model in step.

    Every forward pass gathers each layer's parameters from all ranks, so all ranks must run the same number
    of them; ranks generating different rows would not (more rows, longer answers). So each forward is one
    round: first an all-reduce of "still generating" flags, then the forward. A rank with nothing left to
    generate calls ``drain``, which answers each round with 0 and a one-token forward, until every rank's
    flag is 0. Written here because DeepSpeed and transformers only offer this within one ``generate`` call
    (``synced_gpus``), and lmforge's decode loop and windows make many calls per rank."""

    def __init__(self, model):
        import torch.distributed as dist

        self.model, self.dist = model, dist
        self.device = next(model.parameters()).device
        self.draining = False
        self.inside = False  # a forward pass started and has not returned
        # first among the pre-hooks: the round's all-reduce must come before ZeRO's own collectives, as in drain
        model.register_forward_pre_hook(self._before_forward, prepend=True)
        model.register_forward_hook(self._after_forward)  # not called when the forward raises: inside stays True

    def _round(self, generating: bool) -> bool:
        """True when any rank is still generating."""
        flag = torch.tensor([int(generating)])
        self.dist.all_reduce(flag)
        return bool(flag.item())

    def _before_forward(self, module, args):
        if not self.draining:
            self._round(True)
        self.inside = True

    def _after_forward(self, module, args, output):
        self.inside = False

    @torch.inference_mode()
    def drain(self) -> None:
        if self.inside:
            # a forward pass failed halfway through its parameter gathers: the ranks' collectives can no longer be
            # matched up, so this rank leaves at once and torchrun stops the others (rather than all waiting)
            traceback.print_exc()
            sys.stderr.write("lmforge: error: a forward pass failed under --zero-inference on several processes "
                             "(above); stopping every process\n")
            sys.stderr.flush()
            os._exit(1)
        self.draining = True
        try:
            while self._round(False):
                self.model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=self.device), use_cache=False)
        finally:
            self.draining = False


class KernelInjectBackend(HfBackend):
    """The hf backend with DeepSpeed-Inference's fused kernels injected (CUDA only; ``check`` refuses CPU).

    The injected modules keep their own KV cache, which lmforge's decode loop cannot drive: they run through
    transformers ``generate`` on length-sorted static batches."""

    name = "hf+kernel-inject"

    def __init__(self, model: str, dtype: str = "auto", batch_size: int | None = None):
        import deepspeed

        super().__init__(model, dtype, "static", batch_size)
        _process_group()
        engine = deepspeed.init_inference(self.loaded.model, dtype=self.loaded.dtype, replace_with_kernel_inject=True,
                                          tensor_parallel={"tp_size": 1})
        self.loaded = replace(self.loaded, model=engine.module)
        self.generator = Generator(self.loaded)


def _offload_dir(path: str | None) -> str | None:
    if path is None:
        return None
    p = Path(path).expanduser().resolve()
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--offload-dir: cannot create {path} ({e.strerror})") from None
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if not AsyncIOBuilder().is_compatible(verbose=False):
        raise UnsupportedError("--offload-dir: DeepSpeed's NVMe offload needs its async_io op, which cannot be built "
                               "here (it needs libaio: apt-get install libaio-dev); without --offload-dir the "
                               "parameters are offloaded to CPU memory")
    return str(p)


_SAVED_ENV: dict[str, str | None] = {}
_RENDEZVOUS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _process_group() -> None:
    """The process group DeepSpeed wants: torchrun's when there is one, else a one-process gloo group on a free
    loopback port. DeepSpeed reads the rank variables from the environment, so they are set for the group's
    lifetime and restored by ``close`` (left behind, they would make this process look like a torchrun worker
    to whatever runs in it next)."""
    import deepspeed
    import torch.distributed as dist

    extensions.load_ops()
    if "LOCAL_RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        _SAVED_ENV.update({k: os.environ.get(k) for k in _RENDEZVOUS})
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def close() -> None:
    """End the one-process group ``_process_group`` created and restore the environment (no-op otherwise)."""
    import torch.distributed as dist

    if not _SAVED_ENV:
        return
    if dist.is_initialized():
        dist.destroy_process_group()
    for k, v in _SAVED_ENV.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    _SAVED_ENV.clear()
