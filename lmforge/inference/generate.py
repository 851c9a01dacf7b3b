"""Batched generation with transformers `generate`: shared by `lmforge generate`, `serve` and `eval`.

A prompt row is ``{"prompt": str}`` (raw text) or ``{"messages": [...]}`` (the chat template is applied with
the generation prompt). Each result has the text, why it stopped (``stop``: an EOS id or a stop string;
``length``: max_new_tokens reached) and how many tokens were generated.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from transformers import StoppingCriteria

from lmforge.errors import ConfigError, UnsupportedError
from lmforge.inference import decode
from lmforge.inference.loading import LoadedModel
from lmforge.inference.options import GenerationOptions


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


def needs_equal_lengths(model) -> bool:
    """Prompt-learning PEFT models (prompt tuning, prefix tuning) must batch only prompts of one token length.

    PEFT prepends the virtual tokens before the left padding and ignores ``position_ids``, so a padded row
    would see its virtual prompt at another distance than the same prompt alone (issue 14): its answer
    would depend on what else shares the batch. Equal-length batches have no padding at all."""
    from peft import PeftModel

    return isinstance(model, PeftModel) and model.active_peft_config.is_prompt_learning


def context_length(model) -> int | None:
    """The most positions ``model`` was built for (``max_position_embeddings``); None where the config names no
    limit (T5's relative positions)."""
    return getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)


def length_batches(lengths: list[int], batch_size: int, equal_lengths: bool = False) -> list[list[int]]:
    """Indices grouped into batches of at most ``batch_size``, longest first (a memory problem shows at
    once, and a batch wastes little on padding); with ``equal_lengths`` a batch never mixes lengths."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        last = batches[-1] if batches else None
        if last is None or len(last) == batch_size or (equal_lengths and lengths[last[0]] != lengths[i]):
            batches.append([i])
        else:
            last.append(i)
    return batches


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Cut ``text`` before the earliest stop string (OpenAI semantics: the stop string is not returned)."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    if not hits:
        return text, False
    return text[: min(hits)], True


class Generator:
    """Runs token-id prompts through lmforge's decode loop or ``model.generate`` and decodes the results."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.model = loaded.model
        self.tok = loaded.tokenizer
        self.device = next(self.model.parameters()).device
        self.equal_lengths = needs_equal_lengths(self.model)

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
        if self.equal_lengths and len({len(p) for p in prompts}) > 1:
            raise ValueError("a prompt-learning adapter needs prompts of one length per batch (length_batches)")
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
        # A prompt-learning PeftModel decodes without a KV cache: PEFT (0.21) looks for the cache under
        # past_key_values, which transformers 5 passes as ``cache``, so with one it prepends the virtual tokens
        # again at every step and its answers drift from its own forward after a few tokens.
        out = self.model.generate(**batch, generation_config=config, stopping_criteria=criteria, streamer=streamer,
                                  tokenizer=self.tok if opts.stop else None,
                                  **({"use_cache": False} if self.equal_lengths else {}))
        # (B, prompt_len + new) for decoder-only; (B, 1 + new) for encoder-decoder (starts with the start token)
        new = out[:, 1:] if self.loaded.is_encoder_decoder else out[:, width:]
        eos = set(self.eos_ids(opts))
        return [self._decode(row.tolist()[:n], eos, opts.stop, len(p)) for row, p, n in zip(new, prompts, limits)]

    def generate_all(self, prompts: list[list[int]], opts: GenerationOptions, batch_size: int | None = None,
                     continuous: bool = True, on_row=None, adapters=None) -> list[Completion]:
        """All ``prompts``, results in input order: through the decode loop with up to ``batch_size`` rows
        decoding at once where it applies (``continuous``), else in ``generate`` batches of ``batch_size``
        (``length_batches``). ``on_row()`` follows each row.
        No ``batch_size``: ``auto_batch_size`` for these prompts. ``adapters``: (an adapter_set.AdapterSet, one
        adapter name or None (the base) per prompt), in the decode loop only."""
        if batch_size is None:
            batch_size = self.auto_batch_size(opts, max((len(p) for p in prompts), default=1))
        if continuous and self.can_batch_continuously(opts):
            return self.generate_continuous(prompts, opts, batch_size, on_row, adapters)
        if adapters is not None:
            raise UnsupportedError("--adapter: needs lmforge's decode loop (continuous batching of a decoder-only "
                                   "model, no beam search)")
        results: list[Completion | None] = [None] * len(prompts)
        done = 0
        for idx in length_batches([len(p) for p in prompts], batch_size, self.equal_lengths):
            seeded = replace(opts, seed=opts.seed + done)
            done += len(idx)
            for i, c in zip(idx, self.generate([prompts[i] for i in idx], seeded)):
                results[i] = c
                if on_row is not None:
                    on_row()
        return results  # type: ignore[return-value]

    def auto_batch_size(self, opts: GenerationOptions, prompt_tokens: int = 256) -> int:
        """The default batch size: what fits a 2 GiB KV cache in the decode loop (at most 256), else 32."""
        if self.can_batch_continuously(opts):
            return decode.auto_batch_size(self.model, prompt_tokens + opts.max_new_tokens)
        return 32

    def can_batch_continuously(self, opts: GenerationOptions) -> bool:
        """lmforge's decode loop covers decoder-only models with full attention, greedy and sampling."""
        return decode.supports(self.model, opts)

    def sequences(self, prompts: list[list[int]], opts: GenerationOptions, handles=None) -> list:
        """Decode-loop sequences for ``prompts``: prompt i samples with seed ``opts.seed + i``, so a seeded
        run gives the same text whatever the batch size."""
        eos = frozenset(self.eos_ids(opts))
        handles = handles if handles is not None else range(len(prompts))
        return [decode.Sequence(p, replace(opts, seed=opts.seed + i), eos, handle=h)
                for i, (p, h) in enumerate(zip(prompts, handles))]

    def generate_continuous(self, prompts: list[list[int]], opts: GenerationOptions, max_batch: int = 64,
                            on_row=None, adapters=None) -> list[Completion]:
        """All ``prompts`` through the decode loop (continuous batching, see lmforge.inference.decode), up to
        ``max_batch`` decoding at once; longest prompts are admitted first. Results in input order.
        ``adapters``: as ``generate_all``; rows of different adapters share batches (row_lora.py)."""
        seqs = self.sequences(prompts, opts)
        rows = None
        if adapters is not None:
            named, names = adapters
            rows = named.rows
            for seq, name in zip(seqs, names):
                seq.adapter = named.get(name) if name is not None else None
        source = decode.from_list(sorted(seqs, key=lambda s: -len(s.prompt)))
        decode.Decoder(self.model, self.tok, max_batch, rows=rows).run(source,
                                                                       on_done=on_row and (lambda seq: on_row()))
        return [self.completion(s) for s in seqs]

    def completion(self, seq) -> Completion:
        return self._decode(seq.ids, seq.eos, seq.opts.stop, len(seq.prompt))

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
