"""lmforge's decode loop for decoder-only models: continuous batching on the model's own forward and KV cache.

Why not transformers ``generate``: it keeps every row of a batch until the longest one ends, so with mixed
output lengths most steps compute rows that have already finished, and a new prompt waits for the whole
batch. Here a finished row leaves the batch at once (its KV cache rows are dropped) and waiting prompts
join as soon as there is room (their prefilled cache is left-padded to the batch's length and concatenated),
so the batch stays full of live rows. The forward pass, the KV cache (``DynamicCache``), the attention masks
and the sampling warpers are transformers' own; lmforge adds the scheduling, a cache for the prompt prefix
all rows share, and an attention function for single decoding tokens with cache layers that write into spare
room (``decode_attention.py``, registered with transformers).

A row may carry an adapter (``Sequence.adapter``, a ``row_lora.RowAdapter``): a LoRA/DoRA adapter changes its
row of every forward (``row_lora.RowLora``); a prompt-tuning adapter puts its virtual tokens' embeddings before
the row's prompt, as PEFT does (the mask counts them, so positions start after them), and is the base model
afterwards: their keys/values are computed once per adapter and start the row's cache, like a shared prefix.

Each sequence samples with its own seeded generator, so a seeded sequence gives the same tokens whatever
else shares its batch. Beam search and encoder-decoder models stay on ``generate`` (see ``supports``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lmforge.inference import llama_step
from lmforge.inference.decode_attention import ATTENTION, attend, new_cache, use_decode_attention
from lmforge.inference.options import GenerationOptions


@dataclass
class Sequence:
    """One prompt in the loop. ``ids`` are its generated tokens (up to and including a final EOS)."""

    prompt: list[int]
    opts: GenerationOptions
    eos: frozenset[int]
    handle: object = None  # the caller's reference (a row index, a server job)
    adapter: object = None  # a row_lora.RowAdapter applied to this row only (Decoder(rows=...)); None: the base
    ids: list[int] = field(default_factory=list)
    finished: bool = False
    generator: torch.Generator | None = None
    logprobs: list[float] = field(default_factory=list)  # per token in ``ids``, with ``Decoder(logprobs=True)``
    head: object = None  # the per-layer keys/values its cache starts with (a shared prompt prefix), if any

    def sampling_key(self) -> tuple:
        o = self.opts
        return (o.temperature, o.top_k, o.top_p) if o.do_sample and o.temperature > 0 else ()


# source(n, wait) hands out up to n new sequences: [] = none right now (ask again later), None = no more will
# come. wait is True when nothing is decoding, so the source may block for a while instead of returning [].
Source = Callable[[int, bool], "list[Sequence] | None"]


def from_list(seqs: list[Sequence]) -> Source:
    """A source handing out ``seqs`` in order, as many as there is room for, then None."""
    waiting = list(seqs)

    def source(n: int, wait: bool):
        if not waiting:
            return None
        taken = waiting[:n]
        del waiting[:n]
        return taken

    return source


MIN_PREFIX = 8  # shorter shared prompt prefixes are prefilled with the rest
PREFIX_ADAPTERS = 8  # adapters whose keys/values of the shared prefix are kept
TRIM = 16  # leading all-padding cache positions worth a copy to drop


def supports(model, opts: GenerationOptions | None = None) -> bool:
    """Decoder-only models whose cache is plain full attention (merging caches needs every layer alike),
    not wrapped by PEFT (prompt tuning prepends virtual tokens inside its own generate), no beam search."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    if model.config.is_encoder_decoder or hasattr(model, "peft_config") or (opts is not None and opts.num_beams > 1):
        return False
    try:
        cache = DynamicCache(config=model.config)
    except Exception:  # models with caches of their own kind (state-space, hybrid)
        return False
    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)


