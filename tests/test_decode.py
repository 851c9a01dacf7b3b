"""lmforge's decode loop (continuous batching) on the tiny model: equal to plain transformers token for
token while rows leave and join the batch, seeded sampling independent of the batch, stops, limits."""

from __future__ import annotations

import pytest
import torch
from test_generate import PROMPTS, assert_greedy

from lmforge.inference import decode, decode_attention, llama_step
from lmforge.inference.generate import GenerationOptions, Generator, encode_prompt
from lmforge.inference.loading import load_for_inference

ROWS = PROMPTS + [{"prompt": w} for w in ("zebra crossing", "one two three four five six", "x", "record 12 name",
                                          "the lazy dog sleeps under a tree in the warm afternoon sun", "json")]


@pytest.fixture(scope="module")
def loaded(sharp_model_dir):
    return load_for_inference(str(sharp_model_dir), dtype="float32")


def _run(loaded, prompts, opts, max_batch, decoder=None):
    gen = Generator(loaded)
    seqs = gen.sequences(prompts, opts)
    waiting = list(seqs)
    taken = []

    def source(n, wait):
        if not waiting:
            return None
        take = waiting[: min(n, 3)]  # at most 3 join at a time, so joins happen mid-decode
        del waiting[: len(take)]
        taken.append(len(take))
        return take

    decoder = decoder or decode.Decoder(loaded.model, loaded.tokenizer, max_batch)
    decoder.run(source)
    return [gen.completion(s) for s in seqs], decoder, taken


def test_greedy_equals_plain_transformers_while_rows_leave_and_join(loaded, sharp_model_dir):
    assert decode.supports(loaded.model)
    prompts = [encode_prompt(r, loaded.tokenizer) for r in ROWS]
    ours, decoder, taken = _run(loaded, prompts, GenerationOptions(max_new_tokens=14), max_batch=4)
    ref = [c.token_ids for c in ours]
    assert_greedy(sharp_model_dir, prompts, ref)  # plain transformers' greedy choices, up to near-ties
    assert all(len(r) == 14 or r[-1] == loaded.tokenizer.eos_token_id for r in ref)
    assert len(taken) > 2 and decoder.peak == 4  # rows joined in several waves; the batch filled up
    assert decoder.fast is not None  # the decode steps ran llama_step's forward
    # per-row limits: every row stops at its own max_new_tokens, the others go on unaffected
    limited = Generator(loaded).sequences(prompts, GenerationOptions(max_new_tokens=14))
    for i, s in enumerate(limited):
        s.opts.max_new_tokens = 2 + i % 5
    waiting = list(limited)
    decode.Decoder(loaded.model, loaded.tokenizer, 3).run(
        lambda n, wait: [waiting.pop(0) for _ in range(min(n, len(waiting)))] or None)
    assert [s.ids for s in limited] == [r[: 2 + i % 5] for i, r in enumerate(ref)]


def test_shared_prompt_prefix_is_computed_once_and_changes_nothing(loaded, sharp_model_dir):
    system = {"role": "system", "content": "You are a careful assistant who extracts records as JSON."}
    rows = [{"messages": [system, {"role": "user", "content": text}]}
            for text in ("name bob age 3", "alpha", "the quick brown fox jumps", "x y", "record 12", "json please")]
    prompts = [encode_prompt(r, loaded.tokenizer) for r in rows]
    ours, decoder, taken = _run(loaded, prompts, GenerationOptions(max_new_tokens=12), max_batch=4)
    assert decoder._prefix is not None and len(decoder._prefix[0]) >= 10  # the system turn was shared
    assert all(p[: len(decoder._prefix[0])] == decoder._prefix[0] for p in prompts)
    assert_greedy(sharp_model_dir, prompts, [c.token_ids for c in ours])
    # a single prompt that starts with the kept prefix reuses it (requests arriving one by one in a server)
    used = []
    find = decoder._shared_prefix
    decoder._shared_prefix = lambda seqs: used.append(find(seqs)) or used[-1]
    single, _, _ = _run(loaded, prompts[1:2], GenerationOptions(max_new_tokens=12), 4, decoder)
    assert used and used[0] is decoder._prefix
    assert single[0].token_ids == ours[1].token_ids


