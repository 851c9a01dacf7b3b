"""Batched generation with transformers `generate`: shared by `lmforge generate`, `serve` and `eval`.

A prompt row is ``{"prompt": str}`` (raw text) or ``{"messages": [...]}`` (the chat template is applied with
the generation prompt). Each result has the text, why it stopped (``stop``: an EOS id or a stop string;
``length``: max_new_tokens reached) and how many tokens were generated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria

from lmforge.errors import ConfigError
from lmforge.inference.loading import LoadedModel


@dataclass
class GenerationOptions:
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filtering
    num_beams: int = 1
    stop: list[str] = field(default_factory=list)  # the completion is cut before the first stop string
    eos_token_ids: list[int] = field(default_factory=list)  # extra ids that end a completion, beside the model's EOS
    seed: int = 0

    def check(self, prefix: str = "--") -> None:
        """Raise ConfigError for values generate would reject or silently misuse."""
        if self.max_new_tokens < 1:
            raise ConfigError(f"{prefix}max-new-tokens: must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"{prefix}temperature: must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"{prefix}top-p: must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"{prefix}top-k: must be >= 0, got {self.top_k}")
        if self.num_beams < 1:
            raise ConfigError(f"{prefix}num-beams: must be >= 1, got {self.num_beams}")
        if self.num_beams > 1 and self.do_sample:
            raise ConfigError(f"{prefix}num-beams: beam search is deterministic; drop --do-sample or use 1 beam")


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" | "length"
    completion_tokens: int
    prompt_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)  # generated ids, up to and including a final EOS


def render_prompt(row: dict, tokenizer) -> tuple[str, bool]:
    """The prompt text, and whether the tokenizer should add its special tokens (not after a chat template,
    which writes them itself)."""
    if "messages" in row:
        if not tokenizer.chat_template:
            raise ConfigError("--model: the tokenizer has no chat template, so 'messages' rows cannot be rendered")
        return tokenizer.apply_chat_template(row["messages"], tokenize=False, add_generation_prompt=True), False
    return row["prompt"], True


def encode_prompt(row: dict, tokenizer) -> list[int]:
    text, special = render_prompt(row, tokenizer)
    return tokenizer(text, add_special_tokens=special).input_ids


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Cut ``text`` before the earliest stop string (OpenAI semantics: the stop string is not returned)."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    if not hits:
        return text, False
    return text[: min(hits)], True


class Generator:
    """Runs batches of token-id prompts through ``model.generate`` and decodes the results."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.model = loaded.model
        self.tok = loaded.tokenizer
        self.device = next(self.model.parameters()).device

    def eos_ids(self, opts: GenerationOptions) -> list[int]:
        ids = self.model.generation_config.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        if self.tok.eos_token_id is not None and self.tok.eos_token_id not in ids:
            ids.append(self.tok.eos_token_id)
        return ids + [i for i in opts.eos_token_ids if i not in ids]

    def generation_config(self, opts: GenerationOptions):
        from transformers import GenerationConfig

        base = self.model.generation_config
        kwargs = dict(max_new_tokens=opts.max_new_tokens, num_beams=opts.num_beams, eos_token_id=self.eos_ids(opts),
                      pad_token_id=self.tok.pad_token_id, bos_token_id=base.bos_token_id,
                      decoder_start_token_id=base.decoder_start_token_id)
        # temperature 0 means greedy, as in the OpenAI API
        if opts.do_sample and opts.temperature > 0:
            kwargs.update(do_sample=True, temperature=opts.temperature, top_p=opts.top_p, top_k=opts.top_k or None)
        else:
            kwargs.update(do_sample=False)
        if opts.stop:
            kwargs["stop_strings"] = list(opts.stop)
        return GenerationConfig(**kwargs)

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], opts: GenerationOptions, row_limits: list[int] | None = None,
                 streamer=None) -> list[Completion]:
        """One batched ``generate`` call over ``prompts`` (token ids), left-padded; results in input order.

        ``row_limits`` gives each row its own max_new_tokens (the server batches requests that differ in
        max_tokens); ``streamer`` is a transformers streamer that receives each step's (B,) new tokens.
        """
        batch = self.tok.pad({"input_ids": prompts}, return_tensors="pt", padding=True)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        width = batch["input_ids"].shape[1]
        limits = row_limits or [opts.max_new_tokens] * len(prompts)
        criteria = None
        if row_limits and len(set(row_limits)) > 1 and not self.loaded.is_encoder_decoder:
            from transformers import StoppingCriteriaList

            criteria = StoppingCriteriaList([RowMaxNewTokens(limits, width, self.device)])
        config = self.generation_config(GenerationOptions(**{**opts.__dict__, "max_new_tokens": max(limits)}))
        torch.manual_seed(opts.seed)
        out = self.model.generate(**batch, generation_config=config, stopping_criteria=criteria, streamer=streamer,
                                  tokenizer=self.tok if opts.stop else None)
        # (B, prompt_len + new) for decoder-only; (B, 1 + new) for encoder-decoder (starts with the start token)
        new = out[:, 1:] if self.loaded.is_encoder_decoder else out[:, width:]
        eos = set(self.eos_ids(opts))
        return [self._decode(row.tolist()[:n], eos, opts.stop, len(p)) for row, p, n in zip(new, prompts, limits)]

    def can_batch_continuously(self, opts: GenerationOptions) -> bool:
        """transformers' continuous batching covers decoder-only greedy and sampling, not beam search."""
        return not self.loaded.is_encoder_decoder and opts.num_beams == 1 and hasattr(self.model, "generate_batch")

    # no inference_mode here: the scheduler thread updates tensors made on this thread, which inference
    # tensors forbid; generate_batch runs under no_grad itself
    def generate_continuous(self, prompts: list[list[int]], opts: GenerationOptions,
                            max_requests: int = 64) -> list[Completion]:
        """All ``prompts`` through transformers' continuous batching (``generate_batch``): a finished sequence
        leaves the batch at once and a waiting one takes its place, so mixed output lengths waste no steps
        on finished rows the way one static batch does. Stop strings are applied when decoding."""
        import logging

        from transformers.utils import logging as hf_logging

        config = self.generation_config(GenerationOptions(**{**opts.__dict__, "stop": []}))
        torch.manual_seed(opts.seed)
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity(logging.ERROR)  # it logs every scheduler decision at INFO/WARNING
        try:
            out = self.model.generate_batch(prompts, generation_config=config, progress_bar=False,
                                            continuous_batching_config=self._cb_config(prompts, opts, max_requests))
        finally:
            hf_logging.set_verbosity(level)
        results = list(out.values())
        failed = [r for r in results if r.error is not None]
        if failed or len(results) != len(prompts):
            raise RuntimeError(f"continuous batching failed: {failed[0].error if failed else 'missing results'}")
        eos = set(self.eos_ids(opts))
        return [self._decode(list(r.generated_tokens), eos, opts.stop, len(p)) for r, p in zip(results, prompts)]

    @staticmethod
    def _cb_config(prompts: list[list[int]], opts: GenerationOptions, max_requests: int):
        """Size the paged KV cache for this workload. Left to itself, transformers sizes it from free memory,
        which on a CPU host means most of the machine's RAM (seen: 13 GB and an OOM kill)."""
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        page = 64
        per_request = [-(-(len(p) + opts.max_new_tokens) // page) for p in prompts]  # pages, rounded up
        busiest = sum(sorted(per_request, reverse=True)[:max_requests])  # enough for max_requests at once
        return ContinuousBatchingConfig(page_size=page, num_blocks=busiest + 4, max_batch_tokens=2048,
                                        max_requests_per_batch=max_requests)

    def _decode(self, ids: list[int], eos: set[int], stops: list[str], prompt_tokens: int) -> Completion:
        end = next((i for i, t in enumerate(ids) if t in eos), None)
        finish = "stop" if end is not None else "length"
        if end is not None:
            ids = ids[: end + 1]
        text = self.tok.decode(ids[:end] if end is not None else ids, skip_special_tokens=True)
        text, stopped = cut_at_stop(text, stops)
        return Completion(text, "stop" if stopped else finish, len(ids), prompt_tokens, ids)


class RowMaxNewTokens(StoppingCriteria):
    """Stopping criterion giving each batch row its own token budget; transformers pads rows once they stop.

    Written here because GenerationConfig.max_new_tokens is one number for the whole batch.
    """

    def __init__(self, limits: list[int], prompt_width: int, device):
        self.limits = torch.tensor(limits, device=device)
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return (input_ids.shape[1] - self.prompt_width) >= self.limits  # (B,)