def auto_batch_size(model, tokens_per_row: int, budget_bytes: int = 2 << 30, most: int = 256) -> int:
    """Rows to decode at once: as many as fit ``budget_bytes`` of KV cache at ``tokens_per_row``, at most
    ``most`` (on the 135M model, 256 prompts: 256 rows 743 tok/s, 128 rows 653, 96 rows 617; measured)."""
    cfg = model.config.get_text_config(decoder=True)
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * cfg.num_hidden_layers * heads * head_dim * next(model.parameters()).element_size()
    return max(1, min(most, budget_bytes // (per_token * max(1, tokens_per_row))))


class Decoder:
    """Runs sequences from a source to the end, keeping up to ``max_batch`` of them decoding together.

    New sequences are admitted when a quarter of the slots are free (or the batch is empty): admitting
    costs one prefill and a copy of the cache, so it is done for several sequences at once.
    """

    def __init__(self, model, tokenizer, max_batch: int = 64, prefill_tokens: int = 8192, logprobs: bool = False,
                 rows=None):
        self.model, self.tokenizer = model, tokenizer
        self.rows = rows  # a row_lora.RowLora: each sequence's adapter applied to its row of every forward
        # keep each sampled token's log-prob under the temperature-scaled distribution, before top-k/top-p (what
        # a training forward at that temperature computes: GRPO logs their mismatch)
        self.logprobs = logprobs
        use_decode_attention(model)
        self.device = next(model.parameters()).device
        self.max_batch = max_batch
        self.prefill_tokens = prefill_tokens  # padded tokens per prefill forward (bounds its activations)
        self.steps = 0  # decode forwards run (for tests and logs)
        self.peak = 0  # most rows decoding at once
        # (tokens, {adapter (None: the base): per-layer (keys, values)}) of the last shared prompt prefix; a
        # prompt-tuning adapter's keys/values hold its virtual tokens first
        self._prefix = None
        self._virtual: dict = {}  # {prompt-tuning adapter: per-layer (keys, values) of its virtual tokens alone}
        self._shared = None  # (the kept prefix's head, its per-layer (keys, values) (kv, P, dim)): _shared_rows
        self.fast = None  # the decode steps' forward for this run: a llama_step.LlamaStep, or None (the model's)

    @torch.inference_mode()
    def run(self, source: Source, on_token: Callable[[Sequence, int], None] | None = None,
            on_done: Callable[[Sequence], None] | None = None) -> None:
        live: list[Sequence] = []
        state = None  # (cache, attention mask (B, L), next positions (B,), last tokens (B,))
        exhausted = False
        # built per run (weights packed anew): a model trained between runs (GRPO) is decoded with its new weights
        self.fast = llama_step.build(self.model, attend) \
            if self.model.config._attn_implementation == ATTENTION and self.rows is None else None
        while True:
            free = self.max_batch - len(live)
            if not exhausted and (not live or free >= max(1, self.max_batch // 4)):
                new = source(free, not live)
                if new is None:
                    exhausted = True
                elif new:
                    for seq in new:
                        seq.generator = torch.Generator(device=self.device).manual_seed(seq.opts.seed)
                    live, state = self._admit(live, state, new, on_token, on_done)
            if not live:
                if exhausted:
                    return
                continue  # the source had nothing yet (it waited inside source())
            live, state = self._step(live, state, on_token, on_done)

    # ------------------------------------------------------------------------------------- internals
    def _forward(self, seqs: list[Sequence], input_ids, mask, positions, cache, last_only: bool):
        """The model's forward over the rows of ``seqs`` (each with its own adapter); last-position logits."""
        with self._adapters([s.adapter for s in seqs]):
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                             use_cache=True, logits_to_keep=_last(input_ids) if last_only else 0)
        return out.logits[:, -1, :]  # in the model's dtype: _pick casts only what it samples from

    def _adapters(self, adapters: list):
        if self.rows is None:
            if any(a is not None for a in adapters):
                raise ValueError("a sequence names an adapter, but this Decoder has no rows=RowLora")
            return contextlib.nullcontext()
        return self.rows.rows(adapters)

    def _prefill(self, seqs: list[Sequence]):
        """Prefill of ``seqs``: each row's cache starts with its head (the shared prefix, after the adapter's
        virtual tokens if it has any: ``_heads``), the rest is left-padded in chunks of about ``prefill_tokens``
        padded tokens; rows of one chunk have heads of one length (``_admit`` orders them so). Returns one
        (cache, mask, next positions) per chunk and the last-position logits of all rows."""
        prefix = self._shared_prefix(seqs)
        n = len(prefix[0]) if prefix else 0
        heads = [prefix[1][s.adapter] if prefix else self._virtual_head(s.adapter) for s in seqs]
        for s, head in zip(seqs, heads):
            s.head = head
        sizes = [h[0][0].shape[2] if h else 0 for h in heads]  # cached positions before each row's rest
        parts, logits = [], []
        start = 0
        while start < len(seqs):
            end, width = start + 1, len(seqs[start].prompt) - n
            while end < len(seqs) and sizes[end] == sizes[start] and \
                    (end + 1 - start) * max(width, len(seqs[end].prompt) - n) <= self.prefill_tokens:
                width = max(width, len(seqs[end].prompt) - n)
                end += 1
            chunk, h = seqs[start:end], sizes[start]
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), h + width, dtype=torch.long)
            mask[:, :h] = 1
            for i, s in enumerate(chunk):
                rest = s.prompt[n:]
                ids[i, width - len(rest):] = torch.tensor(rest)
                mask[i, h + width - len(rest):] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            cache = new_cache(self.model)
            if h:
                _prefix_rows(cache, heads[start:end])
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, h:]  # virtual tokens count: as PEFT's mask does
            logits.append(self._forward(chunk, ids, mask, positions, cache, last_only=True))
            parts.append((cache, mask, mask.sum(-1)))
            start = end
        return parts, torch.cat(logits)

    def _shared_prefix(self, seqs: list[Sequence]):
        """The (tokens, {adapter: per-layer keys/values}) of a prefix every prompt of ``seqs`` starts with, or None.

        Why: chat prompts repeat the same system prompt and template head (SmolLM2's default system prompt
        is 30 of about 40 tokens); computing it once and reusing its keys/values saves most of the prefill.
        The last prefix is kept, so requests arriving one by one reuse the one found in an earlier group. Its
        keys/values depend on the adapter: they are kept per adapter (the rows' adapters missing are computed
        together: ``_heads``), so rows of several adapters are prefilled together.
        """
        shortest = min(len(s.prompt) for s in seqs)
        kept = self._prefix
        if not (kept and len(kept[0]) < shortest and all(s.prompt[:len(kept[0])] == kept[0] for s in seqs)):
            if len(seqs) < 2:
                return None
            n = 0
            first = seqs[0].prompt
            while n < shortest - 1 and all(s.prompt[n] == first[n] for s in seqs):
                n += 1
            if n < MIN_PREFIX:
                return None
            kept = self._prefix = (first[:n], {})
        tokens, by_adapter = kept
        missing = list(dict.fromkeys(s.adapter for s in seqs if s.adapter not in by_adapter))
        if missing:
            by_adapter.update(self._heads(missing, tokens))
            _forget(by_adapter, {s.adapter for s in seqs})
        return kept

    def _virtual_head(self, adapter):
        """The keys/values of a prompt-tuning adapter's virtual tokens alone (kept), None for other adapters."""
        if not _virtual(adapter):
            return None
        if adapter not in self._virtual:
            self._virtual.update(self._heads([adapter], []))
            _forget(self._virtual, {adapter})
        return self._virtual[adapter]

    def _heads(self, adapters: list, tokens: list[int]) -> dict:
        """{adapter: per-layer (keys, values) of ``tokens`` (1, heads, positions, dim)}, after the adapter's virtual
        tokens for a prompt-tuning adapter (at positions 0..N-1, as PEFT puts them). The adapters without virtual
        tokens go in one forward, each prompt-tuning adapter in its own (their lengths differ)."""
        plain = [a for a in adapters if not _virtual(a)]
        out = {}
        for group in ([plain] if plain else []) + [[a] for a in adapters if _virtual(a)]:
            ids = torch.tensor([tokens] * len(group), dtype=torch.long, device=self.device).view(len(group), -1)
            inputs = {"input_ids": ids}
            if _virtual(group[0]):  # PEFT's forward: cat(virtual embeddings, the prompt's input embeddings)
                embeds = self.model.get_input_embeddings()(ids)
                inputs = {"inputs_embeds": torch.cat([group[0].virtual.to(embeds.dtype)[None], embeds], dim=1)}
            first = next(iter(inputs.values()))
            m = first.shape[1]
            cache = new_cache(self.model)
            with self._adapters(group):
                self.model(**inputs, position_ids=torch.arange(m, device=self.device).expand(len(group), -1),
                           past_key_values=cache, use_cache=True, logits_to_keep=_last(first))
            for i, adapter in enumerate(group):
                out[adapter] = [(layer.keys[i:i + 1, :, :m], layer.values[i:i + 1, :, :m]) for layer in cache.layers]
        return out

    def _admit(self, live, state, new, on_token, on_done):
        new = sorted(new, key=lambda s: _virtual(s.adapter))  # rows with heads of one length prefill together
        parts, logits = self._prefill(new)
        firsts = self._pick(new, logits).split([mask.shape[0] for _, mask, _ in parts])
        states = ([state] if state is not None else []) + [(*p, t) for p, t in zip(parts, firsts)]
        return self._advance(live + new, _merge(states), on_token, on_done, fresh=len(new))

    def _step(self, live, state, on_token, on_done):
        cache, mask, positions, last = state
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        if self.fast is not None:
            logits = self.fast(last, positions, mask, cache, self._shared_rows(live))
        else:
            logits = self._forward(live, last[:, None], mask, positions[:, None], cache, last_only=False)
        self.steps += 1
        self.peak = max(self.peak, len(live))
        state = (cache, mask, positions + 1, self._pick(live, logits))
        return self._advance(live, state, on_token, on_done, fresh=len(live))

    def _advance(self, live, state, on_token, on_done, fresh: int):
        """Record the newest token (the state's last tokens) of the last ``fresh`` rows, finish the rows that
        are done, and drop them from the batch."""
        values = state[3].tolist()
        keep = []
        for i, seq in enumerate(live):
            if i >= len(live) - fresh:
                token = values[i]
                seq.ids.append(token)
                if on_token is not None:
                    on_token(seq, token)
                if token in seq.eos or len(seq.ids) >= seq.opts.max_new_tokens or self._hit_stop(seq):
                    seq.finished = True
                    if on_done is not None:
                        on_done(seq)
            if not seq.finished:
                keep.append(i)
        if len(keep) == len(live):
            return live, state
        if not keep:
            return [], None
        order = _fill_holes(keep)
        return [live[i] for i in order], _select(state, order)

    def weights_changed(self) -> None:
        """Drop what was computed from the model's weights and kept between runs (the shared prompt prefix's and the
        prompt-tuning adapters' keys/values): for a model trained between runs (GRPO's rollouts)."""
        self._prefix, self._virtual, self._shared = None, {}, None

    def _shared_rows(self, live: list[Sequence]):
        """(per layer (keys, values) (kv, P, dim), rows (B,) bool) of the kept shared prompt prefix and the rows whose
        caches start with it, for the decode step's attention to read it once for all of them; None when no row does.

        Why: chat prompts share their system prompt and template head (30 of ~40 tokens for SmolLM2), and every row
        holds a copy; the one-token attention is memory-bound, and reading one copy that stays in the CPU's cache
        instead of each row's cuts its traffic by that share (measured on the AMX kind: see docs/inference.md).
        """
        head = self._prefix[1].get(None) if self._prefix else None
        rows = [s.head is head for s in live] if head is not None else []
        if not any(rows):
            return None
        if self._shared is None or self._shared[0] is not head:
            self._shared = (head, [(k[0], v[0]) for k, v in head])
        return self._shared[1], torch.tensor(rows, device=self.device)

    def _hit_stop(self, seq: Sequence) -> bool:
        """Whether the text generated so far contains a stop string; decoding a tail of tokens is enough
        (a character is at most 4 byte-level tokens)."""
        if not seq.opts.stop:
            return False
        longest = max(len(s) for s in seq.opts.stop)
        tail = self.tokenizer.decode(seq.ids[-(4 * longest + 2):], skip_special_tokens=True)
        return any(s in tail for s in seq.opts.stop if s)

    def _pick(self, seqs: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        """Next token per row: argmax for greedy rows; for sampling rows transformers' temperature, top-k and
        top-p warpers (per group of equal settings), then a draw from the row's own generator."""
        from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                             TopPLogitsWarper)

        # greedy on the model-dtype logits (the cast to float32 is exact, so the same pick)
        tokens = _first_max(logits)
        logits = logits.float() if any(s.sampling_key() for s in seqs) or self.logprobs else logits
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(seqs):
            key = s.sampling_key()
            if key:
                groups.setdefault(key, []).append(i)
        for (temperature, top_k, top_p), rows in groups.items():
            idx = torch.tensor(rows, device=logits.device)
            scores = TemperatureLogitsWarper(temperature)(None, logits[idx])
            if top_k:
                scores = TopKLogitsWarper(top_k)(None, scores)
            if top_p < 1.0:
                scores = TopPLogitsWarper(top_p)(None, scores)
            # inverse-CDF draws, one uniform from each row's own generator: torch.multinomial draws an exponential
            # per vocabulary entry (measured: 0.9 ms a row at 49k entries, 15% of a GRPO rollout)
            cdf = scores.softmax(-1).double().cumsum(-1)  # float64: no mass lost over a long vocabulary
            draws = torch.cat([torch.rand(1, generator=seqs[row].generator, dtype=torch.float64, device=logits.device)
                               for row in rows])
            picked = torch.searchsorted(cdf, (draws * cdf[:, -1])[:, None], right=True)[:, 0]
            tokens[idx] = picked.clamp(max=cdf.shape[1] - 1)
        if self.logprobs:
            temperature = torch.tensor([s.sampling_key()[0] if s.sampling_key() else 1.0 for s in seqs],
                                       device=logits.device)
            chosen = (logits / temperature[:, None]).log_softmax(-1).gather(1, tokens[:, None])[:, 0].tolist()
            for seq, value in zip(seqs, chosen):
                seq.logprobs.append(value)
        return tokens


