"""A cheaper dropout for LoRA adapters on the native engine.

PEFT applies ``nn.Dropout`` to the input of every LoRA layer (7 per decoder layer on Llama), and on CPU
``aten::bernoulli_`` draws one 32-bit random number per element: profiled on SmolLM2-135M (AMD Zen 4, LoRA
r=16, 8 x 256 tokens) it was a fifth of a LoRA step (docs/training.md). ``FastDropout`` takes four 16-bit
draws out of each 64-bit random number instead, about 3.6x faster per call. The keep-probability is
rounded to a multiple of 1/65536 (p = 0.05 drops 0.0500031 of the inputs) and the kept inputs are scaled
by the inverse of that exact keep-probability, so the expected output equals the input, as with
``nn.Dropout``. It draws from torch's default generator, so a checkpoint's RNG state keeps resume bitwise.
"""

from __future__ import annotations

import torch

LEVELS = 1 << 16  # a 16-bit draw per element


class FastDropout(torch.nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.threshold = round(p * LEVELS) - LEVELS // 2  # signed 16-bit draws below it are dropped
        self.scale = LEVELS / (LEVELS // 2 - self.threshold) if p < 1 else 0.0  # 1 / (exact keep-probability)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.numel() == 0:
            return x
        n = -(-x.numel() // 4)  # 64-bit draws needed, four 16-bit lanes each
        draws = torch.randint(-2**63, 2**63 - 1, (n,), dtype=torch.int64, device=x.device)
        keep = draws.view(torch.int16)[:x.numel()].view(x.shape) >= self.threshold
        return torch.where(keep, x * self.scale, 0)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_fast_lora_dropout(model) -> int:
    """Swap the ``nn.Dropout`` of every LoRA/DoRA layer (PEFT's ``lora_dropout``) for ``FastDropout``;
    returns how many were swapped."""
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, d in dropouts.items():
            if type(d) is torch.nn.Dropout and d.p > 0:
                dropouts[name] = FastDropout(d.p)
                swapped += 1
    return swapped
