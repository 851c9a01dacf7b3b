"""bf16 compute with fp32 master weights, for full fine-tuning on the native engine.

Why not autocast: under ``torch.autocast`` the model keeps fp32 weights and every matmul casts its weight to
bf16 on the way in (and the gradient back to fp32 on the way out), while norms, activations and their
backward run in fp32. Profiled on SmolLM2-135M (AMD Zen 4, 2 cores, 8 x 256 tokens): fwd+bwd 10.4 s under
autocast, 8.4 s with the model itself in bf16, 16.2 s in fp32 (docs/training.md). So the model computes in
bf16 and the optimizer updates fp32 copies ("master weights", as Megatron and apex O2 do): gradients are
accumulated in fp32 after each micro-batch, clipped and all-reduced in fp32, and the updated fp32 weights
are rounded into the model after each step. Small updates are not lost (pure bf16 AdamW would round them
away), checkpoints and the final model hold the fp32 weights, and resume stays bitwise.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


class MasterWeights:
    """fp32 copies of a model's parameters; the model's own parameters are converted to ``dtype``.

    ``trainable_only`` (LoRA/DoRA): only the adapter weights get masters; the frozen base stays as loaded
    (already bf16). Saving then goes through PEFT (adapter keys without the adapter name)."""

    def __init__(self, model, dtype: torch.dtype, trainable_only: bool = False):
        self.model, self.adapter = model, trainable_only
        self.pairs: list[tuple[str, torch.nn.Parameter, torch.nn.Parameter]] = []  # (name, model param, master)
        self.by_id: dict[int, torch.nn.Parameter] = {}
        for name, p in model.named_parameters():  # tied weights come once, under their first name
            if trainable_only and not p.requires_grad:
                continue
            master = torch.nn.Parameter(p.detach().float().clone(), requires_grad=p.requires_grad)
            p.data = p.data.to(dtype)
            self.pairs.append((name, p, master))
            self.by_id[id(p)] = master

    def named_trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(name, m) for name, _, m in self.pairs if m.requires_grad]

    def collect_grads(self) -> None:
        """Move this micro-batch's bf16 gradients into the fp32 master gradients (summing)."""
        for _, p, m in self.pairs:
            if p.grad is None:
                continue
            if m.grad is None:
                m.grad = p.grad.float()
            else:
                m.grad.add_(p.grad)
            p.grad = None

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for _, p, m in self.pairs:
            if m.requires_grad:
                p.copy_(m)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict with every parameter replaced by its fp32 master (tied names share one)."""
        return {k: self.by_id.get(id(v), v).detach() for k, v in self.model.state_dict(keep_vars=True).items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load saved fp32 weights (a model's state dict, or a PEFT adapter file's) into masters and model."""
        for name, p, m in self.pairs:
            key = name.replace(f".{self.model.active_adapter}.", ".") if self.adapter else name
            m.copy_(state[key])
            p.copy_(m)

    def save_pretrained(self, directory: Path) -> None:
        """``save_pretrained`` with the fp32 weights; config.json says float32, the dtype of what was written."""
        self.model.save_pretrained(directory, state_dict=self.state_dict(), safe_serialization=True)
        if self.adapter:
            return  # adapter_config.json has no dtype
        path = Path(directory) / "config.json"
        config = json.loads(path.read_text())
        config["dtype"] = "float32"
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
