"""The adapters served over one base model, by name: read with PEFT, checked against the base, kept unmerged
in the compute dtype (``row_lora.RowAdapter``), at most ``max_adapters`` in memory (the least recently used
is dropped first and read again from its path when a request names it).

Two kinds share one batch with each other and with the base:
- LoRA and DoRA: a low-rank update of the base's linear layers, applied per row inside the batched forward
  (``row_lora.py``). It fits the base when each of its matrices fits the base's linear layer of that name.
- Prompt tuning (PEFT's ``PROMPT_TUNING``): N learned embeddings that PEFT prepends to the prompt's input
  embeddings (the attention mask extended with ones, so positions count the virtual tokens first). They change
  only what the KV cache holds after the prompt; every token after it is the base model's. The decode loop keeps
  their keys/values as the adapter's cached head of the prompt (``decode.py``), so its rows decode with the
  others' and answer as PEFT's own ``generate`` does. It fits the base when the embeddings are (N, hidden size).
An adapter of either kind fits only if the base it names is the served one (the same directory, or a model of
the same architecture: a copy elsewhere). Refused with what to do instead: prefix tuning, p-tuning and the other
prompt-learning kinds (their virtual tokens are computed per layer or by an encoder), an adapter that saves whole
modules (``modules_to_save``) or adapts embeddings, a reward model's adapter.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge import cloud
from lmforge.errors import ConfigError, LmforgeError, UnsupportedError
from lmforge.inference import decode
from lmforge.inference.loading import LoadedModel
from lmforge.inference.row_lora import LayerUpdate, RowAdapter, RowLora
from lmforge.models import adapter_base, is_adapter_dir, resolve_model_path

# the config.json keys that decide whether two models have the same layers
ARCHITECTURE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "intermediate_size", "vocab_size")
PREFIX = "base_model.model."  # PEFT's prefix of every saved LoRA tensor name


def parse_adapter_flags(values: list[str], flag: str = "--adapter") -> dict[str, str]:
    """``NAME=DIR`` strings -> {name: dir}; a malformed or repeated name is a ConfigError."""
    out: dict[str, str] = {}
    for value in values:
        name, sep, root = value.partition("=")
        if not sep or not name.strip() or not root.strip():
            raise ConfigError(f"{flag}: expected NAME=DIR (an adapter directory or URL), got {value!r}")
        if name in out:
            raise ConfigError(f"{flag}: the name {name!r} is given twice")
        out[name.strip()] = root.strip()
    return out


def _architecture(model_dir: Path) -> dict:
    config = json.loads((model_dir / "config.json").read_text())
    return {k: config.get(k) for k in ARCHITECTURE_KEYS}


def _check_base(name: str, path: Path, base: LoadedModel) -> None:
    """ConfigError when the adapter names a base of another architecture than the served one."""
    named = adapter_base(path)
    try:
        theirs = resolve_model_path(named)
    except LmforgeError:
        return  # its base is not on this machine (trained elsewhere): the layer shapes are checked instead
    if theirs.resolve() == base.model_dir.resolve() or not (theirs / "config.json").exists():
        return
    ours, other = _architecture(base.model_dir), _architecture(theirs)
    if ours != other:
        differ = ", ".join(f"{k} {other[k]} vs {ours[k]}" for k in ARCHITECTURE_KEYS if ours[k] != other[k])
        raise ConfigError(f"adapter {name!r} ({path}) was trained on {named}, not on the served base "
                          f"{base.name} ({differ})")


def _refuse_unmixable(name: str, path: Path, config) -> None:
    from peft import PeftType

    if config.is_prompt_learning and config.peft_type != PeftType.PROMPT_TUNING:
        raise UnsupportedError(f"adapter {name!r} ({path}) is a {config.peft_type.value.lower()} adapter: its "
                               "virtual tokens are computed per layer or by an encoder, which several adapters over "
                               "one base do not run (prompt tuning, LoRA and DoRA adapters can); serve it on its own "
                               f"(lmforge serve --model {path})")
    if config.peft_type not in (PeftType.LORA, PeftType.PROMPT_TUNING):
        raise UnsupportedError(f"adapter {name!r} ({path}) is a {config.peft_type.value} adapter; several adapters "
                               "over one base can be LoRA, DoRA or prompt-tuning adapters")
    if str(config.task_type) in ("SEQ_CLS", "TaskType.SEQ_CLS"):
        raise UnsupportedError(f"adapter {name!r} ({path}) is a reward model (a sequence classifier); serve it on "
                               f"its own (lmforge serve --model {path})")
    if config.is_prompt_learning:
        return
    for key in ("modules_to_save", "trainable_token_indices", "target_parameters"):
        if getattr(config, key, None):
            raise UnsupportedError(f"adapter {name!r} ({path}) sets {key}: it replaces whole modules or "
                                   "parameters, which cannot differ between rows of one batch; merge it (lmforge "
                                   "merge) and serve it on its own")
    if getattr(config, "lora_bias", False):
        raise UnsupportedError(f"adapter {name!r} ({path}) has lora_bias; merge it (lmforge merge) and serve it "
                               "on its own")


def read_adapter(name: str, root: str, base: LoadedModel, layers: dict[str, torch.nn.Linear]) -> RowAdapter:
    """Read the adapter at ``root`` (a directory or URL) for the base's ``layers`` (name -> linear layer): LoRA's
    A and B * scaling in the base's dtype plus DoRA's per-output rescaling, or prompt tuning's virtual token
    embeddings. Errors name what does not fit."""
    from peft import PeftConfig
    from peft.utils import load_peft_weights

    if not cloud.is_remote(root) and not Path(root).expanduser().is_dir():
        raise ConfigError(f"adapter {name!r}: {root} is not a directory")
    path = resolve_model_path(root)
    if not is_adapter_dir(path):
        raise ConfigError(f"adapter {name!r}: {root} is not a PEFT adapter directory (no adapter_config.json)")
    try:
        config = PeftConfig.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"adapter {name!r}: cannot read {path / 'adapter_config.json'} ({e})") from None
    _refuse_unmixable(name, path, config)
    _check_base(name, path, base)
    state = load_peft_weights(str(path), device="cpu")
    if config.is_prompt_learning:
        return _prompt_tuning(name, path, config, state, base)
    return _lora(name, path, config, state, base, layers)


def _prompt_tuning(name: str, path: Path, config, state: dict, base: LoadedModel) -> RowAdapter:
    """The virtual tokens' embeddings (N, hidden) in the base's dtype (PEFT casts them to the input embeddings')."""
    embeddings = base.model.get_input_embeddings()
    virtual = state.get("prompt_embeddings")
    want = (config.num_virtual_tokens, embeddings.embedding_dim)
    if virtual is None or tuple(virtual.shape) != want:
        got = "none" if virtual is None else tuple(virtual.shape)
        raise ConfigError(f"adapter {name!r} ({path}): prompt tuning needs {want[0]} virtual token embeddings of the "
                          f"served base's size {want[1]}, the adapter holds {got}: was it trained on another model?")
    return RowAdapter(name, virtual=virtual.to(embeddings.weight.dtype).to(embeddings.weight.device))


def _lora(name: str, path: Path, config, state: dict, base: LoadedModel,
          layers: dict[str, torch.nn.Linear]) -> RowAdapter:
    from peft.utils.other import get_pattern_key

    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        module, _, kind = key.removeprefix(PREFIX).rpartition(".lora_")
        if not module:
            raise UnsupportedError(f"adapter {name!r} ({path}) holds {key}, which is not a LoRA matrix")
        grouped.setdefault(module, {})[kind.removesuffix(".weight")] = tensor
    dtype = base.dtype
    out = RowAdapter(name)
    for module, parts in grouped.items():
        layer = layers.get(module)
        if layer is None or set(parts) - {"A", "B", "magnitude_vector"} or not {"A", "B"} <= set(parts):
            what = "" if layer is None else f" ({', '.join(sorted(parts))})"
            raise ConfigError(f"adapter {name!r} ({path}) adapts {module}{what}, which is not a linear layer of the "
                              f"served base {base.name}: was it trained on another model?")
        a, b = parts["A"].float(), parts["B"].float()
        if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features or a.shape[0] != b.shape[1]:
            raise ConfigError(f"adapter {name!r} ({path}): {module} is {layer.in_features} -> {layer.out_features} "
                              f"in the served base {base.name}, but the adapter's matrices are "
                              f"{tuple(a.shape)} and {tuple(b.shape)}: it was trained on another model")
        rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
        scaling = alpha / (rank ** 0.5 if config.use_rslora else rank)
        g = None
        if "magnitude_vector" in parts:  # DoRA: ||W + s B A|| per output feature, as PEFT's DoraLinearLayer
            norm = torch.linalg.norm(layer.weight.detach().float().cpu() + scaling * (b @ a), dim=1)
            g = (parts["magnitude_vector"].float() / norm).to(dtype)
        device = layer.weight.device
        out.layers[module] = LayerUpdate(a.to(dtype).to(device), (b * scaling).T.contiguous().to(dtype).to(device),
                                         None if g is None else g.to(device))
    if not out.layers:
        raise ConfigError(f"adapter {name!r} ({path}) holds no LoRA weights")
    return out


@dataclass
class _Entry:
    root: str  # the directory or URL it was loaded from (``root`` in /v1/models, as vLLM names it)
    weights: RowAdapter | None  # None: dropped from memory (max_adapters); read again on the next request
    last_used: float
    kind: str  # RowAdapter.kind: lora, dora or prompt_tuning (``kind`` in /v1/models)


class AdapterSet:
    """Named adapters over ``base``; ``rows`` applies them per batch row. Safe to call from several threads."""

    def __init__(self, base: LoadedModel, max_adapters: int | None = None):
        if base.adapter_dir is not None:
            raise UnsupportedError(f"--adapter: {base.name} is an adapter over {adapter_base(base.adapter_dir)}; "
                                   "serve adapters over their base: --model BASE --adapter NAME=ADAPTER_DIR ...")
        if base.is_reward_model or not decode.supports(base.model):
            what = "a reward model" if base.is_reward_model else "a model lmforge's decode loop does not run"
            raise UnsupportedError(f"--adapter: {base.name} is {what}; several adapters are served over a "
                                   "decoder-only base with full attention")
        self.base = base
        self.rows = RowLora(base.model)
        self.max_adapters = max_adapters
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()

    def add(self, name: str, root: str) -> None:
        """Read, check and register ``name``; ConfigError/UnsupportedError (with the reason) if it does not fit."""
        if not name or name in self._entries:
            raise ConfigError(f"adapter {name!r}: " + ("is already loaded" if name else "an empty name"))
        weights = read_adapter(name, root, self.base, self.rows.layers)
        with self._lock:
            if name in self._entries:
                raise ConfigError(f"adapter {name!r}: is already loaded")
            self._entries[name] = _Entry(root, weights, time.monotonic(), weights.kind)
            self._evict(keep=name)

    def remove(self, name: str) -> bool:
        """Forget ``name`` (False if unknown). Rows decoding with it keep its weights until they finish."""
        with self._lock:
            return self._entries.pop(name, None) is not None

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def names(self) -> list[tuple[str, str]]:
        """(name, root) of every adapter, in the order they were added."""
        with self._lock:
            return [(n, e.root) for n, e in self._entries.items()]

    def kind(self, name: str) -> str | None:
        """``lora``, ``dora`` or ``prompt_tuning`` (None: not loaded)."""
        entry = self._entries.get(name)
        return entry.kind if entry else None

    def resident(self) -> list[str]:
        with self._lock:
            return [n for n, e in self._entries.items() if e.weights is not None]

    def get(self, name: str) -> RowAdapter:
        """The weights of ``name`` (KeyError if unknown), read again from its path if they were dropped; marks it
        used. Reading happens under the lock: requests for a dropped adapter wait for one read, not several."""
        with self._lock:
            entry = self._entries[name]
            if entry.weights is None:
                entry.weights = read_adapter(name, entry.root, self.base, self.rows.layers)
            entry.last_used = time.monotonic()
            self._evict(keep=name)
            return entry.weights

    def _evict(self, keep: str) -> None:
        """Drop the least recently used weights until at most ``max_adapters`` are in memory (the lock is held)."""
        if self.max_adapters is None:
            return
        loaded = sorted((e.last_used, n) for n, e in self._entries.items() if e.weights is not None and n != keep)
        for _, name in loaded[:max(0, len(loaded) + 1 - self.max_adapters)]:
            self._entries[name].weights = None
