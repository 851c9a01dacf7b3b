"""Preference data (DPO, ORPO, KTO, reward models): prompt / chosen / rejected turned into token ids, written once.

Each side is rendered exactly as SFT renders it (``tokenize.Encoder``): message lists go through the chat
template, a string prompt with message-list answers becomes a user turn (and vice versa), and plain strings
are raw text with BOS/EOS, like prompt/completion SFT rows. The completion of a side is the span SFT would
put loss on (the assistant turn up to and including its EOS); everything before it is the prompt.

Records are pre-tokenised in the column layout TRL's collators read, so TRL never re-tokenises and the
chat template cannot be applied twice or differently:
  dpo / orpo  {"prompt_ids", "chosen_ids", "rejected_ids"}
  reward      {"prompt_ids", "chosen_ids", "rejected_ids", "margin"}   (the collator joins prompt and
                                                          answer: ``reward_sequences``)
  kto         {"prompt_ids", "completion_ids", "label"}   (a preference row gives one desirable and one
                                                          undesirable record)

Truncation (counted in ``Stats``): a prompt longer than ``data.max_prompt_length`` keeps its last tokens
(the generation prompt must stay next to the answer); then an answer that does not fit ``data.max_length``
after its prompt is cut at the end; a prompt that alone fills ``max_length`` drops the row.
"""

from __future__ import annotations

from lmforge.data.packing import PACKED_ATTENTION, shared_prompt_mask
from lmforge.data.tokenize import IGNORE, Encoder
from lmforge.errors import DataError
from lmforge.registry import PAIR_METHODS

VERSION = "1"  # part of the cache fingerprint: bump when the encoding below changes
PREFERENCE_METHODS = PAIR_METHODS  # the methods that read these records (registry.py)


def _as_messages(value, role: str) -> list[dict]:
    return value if isinstance(value, list) else [{"role": role, "content": value}]


def encode_side(enc: Encoder, prompt, completion) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of one prompt + answer, split where SFT's loss mask starts and ends."""
    if isinstance(prompt, list) or isinstance(completion, list) or enc.apply_chat_template:
        e = enc.chat(_as_messages(prompt, "user") + _as_messages(completion, "assistant"))
    else:
        e = enc.prompt_completion(prompt, completion)
    loss = [t for t, label in enumerate(e.labels) if label != IGNORE]
    if not loss:
        raise DataError("the answer renders to no loss-carrying tokens (is it an assistant turn?)")
    first, last = loss[0], loss[-1]
    # tokens after the last loss token (e.g. the newline a chat template puts after EOS) are not part of the answer
    return e.input_ids[:first], e.input_ids[first:last + 1]


def _fit(prompt: list[int], answers: list[list[int]], max_length: int, max_prompt_length: int | None, stats):
    """Apply max_prompt_length / max_length; returns (prompt, answers) or None when nothing of an answer fits."""
    if max_prompt_length and len(prompt) > max_prompt_length:
        prompt = prompt[-max_prompt_length:]
        stats.prompt_truncated += 1
    room = max_length - len(prompt)
    if room <= 0:
        stats.drop("prompt alone fills max_length")
        return None
    if any(len(a) > room for a in answers):
        stats.truncated += 1
        answers = [a[:room] for a in answers]
    return prompt, answers


def _pair(enc: Encoder, row: dict) -> tuple[list[int], list[int], list[int]]:
    prompt, chosen = encode_side(enc, row["prompt"], row["chosen"])
    prompt_r, rejected = encode_side(enc, row["prompt"], row["rejected"])
    if prompt != prompt_r:
        raise DataError("the prompt tokenises differently before chosen and before rejected; "
                        "the chat template must render the prompt independently of the answer")
    return prompt, chosen, rejected


def encode_preference_rows(cfg, tokenizer, rows, stats) -> list[dict]:
    """Canonical preference/kto rows (with origins) -> training records for cfg.method; fills stats."""
    enc = Encoder(tokenizer, apply_chat_template=cfg.data.apply_chat_template)
    max_len, max_prompt = cfg.data.max_length, cfg.data.max_prompt_length
    records = []
    for fmt, row in rows:
        data = row.data
        try:
            if fmt == "preference":
                prompt, chosen, rejected = _pair(enc, data)
                sides = [(chosen, True), (rejected, False)]
            else:  # kto: one answer with a desirable/undesirable label
                prompt, completion = encode_side(enc, data["prompt"], data["completion"])
                sides = [(completion, data["label"])]
        except DataError as e:
            raise DataError(f"{row.origin}: {e}") from None
        fitted = _fit(prompt, [s for s, _ in sides], max_len, max_prompt, stats)
        if fitted is None:
            continue
        prompt, answers = fitted
        if cfg.method == "kto":
            records += [{"prompt_ids": prompt, "completion_ids": a, "label": bool(lab)}
                        for a, (_, lab) in zip(answers, sides)]
        else:
            records.append({"prompt_ids": prompt, "chosen_ids": answers[0], "rejected_ids": answers[1]})
            if cfg.method == "reward":  # the row's margin, 0 (no margin) when it has none
                records[-1]["margin"] = data.get("margin", 0.0)
        stats.tokens += sum(len(prompt) + len(a) for a in answers)
        stats.loss_tokens += sum(len(a) for a in answers)
    stats.samples = len(records)
    return records