def test_seeded_sampling_does_not_depend_on_the_batch(loaded):
    prompts = [encode_prompt(r, loaded.tokenizer) for r in ROWS]
    opts = GenerationOptions(max_new_tokens=10, do_sample=True, temperature=1.5, top_p=0.9, top_k=40, seed=3)
    alone = [c.token_ids for c in _run(loaded, prompts, opts, max_batch=1)[0]]
    together = [c.token_ids for c in _run(loaded, prompts, opts, max_batch=5)[0]]
    again = [c.token_ids for c in _run(loaded, prompts, opts, max_batch=5)[0]]
    other = [c.token_ids for c in _run(loaded, prompts, GenerationOptions(**{**opts.__dict__, "seed": 4}), 5)[0]]
    greedy = [c.token_ids for c in _run(loaded, prompts, GenerationOptions(max_new_tokens=10), 5)[0]]
    assert alone == together == again
    assert together != other and together != greedy
    top1 = GenerationOptions(max_new_tokens=10, do_sample=True, temperature=0.7, top_k=1, seed=9)
    assert [c.token_ids for c in _run(loaded, prompts, top1, 5)[0]] == greedy  # top-k 1 leaves only the argmax


def test_stop_strings_and_extra_eos_end_rows_early(loaded):
    gen = Generator(loaded)
    prompts = [encode_prompt(r, loaded.tokenizer) for r in ROWS[:4]]
    full = gen.generate_continuous(prompts, GenerationOptions(max_new_tokens=16), max_batch=4)
    assert all(c.finish_reason == "length" for c in full)
    stop = full[0].text[3:5]
    cut = gen.generate_continuous(prompts, GenerationOptions(max_new_tokens=16, stop=[stop]), max_batch=4)
    assert cut[0].text == full[0].text[: full[0].text.find(stop)] and cut[0].finish_reason == "stop"
    assert cut[0].completion_tokens < full[0].completion_tokens  # decoding stopped, not just the text cut
    first = full[1].token_ids[0]
    eos = gen.generate_continuous(prompts, GenerationOptions(max_new_tokens=16, eos_token_ids=[first]), max_batch=4)
    assert (eos[1].text, eos[1].finish_reason, eos[1].completion_tokens) == ("", "stop", 1)


def test_bf16_model_runs_and_beam_search_is_left_to_generate(tiny_model_dir):
    loaded = load_for_inference(str(tiny_model_dir), dtype="bfloat16")
    assert not decode.supports(loaded.model, GenerationOptions(num_beams=2))
    out = Generator(loaded).generate_all([[5, 6, 7], [8]], GenerationOptions(max_new_tokens=5), batch_size=2)
    assert [c.completion_tokens for c in out] and all(1 <= c.completion_tokens <= 5 for c in out)
    assert next(loaded.model.parameters()).dtype == torch.bfloat16


def test_rows_that_stay_fill_the_slots_of_rows_that_left():
    # only rows from beyond the kept count move (into the holes), the others keep their slot: worked by hand
    assert decode._fill_holes([0, 2, 3, 5]) == [0, 5, 2, 3]
    assert decode._fill_holes([1, 2]) == [2, 1]
    assert decode._fill_holes([0, 1, 2]) == [0, 1, 2]