def _first_max(logits: torch.Tensor) -> torch.Tensor:
    """Each row's first maximal index of (rows, vocab) ``logits``, as ``logits.max(-1).indices``, in two passes.

    Why: ``max`` returns the first maximal index as ``argmax`` does, about 4x faster on CPU (2.4 vs 9.3 ms at 140 x
    49152), but ``amax`` (no index) is faster still (2.5 vs 6.7 ms at 256 x 49152 bf16, AMX kind). So: the maxima of
    chunks of the vocabulary by ``amax``, the first chunk holding the row's maximum, then ``max`` inside that chunk.
    """
    rows, vocab = logits.shape
    chunk = next((c for c in (1024, 512, 256) if vocab % c == 0 and vocab > c), None)
    if chunk is None:
        return logits.max(-1).indices
    chunks = logits.reshape(rows, vocab // chunk, chunk)
    which = chunks.amax(-1).max(-1).indices  # (rows,): the first chunk holding the row's maximum
    return which * chunk + chunks[torch.arange(rows, device=logits.device), which].max(-1).indices


def _last(input_ids: torch.Tensor) -> torch.Tensor:
    """``logits_to_keep`` for the last position only, as an index tensor rather than the int 1.

    Why: with the int, transformers slices the hidden states (``[:, -1:, :]``), a non-contiguous (B, 1, C) view
    for a prefill; torch's matmul then cannot fold it into one matrix product and expands the LM head's weight to
    a (B, C, vocab) batch, copied for every prompt (measured, torch 2.13 bf16: 2.4 s instead of 6 ms at B=32 on
    the 135M model). Indexing with a tensor gives a contiguous copy of just the last positions.
    """
    return torch.tensor([input_ids.shape[1] - 1], device=input_ids.device)


def _virtual(adapter) -> int:
    """How many virtual tokens a row's adapter puts before its prompt (prompt tuning; 0 for the others)."""
    virtual = getattr(adapter, "virtual", None)
    return 0 if virtual is None else virtual.shape[0]


def _forget(kept: dict, used: set) -> None:
    """Drop the oldest of ``kept``'s adapters beyond PREFIX_ADAPTERS, never those ``used`` (a kept key holds an
    adapter's weights alive)."""
    for adapter in [a for a in kept if a not in used][:max(0, len(kept) - PREFIX_ADAPTERS)]:
        del kept[adapter]


def _prefix_rows(cache, heads: list) -> None:
    """Start ``cache`` with each row's head keys/values (one for every row: a view, no copy)."""
    if all(h is heads[0] for h in heads):
        for layer, (k, v) in zip(cache.layers, heads[0]):
            layer.update(k.expand(len(heads), -1, -1, -1), v.expand(len(heads), -1, -1, -1))
        return
    for li, layer in enumerate(cache.layers):
        layer.update(torch.cat([h[li][0] for h in heads]), torch.cat([h[li][1] for h in heads]))


def _fill_holes(keep: list[int]) -> list[int]:
    """The new row order once only rows ``keep`` (ascending) stay: each row that left the first ``len(keep)``
    slots is filled by a staying row from beyond them, the others keep their slot. E.g. keep [0, 2, 3, 5] of 6
    rows -> [0, 5, 2, 3]."""
    n = len(keep)
    holes = sorted(set(range(n)) - set(keep))
    order = list(range(n))
    for hole, row in zip(holes, [i for i in keep if i >= n]):
        order[hole] = row
    return order


def _select(state, order: list[int]):
    """The batch state of rows ``order`` (``_fill_holes``: each row stays in its slot or moves to a lower one);
    drop leading positions that are padding in every row once there are many (``TRIM``: it costs a copy of
    the cache).

    Why not ``batch_select_indices``: it copies the whole cache whenever a row ends, which with outputs of
    mixed lengths is most steps (measured on the AMX kind: 10% of the benchmark's time). Here only the rows
    moving into a hole are copied, and the buffers are cut to the first ``len(order)`` rows by a view.
    """
    cache, mask, positions, last = state
    idx = torch.tensor(order, dtype=torch.long, device=mask.device)
    mask = mask[idx]
    moved = [(slot, row) for slot, row in enumerate(order) if slot != row]
    to = torch.tensor([slot for slot, _ in moved], dtype=torch.long, device=mask.device)
    src = torch.tensor([row for _, row in moved], dtype=torch.long, device=mask.device)
    for layer in cache.layers:
        for name in ("keys", "values"):
            t = getattr(layer, name)
            if moved:
                t[to] = t[src]
            setattr(layer, name, t[:len(order)])
    real = mask.any(0).nonzero()
    first = int(real[0]) if len(real) else 0
    if first >= TRIM:
        mask = mask[:, first:]
        for layer in cache.layers:
            layer.keys = layer.keys[:, :, first:].contiguous()
            layer.values = layer.values[:, :, first:].contiguous()
            layer.n -= first
    return cache, mask, positions[idx], last[idx]


def _merge(states: list[tuple]):
    """Concatenate batch states along the batch: each is left-padded (cache and mask) to the longest."""
    if len(states) == 1:
        return states[0]
    width = max(s[1].shape[1] for s in states)  # masks are as wide as the written cache positions
    target = states[0][0]
    rows = sum(s[1].shape[0] for s in states)
    for li, layer in enumerate(target.layers):
        parts = [cache.layers[li] for cache, _, _, _ in states]
        for name in ("keys", "values"):
            like = getattr(parts[0], name)
            out = like.new_zeros(rows, like.shape[1], width + layer.SPARE, like.shape[3])
            row = 0
            for part in parts:
                t = getattr(part, name)
                out[row:row + t.shape[0], :, width - part.n:width] = t[:, :, :part.n]
                row += t.shape[0]
            setattr(layer, name, out)
        layer.n = width
    masks = [torch.cat([m.new_zeros(m.shape[0], width - m.shape[1]), m], dim=1) for _, m, _, _ in states]
    return (target, torch.cat(masks), torch.cat([s[2] for s in states]), torch.cat([s[3] for s in states]))