# ------------------------------------------------------------------------------------------- collation
def reward_sequences(record: dict) -> dict:
    """A reward record as TRL's RewardTrainer collator reads it: each side the whole sequence a reward model
    scores (prompt + answer, the answer ending with EOS), and the margin."""
    prompt = record["prompt_ids"]
    return {"chosen_ids": prompt + record["chosen_ids"], "rejected_ids": prompt + record["rejected_ids"],
            "margin": record["margin"]}


class SharedPromptCollator:
    """DPO/ORPO records -> one packed row for the native engine: per pair ``[prompt, chosen, rejected]``.

    TRL's collator pads ``prompt + chosen`` and ``prompt + rejected`` as two rows each, so the prompt (often
    most of a pair's tokens) runs through the model twice and short rows carry padding. Here the prompt runs
    once: the rejected answer's positions restart after the prompt and its attention skips the chosen answer
    (``shared_prompt_mask``), so each answer sees exactly what it would in its own row. No padding: the
    micro-batch is one row. Returns, besides the model inputs:
      ``pred_index``  (N,) the row position whose hidden state predicts each answer token;
      ``targets``     (N,) those answer tokens;
      ``answer_index`` (N,) which answer each belongs to: 2k chosen, 2k + 1 rejected of pair k;
      ``answer_lengths`` (2B,) tokens per answer; ``num_tokens`` the row's length.
    With ``prompt_loss`` (ORPO's NLL covers the prompt too, as TRL's ORPOTrainer computes it) also:
      ``prompt_pred_index`` (M,) the prompt positions that predict the prompt's next token;
      ``prompt_targets``    (M,) those prompt tokens (every prompt token but the first).
    """

    def __init__(self, attn_implementation: str, prompt_loss: bool = False):
        self.per_sample = attn_implementation == PACKED_ATTENTION  # else one dense (1, 1, T, T) boolean mask
        self.prompt_loss = prompt_loss

    def __call__(self, records: list[dict]) -> dict:
        import torch  # here, not at import: `lmforge prepare` needs no torch

        ids, positions, shapes, pred, targets, answer = [], [], [], [], [], []
        prompt_pred, prompt_targets = [], []
        for k, r in enumerate(records):
            prompt, chosen, rejected = r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]
            start, P, C = len(ids), len(prompt), len(chosen)
            prompt_pred += range(start, start + P - 1)
            prompt_targets += prompt[1:]
            ids += prompt + chosen + rejected
            positions += list(range(P + C)) + list(range(P, P + len(rejected)))
            shapes.append((P, C, len(rejected)))
            # the hidden state at a position predicts the next token of its own answer; the first token of
            # either answer is predicted by the prompt's last position (an empty prompt predicts nothing)
            for side, answer_ids, first in ((0, chosen, start + P), (1, rejected, start + P + C)):
                from_prompt = [start + P - 1] if P else []
                preds = from_prompt + list(range(first, first + len(answer_ids) - 1))
                pred += preds
                targets += answer_ids[len(answer_ids) - len(preds):]
                answer += [2 * k + side] * len(preds)
        batch = {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([positions])}
        if self.per_sample:
            batch["packed_seq_lens"] = [shapes]
        else:
            batch["attention_mask"] = torch.block_diag(*[shared_prompt_mask(*s) for s in shapes])[None, None]
        batch.update(pred_index=torch.tensor(pred), targets=torch.tensor(targets), answer_index=torch.tensor(answer),
                     answer_lengths=torch.tensor([len(r[f"{side}_ids"]) for r in records
                                                  for side in ("chosen", "rejected")]),
                     num_tokens=len(ids))
        if self.prompt_loss:
            batch.update(prompt_pred_index=torch.tensor(prompt_pred, dtype=torch.long),
                         prompt_targets=torch.tensor(prompt_targets, dtype=torch.long))
        return batch


# ------------------------------------------------------------------------------------------- inspect
def show_records(tok, ds, n: int, marked) -> None:
    """Print prompt, chosen and rejected (or completion + label) with the answer tokens (the loss) marked.

    ``marked(ids, labels)`` renders ids with the positions whose label is not IGNORE highlighted.
    """
    for k in range(min(n, len(ds))):
        r = ds[k]
        prompt = r["prompt_ids"]
        sides = ([("chosen", r["chosen_ids"]), ("rejected", r["rejected_ids"])] if "chosen_ids" in r
                 else [(f"completion (label {str(r['label']).lower()})", r["completion_ids"])])
        print(f"\n--- pair {k}: prompt {len(prompt)} tokens, "
              + ", ".join(f"{name} {len(ids)}" for name, ids in sides) + " ---")
        print("prompt:")
        print(marked(prompt, [IGNORE] * len(prompt)))
        for name, ids in sides:
            print(f"{name}:")
            print(marked(ids, list(ids)))