def left_padded_batch(loaded, n: int = 3):
    """(decoder, sequences, batch state (cache, mask, positions, last tokens)) of ``ROWS[:n]`` prefilled, left-padded
    and merged as the decode loop does, ready for decode steps."""
    decoder = decode.Decoder(loaded.model, loaded.tokenizer, 4)
    seqs = [decode.Sequence(encode_prompt(r, loaded.tokenizer), GenerationOptions(), frozenset()) for r in ROWS[:n]]
    parts, logits = decoder._prefill(seqs)
    firsts = logits.max(-1).indices.split([m.shape[0] for _, m, _ in parts])
    return decoder, seqs, decode._merge([(*p, t) for p, t in zip(parts, firsts)])


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_llama_step_equals_the_model_forward(sharp_model_dir, dtype):
    # decode steps over a left-padded batch: the joint-matmul (bf16: oneDNN-packed) step, its elementwise work as torch
    # ops and the attention as batched matmuls, gives the transformers forward's logits and cache, bitwise
    import copy

    loaded = load_for_inference(str(sharp_model_dir), dtype=dtype)
    step = llama_step.build(loaded.model, decode_attention.attend_matmul, fused=False)
    assert step is not None and step.head.packed == (dtype == "bfloat16" and llama_step.packs(torch.bfloat16))
    with torch.inference_mode():
        decoder, seqs, (cache, mask, positions, last) = left_padded_batch(loaded)
        ours = copy.deepcopy(cache)
        for _ in range(3):
            mask = torch.cat([mask, mask.new_ones(len(seqs), 1)], dim=1)
            ref = decoder._forward(seqs, last[:, None], mask, positions[:, None], cache, last_only=False)
            assert torch.equal(step(last, positions, mask, ours), ref)
            positions, last = positions + 1, ref.max(-1).indices
        assert all(torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
                   for a, b in zip(ours.layers, cache.layers))
    assert llama_step.build(torch.nn.Module(), decode_attention.attend) is None  # anything not Llama's keeps its own forward


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prefill_attention_on_grouped_heads_equals_transformers_sdpa(loaded, dtype):
    # a masked prefill with 2 query heads per key/value head: torch's SDPA on the grouped heads gives transformers'
    # SDPA (which repeats the key/value heads first), bitwise
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    attn = loaded.model.model.layers[0].self_attn
    assert attn.num_key_value_groups == 2
    torch.manual_seed(0)
    q = torch.randn(3, 4, 5, 8, dtype=dtype)
    k, v = torch.randn(2, 3, 2, 7, 8, dtype=dtype)
    mask = torch.ones(3, 1, 5, 7, dtype=torch.bool).tril(2)  # causal, the query 2 positions after the keys' start
    mask[0, ..., :2] = False  # row 0 left-padded by 2
    ours = decode_attention.decode_attention(attn, q, k, v, mask, scaling=0.3)[0]
    assert torch.equal(ours, sdpa_attention_forward(attn, q, k, v, mask, scaling=0.3)[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_one_token_attention_is_eager_attention_on_grouped_heads(dtype):
    # decode_attention.attend_matmul (scores as key @ q^T, read transposed) equals transformers' eager arithmetic on
    # repeated key/value heads: scores q @ k^T in the model dtype, scaled and masked in float32, softmax, then @ v.
    # Bitwise in bf16; in float32 the products of one query row (eager) and of a group's rows (here) may round apart
    # in the last bit
    torch.manual_seed(0)
    batch, kv, group, positions, dim = 5, 2, 3, 37, 16
    q = torch.randn(batch, kv, group, dim, dtype=dtype)
    k, v = torch.randn(2, batch, kv, positions, dim, dtype=dtype)
    bias = torch.zeros(batch, 1, 1, positions).masked_fill_(torch.rand(batch, 1, 1, positions) < 0.3, float("-inf"))
    bias[..., -1] = 0.0  # every row attends to its newest position
    ours = decode_attention.attend_matmul(q, k, v, bias.clone(), 0.125)
    heads = q.reshape(batch, kv * group, 1, dim)
    keys, values = (t.repeat_interleave(group, dim=1) for t in (k, v))
    scores = torch.matmul(heads, keys.transpose(-1, -2)).float() * 0.125 + bias
    ref = torch.matmul(scores.softmax(-1).to(dtype), values).reshape(batch, kv, group, dim)
    same = torch.equal if dtype == torch.bfloat16 else lambda a, b: torch.allclose(a, b, rtol=1e-6, atol=1e-6)
    assert same(ours, ref)
    assert torch.equal(decode_attention.attend_matmul(q, k, v, bias == 0, 0.125), ours)  # a boolean mask: the same


def test_greedy_pick_is_the_first_maximal_index():
    # ties inside a chunk, across chunks, and in the last chunk; a vocabulary no chunk divides; bf16 and float32
    torch.manual_seed(0)
    for vocab, dtype in ((4096, torch.bfloat16), (4096, torch.float32), (1000, torch.bfloat16)):
        logits = torch.randint(-50, 8, (64, vocab)).to(dtype)  # few distinct values: many rows tie at their maximum
        logits[0, [i % vocab for i in (1500, 3500, 2000)]] = 20.0  # row 0: maxima in chunks 1 and 3 of 1024
        logits[1, -3:] = 30.0  # row 1: the maximum only in the last chunk
        logits[2] = 1.0  # row 2: all equal
        assert torch.equal(decode._first_max(logits), logits.max(-1).indices)
    assert decode._first_max(logits)[2] == 0
