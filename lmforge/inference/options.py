"""What a generation request may ask for (``generate``, ``chat``, ``serve`` and the decode loop read it), checked
once; its own module so that the static generator (``generate.py``) and the continuous-batching loop
(``decode.py``) both take it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.errors import ConfigError


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
