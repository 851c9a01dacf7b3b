"""Online RL with verifiable rewards: GRPO (and RLOO's leave-one-out baseline), on the native engine.

Each optimizer step takes its prompts (``per_device_train_batch_size`` prompts per micro-batch, rows chosen as for
every native method: a function of (seed, step)), samples ``num_generations`` completions of each with lmforge's
continuous-batching decode loop (``inference/decode.py``) on the live weights (LoRA layers run unmerged, in the
compute dtype), scores them with the rewards (``training/rewards.py``: TRL-signature functions, reward models),
turns the rewards into group-relative advantages and trains on the clipped-surrogate loss (``training/rl.py``,
TRL 1.16's formulas). Why in the same process as training: no weight sync, no merged copy of a LoRA model and no
second engine; generation is most of an online-RL step, and the decode loop keeps its batch full.

What the loop guarantees, each a test (tests/test_grpo.py):
  * the rollout of a step (every micro-batch, on each rank its own prompts; a group never straddles ranks) is made
    before the step's first forward, so the loss's units (sequences or completion tokens, ``loss_type``) are
    counted over the whole step: 1 x 8 == 8 x 1 with accumulation == 2 processes x 4 (trl#3021);
  * each completion samples from its own generator seeded by (train.seed, split, rollout, row, generation): the
    sampling "RNG" is a function of the step, so a resumed run regenerates exactly what the uninterrupted one did;
    a rollout reused over ``num_iterations`` steps is kept in the checkpoint;
  * the log-probs of the loss come from the training forward at the sampling temperature; the decode loop's own
    (same temperature, before top-k/top-p) are kept only to log their mismatch (``logp_mismatch``).

``per_device_train_batch_size`` counts prompts here (TRL's counts completions): a step trains on
``prompts x num_generations`` completions. With ``beta`` > 0 the reference is the starting model: the adapter
disabled (LoRA/DoRA), or a frozen copy of the starting weights (full fine-tune). Dropout is off (TRL's
``disable_dropout``): the ratio of new to old log-probs must compare like with like.
"""

from __future__ import annotations

import copy
import hashlib
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from lmforge.config import Config
from lmforge.data.packing import shared_prompt_mask
from lmforge.inference import decode, decode_attention
from lmforge.inference.options import GenerationOptions
from lmforge.log import log
from lmforge.training import preference, rl
from lmforge.training.attention import use_packed_attention
from lmforge.training.losses import decoder_and_head
from lmforge.training.native import NativeTrainer
from lmforge.training.objective import Objective
from lmforge.training.rewards import Rewards

ROLLOUTS = "rollouts.jsonl"  # in output_dir: a sample of each logged step's prompts, completions and rewards
LOSS_UNIT = {"grpo": "completions", "dr_grpo": "completions x max_completion_length", "dapo": "tokens",
             "bnpo": "tokens"}


def _seed(base: int, split: str, rollout: int, row: int, generation: int) -> int:
    """The sampling seed of one completion: a function of where it is in the run, nothing else."""
    digest = hashlib.blake2b(f"{base}/{split}/{rollout}/{row}/{generation}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


class GRPOObjective(Objective):
    """The native loop's view of GRPO: rollouts in ``before_step``, the clipped-surrogate loss per micro-batch.

    Units: (the loss's: sequences for grpo, sequences x max_completion_length for dr_grpo, completion tokens for
    dapo/bnpo; completions; completion tokens). Token-level metrics average over completion tokens, sequence-level
    ones over completions."""

    perplexity = False

    def __init__(self, cfg: Config, model, tokenizer, rewards: Rewards, reference, out: Path):
        self.g, self.seed, self.out = cfg.grpo, cfg.train.seed, out
        self.logging_steps = cfg.train.logging_steps
        self.model, self.tokenizer, self.rewards, self.reference = model, tokenizer, rewards, reference
        self.unit = (LOSS_UNIT[self.g.loss_type], "completions", "tokens")
        self.reuse_steps = self.g.num_iterations
        seq_level = self.g.importance_sampling_level == "sequence"
        self.stat_keys = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "entropy",
                          "logp_mismatch") + (("kl",) if self.g.beta else ())
        self.stat_units = {k: 1 if seq_level and k.startswith("clip_ratio") else 2 for k in self.stat_keys}
        self.eos = self._eos_ids()
        self.per_sample = use_packed_attention(model)  # else a dense shared-prompt mask per micro-batch
        if reference is not None and self.per_sample:
            use_packed_attention(reference)  # the frozen copy reads the same packed rows
        self.decoder = None  # made at the first rollout (it switches the model's attention to the decode loop's)
        self.cached: list[dict] | None = None  # the rollout of the current num_iterations steps
        self.window: dict[str, dict[str, list[float]]] = {"train": {}, "eval": {}}
        self.trained_since: float | None = None  # when the last rollout ended (train_s runs from there)

    def _eos_ids(self) -> frozenset[int]:
        ids = self.model.generation_config.eos_token_id if getattr(self.model, "generation_config", None) else None
        ids = {ids} if isinstance(ids, int) else set(ids or [])
        return frozenset(ids | {self.tokenizer.eos_token_id})

    # ------------------------------------------------------------------------------------------ batches
    def batch(self, split: str, rows: list[int], records: list[dict]) -> dict:
        """The prompts of a micro-batch; ``before_step`` adds their completions and everything the loss needs."""
        return {"split": split, "rows": list(rows), "records": records}

    def count(self, batch: dict) -> tuple[float, int, int]:
        mask = batch["mask"]
        return (float(rl.loss_denominator(mask, self.g.loss_type, self.g.max_completion_length)), mask.shape[0],
                int(mask.sum()))

    # ------------------------------------------------------------------------------------------ rollouts
    def before_step(self, trainer, batches: list[dict]) -> None:
        """Sample, score and lay out the completions of every micro-batch of the coming step (or evaluation)."""
        split = "train" if trainer.model.training else "eval"  # a rank may have no eval rows: no batches
        if self.trained_since is not None:  # the previous step's training (or an evaluation interrupting it)
            self._note("train", "train_s", time.perf_counter() - self.trained_since)
            self.trained_since = None
        if split == "train" and trainer.step % self.reuse_steps:  # the same rollout again (num_iterations)
            for batch, cached in zip(batches, self.cached):
                batch.update(cached)
            self.trained_since = time.perf_counter()
            return
        t0 = time.perf_counter()
        rollout = trainer.step // self.reuse_steps
        seqs = self._generate(trainer, batches, split, rollout)
        rollout_s = time.perf_counter() - t0
        per, total, texts = self._score(batches, seqs)
        gathered = self._gather(trainer, total, per, seqs)
        advantages = self._advantages(total, gathered["total"])
        start = 0
        for batch in batches:
            n = len(batch["rows"]) * self.g.num_generations
            self._lay_out(batch, seqs[start:start + n], advantages[start:start + n])
            start += n
        with torch.no_grad(), trainer.autocast():
            for batch in batches:
                if self.reuse_steps > 1 and split == "train":  # the sampling policy's log-probs, for the ratio
                    batch["old_logps"] = self.token_logps(trainer.model, batch, entropy=False)[0].detach()
                if self.g.beta:
                    batch["ref_logps"] = self.reference_logps(trainer.model, batch)
        if split == "train":
            self.cached = [{k: v for k, v in b.items() if k not in ("split", "rows", "records")} for b in batches]
            if trainer.rank == 0 and self._logs(trainer.step + 1, trainer.max_steps):
                self._write_rollouts(trainer.step + 1, batches, texts, total, advantages)
        self._metrics(split, gathered, rollout_s)
        if split == "train":
            self.trained_since = time.perf_counter()

    def _generate(self, trainer, batches: list[dict], split: str, rollout: int) -> list[decode.Sequence]:
        """num_generations completions of each prompt, in order (prompt by prompt), from the decode loop."""
        g = self.g
        opts = GenerationOptions(max_new_tokens=g.max_completion_length, do_sample=True, temperature=g.temperature,
                                 top_p=g.top_p, top_k=g.top_k)
        seqs = [decode.Sequence(rec["prompt_ids"], replace(opts, seed=_seed(self.seed, split, rollout, row, j)),
                                self.eos)
                for batch in batches for row, rec in zip(batch["rows"], batch["records"])
                for j in range(g.num_generations)]
        if not seqs:
            return seqs
        model = trainer.model
        base = model.get_base_model() if hasattr(model, "peft_config") else model  # LoRA layers stay in place
        if self.decoder is None:
            longest = max(len(s.prompt) for s in seqs) + g.max_completion_length
            with decode_attention.decoding_attention(base):
                self.decoder = decode.Decoder(base, self.tokenizer, max_batch=decode.auto_batch_size(base, longest),
                                              logprobs=True)
        was_training = model.training
        model.eval()
        self.decoder.weights_changed()  # the prompt prefix it kept was computed with the weights before the update
        try:
            with decode_attention.decoding_attention(base):  # and back to the training forward's attention after
                self.decoder.run(decode.from_list(seqs))
        finally:
            model.train(was_training)
        return seqs

    def _score(self, batches: list[dict], seqs: list[decode.Sequence]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(B, R) rewards per function, (B,) weighted totals and the texts of this rank's completions."""
        G = self.g.num_generations
        records = [rec for batch in batches for rec in batch["records"] for _ in range(G)]
        prompts = [json.loads(r["prompt"]) for r in records]
        completions = [self.tokenizer.decode(s.ids, skip_special_tokens=True) for s in seqs]
        per = self.rewards.score(prompts, completions, [list(s.ids) for s in seqs],
                                 [json.loads(r["columns"]) for r in records], [r["origin"] for r in records])
        return per, self.rewards.total(per), completions

    def _gather(self, trainer, total: torch.Tensor, per: torch.Tensor, seqs: list[decode.Sequence]) -> dict:
        """What the step's metrics and batch-scaled advantages need from every rank."""
        mine = {"total": total.tolist(), "per": per.tolist(), "lengths": [len(s.ids) for s in seqs],
                "truncated": [self._truncated(s) for s in seqs]}
        if trainer.world == 1:
            parts = [mine]
        else:
            parts = [None] * trainer.world
            dist.all_gather_object(parts, mine)
        return {k: [v for p in parts for v in p[k]] for k in mine}

    def _truncated(self, seq: decode.Sequence) -> bool:
        return not seq.ids or seq.ids[-1] not in self.eos

    def _advantages(self, total: torch.Tensor, everyone: list[float]) -> torch.Tensor:
        """(B,) advantages of this rank's completions; with ``scale_rewards: batch`` the std is the whole step's."""
        g = self.g
        if g.scale_rewards != "batch":
            return rl.group_advantages(total, g.num_generations, g.scale_rewards, g.advantage)
        centred = rl.group_advantages(total, g.num_generations, "none", g.advantage)
        std = rl.nanstd(torch.tensor(everyone, dtype=torch.float64).view(1, -1)).item()
        return centred / (std + rl.STD_EPS)

    def _lay_out(self, batch: dict, seqs: list[decode.Sequence], advantages: torch.Tensor) -> None:
        """The micro-batch as one packed row: per prompt ``[prompt, completion 1, ..., completion G]``, the prompt
        computed once and each completion attending to the prompt and itself only (``shared_prompt_mask``), so
        it sees what it would in its own row ``prompt + completion``. TRL pads G rows of prompt + completion:
        here the prompt's share of the forward is 1/G of that, and there is no padding."""
        G = self.g.num_generations
        ids, positions, shapes, pred = [], [], [], []
        for k, rec in enumerate(batch["records"]):
            prompt = rec["prompt_ids"]
            P, start = len(prompt), len(ids)
            ids += prompt
            positions += range(P)
            lengths = []
            for s in seqs[k * G:(k + 1) * G]:  # each completion has at least one token
                first = len(ids)
                ids += s.ids
                positions += range(P, P + len(s.ids))
                pred += [start + P - 1] + list(range(first, first + len(s.ids) - 1))  # who predicts each token
                lengths.append(len(s.ids))
            shapes.append((P, *lengths))
        B, T = len(seqs), max(len(s.ids) for s in seqs)
        valid = torch.arange(T)[None, :] < torch.tensor([len(s.ids) for s in seqs])[:, None]  # (B, T)
        mask = valid.float()
        if self.g.mask_truncated_completions:
            mask[torch.tensor([self._truncated(s) for s in seqs])] = 0.0
        targets = torch.tensor([t for s in seqs for t in s.ids])  # (N,): valid's True cells in row-major order
        decode_logps = torch.zeros(B, T).masked_scatter(valid, torch.tensor([x for s in seqs for x in s.logprobs]))
        inputs = {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([positions])}
        if self.per_sample:
            inputs["packed_seq_lens"] = [shapes]
        else:
            inputs["attention_mask"] = torch.block_diag(*[shared_prompt_mask(*s) for s in shapes])[None, None]
        batch.update(inputs=inputs, mask=mask, valid=valid, targets=targets, pred=torch.tensor(pred),
                     decode_logps=decode_logps, advantages=advantages.float(), old_logps=None, ref_logps=None,
                     num_tokens=len(ids))

    # ------------------------------------------------------------------------------------------ the loss
    def token_logps(self, model, batch: dict, entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T) log-probs of the completion tokens at the sampling temperature, and (with ``entropy``) their
        (B, T) entropies, detached. The LM head runs only on the positions that predict a completion token."""
        parts = decoder_and_head(model)
        if parts is not None:
            decoder, head = parts
            hidden = decoder(**batch["inputs"], use_cache=False).last_hidden_state[0]  # (T, C): one packed row
            logits = head(hidden[batch["pred"]])  # (N, V)
        else:
            logits = model(**batch["inputs"], use_cache=False).logits[0, batch["pred"]]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / self.g.temperature
        logp = logits.log_softmax(-1)  # (N, V): once, for the tokens' log-probs and the entropy
        token = logp.gather(1, batch["targets"][:, None])[:, 0]  # (N,)
        valid = batch["valid"]
        out = token.new_zeros(valid.shape).masked_scatter(valid, token)
        if not entropy:
            return out, None
        with torch.no_grad():
            spread = -(logp.exp() * logp).sum(-1)
        return out, spread.new_zeros(valid.shape).masked_scatter(valid, spread)

    @torch.no_grad()
    def reference_logps(self, model, batch: dict) -> torch.Tensor:
        """(B, T) log-probs under the starting model: the adapter disabled, or the frozen copy."""
        if self.reference is None:
            with model.disable_adapter():
                return self.token_logps(model, batch, entropy=False)[0]
        return self.token_logps(self.reference, batch, entropy=False)[0]

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        g = self.g
        logps, entropy = self.token_logps(model, batch)
        mask = batch["mask"].to(logps.dtype)
        old = batch["old_logps"]
        ref = batch["ref_logps"]
        numerator, stats = rl.grpo_loss(
            logps, None if old is None else old.to(logps.dtype), None if ref is None else ref.to(logps.dtype),
            batch["advantages"].to(logps.dtype), mask, g.loss_type, g.beta, g.epsilon, g.epsilon_high,
            g.importance_sampling_level, g.max_completion_length, denominator=1.0)
        tokens, seqs = float(mask.sum()), float(mask.shape[0])
        clip_n = seqs if g.importance_sampling_level == "sequence" else tokens
        sums = {"clip_ratio/low_mean": stats.clip_low.item() * clip_n,
                "clip_ratio/high_mean": stats.clip_high.item() * clip_n,
                "clip_ratio/region_mean": stats.clip_region.item() * clip_n,
                "entropy": float((entropy * mask).sum()),
                "logp_mismatch": float(((logps.detach() - batch["decode_logps"].to(logps.dtype)).abs() * mask).sum())}
        if g.beta:
            sums["kl"] = stats.kl.item() * tokens
        return numerator, sums

    # ------------------------------------------------------------------------------------------ what is logged
    def _note(self, split: str, key: str, value: float) -> None:
        self.window[split].setdefault(key, []).append(value)

    def _metrics(self, split: str, gathered: dict, rollout_s: float) -> None:
        """The step's rollout metrics (every rank's completions), TRL's names where TRL logs them."""
        G = self.g.num_generations
        total = torch.tensor(gathered["total"], dtype=torch.float64)
        lengths = gathered["lengths"]
        self._note(split, "reward", torch.nanmean(total).item())
        groups = total.view(-1, G)
        self._note(split, "reward_std", torch.nan_to_num(rl.nanstd(groups), nan=0.0).mean().item())
        self._note(split, "frac_reward_zero_std", rl.zero_std_groups(total, G))
        per = torch.tensor(gathered["per"], dtype=torch.float64).view(len(total), -1)
        for i, name in enumerate(self.rewards.names):
            column = per[:, i]
            if (~column.isnan()).any():
                self._note(split, f"rewards/{name}/mean", torch.nanmean(column).item())
        self._note(split, "completions/mean_length", statistics.fmean(lengths))
        self._note(split, "completions/min_length", float(min(lengths)))
        self._note(split, "completions/max_length", float(max(lengths)))
        self._note(split, "completions/clipped_ratio", statistics.fmean(map(float, gathered["truncated"])))
        self._note(split, "rollout_s", rollout_s)
        self._note(split, "completions_per_second", len(total) / max(rollout_s, 1e-9))

    def logged(self, split: str) -> dict[str, float]:
        if split == "train" and self.trained_since is not None:  # the step just finished
            self._note("train", "train_s", time.perf_counter() - self.trained_since)
            self.trained_since = None
        window, self.window[split] = self.window[split], {}
        return {k: round(statistics.fmean(v), 6) for k, v in window.items() if v}

    def _logs(self, step: int, max_steps: int) -> bool:
        return self.g.log_completions > 0 and (step % self.logging_steps == 0 or step in (1, max_steps))

    def _write_rollouts(self, step: int, batches: list[dict], texts: list[str], total: torch.Tensor,
                        advantages: torch.Tensor) -> None:
        """A sample of this step's prompts with all their completions, rewards and advantages (rank 0's)."""
        G = self.g.num_generations
        records = [rec for b in batches for rec in b["records"]][:self.g.log_completions]
        with open(self.out / ROLLOUTS, "a") as fh:
            for i, rec in enumerate(records):
                group = range(i * G, (i + 1) * G)
                fh.write(json.dumps({
                    "step": step, "origin": rec["origin"], "prompt": json.loads(rec["prompt"]),
                    "completions": [texts[k] for k in group],
                    "rewards": [None if total[k].isnan() else round(total[k].item(), 6) for k in group],
                    "advantages": [round(advantages[k].item(), 6) for k in group]}) + "\n")

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The rollout being reused (num_iterations > 1): a resume mid-way trains on the same completions."""
        return {"cached": self.cached if self.reuse_steps > 1 else None}

    def load_state_dict(self, state: dict) -> None:
        self.cached = state.get("cached")


def truncate_rollouts_after(out: Path, step: int) -> None:
    """On resume, drop rollouts.jsonl rows logged after the checkpoint (as metrics.jsonl's)."""
    path = out / ROLLOUTS
    if path.exists():
        rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in rows))


def train(cfg: Config):
    from trl.trainer.utils import disable_dropout_in_model

    run = preference.setup(cfg)  # the plan, output dir, model + tokenizer, the prompt rows (data/prompts.py)
    cfg, model = run.cfg, run.model
    disable_dropout_in_model(model)
    for line in run.data_lines:
        log(f"train data: {line}")
    rewards = Rewards(cfg.grpo.rewards, run.tokenizer, base_dir=Path.cwd())
    reference = None
    if cfg.grpo.beta and (cfg.peft.kind == "none" or run.continues_adapter):  # else: the adapter disabled
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    out = Path(cfg.train.output_dir)
    if run.resume:
        truncate_rollouts_after(out, json.loads((Path(run.resume) / "trainer_state.json").read_text())["global_step"])
    elif (out / ROLLOUTS).exists() and (not dist.is_initialized() or dist.get_rank() == 0):
        (out / ROLLOUTS).unlink()
    g = cfg.grpo
    log(f"grpo: {cfg.train.per_device_train_batch_size} prompt(s) x {g.num_generations} generations per micro-batch, "
        f"loss_type {g.loss_type}, advantage {g.advantage}, scale_rewards {g.scale_rewards}, beta {g.beta}, "
        f"rewards {', '.join(rewards.names)}")
    objective = GRPOObjective(cfg, model, run.tokenizer, rewards, reference, out)
    trainer = NativeTrainer(cfg, model, run.tokenizer, run.prec, run.train_ds, run.eval_ds, objective,
                            run.data_lines)
    return trainer.train(run.resume)
