"""Several LoRA/DoRA adapters over one base model, chosen per batch row inside one batched forward.

Why written here: PEFT's mixed-batch path (``model(..., adapter_names=[...])``) refuses DoRA, registers a hook on
every LoRA layer at each forward and loops over the adapters in Python in every layer (an index, two matmuls
and an index-add each), and it needs the adapters injected into the live model's modules, which a server cannot
do while its decode thread runs them. Here each linear layer of the base is wrapped once (``RowLinear``) and the
adapters in use are *folded* in: their A matrices are written after the base weight in one buffer, so the base
matmul computes the adapters' low-rank inputs too, and a forward costs each layer one more op for the update,
plus a mask that zeroes the ranks a row does not use:

    [y | h] = x @ [W; A_fold].T            # one matmul: the base output and every folded adapter's ranks
    h *= mask[row]                         # (B, T, sum of ranks): each row keeps its own adapter's
    y += h @ Bt_fold                       # Bt_fold holds (B * scaling).T, stored so (contiguous: 2x faster)

Decoding is bound by the number of ops per layer more than by FLOPs: a small bf16 matmul costs ~30-60 us of fixed
overhead here, so the fold saves one per layer (``benchmarks/serve_adapters.py``). The fold holds the adapters of
recent batches, a superset of the current one (a row's adapter is its position in the fold, 0 = the base): rows
joining or leaving, and prefills of a few adapters' prompts, reuse it; it is rewritten when an adapter not in it
arrives or one has not been used for ``STALE`` forwards.

Layers that take the same input (q/k/v of an attention, gate/up of an MLP: learnt from the first forward, as the
layers called one after another with one tensor) are computed together (``Group``): one matmul over their
concatenated base weights (each layer's weight becomes a view into the buffer: no copy) and the adapters' ranks,
one mask and one update with a block-diagonal B; the other layers of the group take their slice.

DoRA's magnitude rescales the whole output: y = g * (W x + s B A x) + bias, with g = m / ||W + s B A|| per output
feature, a constant at inference (PEFT detaches the norm), taken per row. PEFT reads the adapters (config and
weights, ``adapter_set.py``); the weights stay unmerged, in the compute dtype.
"""

from __future__ import annotations

import collections
import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import UnsupportedError


@dataclass(frozen=True)
class LayerUpdate:
    """One adapter's update of one linear layer: A (r, in), Bt = (B * scaling).T (r, out) contiguous (a transposed
    view of B makes the small matmuls of decoding twice as slow), and DoRA's per-output rescaling g (out,) or None
    for plain LoRA."""

    a: torch.Tensor
    bt: torch.Tensor
    g: torch.Tensor | None = None


@dataclass(eq=False)  # compared and hashed by identity: a reloaded adapter is another object
class RowAdapter:
    """One adapter's weights: layer name (as in ``model.named_modules()`` of the plain base) -> update (LoRA, DoRA),
    or a prompt-tuning adapter's ``virtual`` token embeddings (N, hidden), which the decode loop puts before the
    row's prompt (``decode.py``); its rows' forwards are the base's here."""

    name: str
    layers: dict[str, LayerUpdate] = field(default_factory=dict)
    virtual: torch.Tensor | None = None

    @property
    def kind(self) -> str:
        if self.virtual is not None:
            return "prompt_tuning"
        return "dora" if any(u.g is not None for u in self.layers.values()) else "lora"

    @property
    def nbytes(self) -> int:
        tensors = [t for u in self.layers.values() for t in (u.a, u.bt, u.g) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors + ([self.virtual] if self.virtual is not None else []))


@dataclass
class _Fold:
    """A group's share of the fold: the ranks of its layers' updates, whose A rows follow the base weights in the
    group's buffer."""

    ranks: int  # C: how many A rows follow the base weights
    bt: torch.Tensor  # (C, out): each update's (B * scaling).T in its layer's columns (block-diagonal over members)
    owner: torch.Tensor  # (C,) which adapter (1-based position in the fold) each rank belongs to
    g: torch.Tensor | None  # (1 + adapters, out): DoRA's rescaling; row 0 (the base) and LoRA are ones; None: no DoRA


class RowLinear(nn.Module):
    """A base ``nn.Linear`` plus the per-row adapter update of the batch ``rows`` describes (nothing outside it)."""

    def __init__(self, base: nn.Linear, name: str, rows: "RowLora"):
        super().__init__()
        self.base, self.name = base, name
        self._rows = [rows]  # in a list: not registered as a submodule (it is not part of the model's state)
        self.group: Group | None = None  # the layers computed with this one (itself alone, or its siblings)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self._rows[0]
        if rows.recording is not None:
            rows.recording.append((self, x))
        if self.group is None:  # while the groups are being found
            return self.base(x)
        return self.group.output(self, x, rows.current)


class Group:
    """Linear layers computed as one: a layer alone, or layers that take the same input (siblings). Their base
    weights sit in one buffer (each layer's weight and bias become views into it), followed by the folded adapters'
    A rows; the first member called with an input computes every member's output, the others take their slice."""

    def __init__(self, members: list[RowLinear]):
        self.names = tuple(m.name for m in members)
        self.members = members
        self.out = sum(m.base.out_features for m in members)
        self.slices: dict[str, slice] = {}
        start = 0
        for m in members:
            self.slices[m.name] = slice(start, start + m.base.out_features)
            start += m.base.out_features
            m.group = self
        weights = [m.base.weight.detach() for m in members]
        self.buffer = torch.cat(weights) if len(members) > 1 else weights[0]  # (out + room for A rows, in)
        self.bias = None  # (out + room) with zeros after the biases, or None
        if any(m.base.bias is not None for m in members):
            self.bias = torch.cat([m.base.bias.detach() if m.base.bias is not None else
                                   weights[0].new_zeros(m.base.out_features) for m in members])
        self._point_members()
        self.fold: _Fold | None = None
        self._x: torch.Tensor | None = None  # the input whose outputs ``_y`` holds, until every member took its part
        self._y: torch.Tensor | None = None
        self._waiting: set[str] = set()

    def _point_members(self) -> None:
        for m in self.members:
            part = self.slices[m.name]
            m.base.weight = nn.Parameter(self.buffer[part], requires_grad=False)
            if m.base.bias is not None:
                m.base.bias = nn.Parameter(self.bias[part], requires_grad=False)

    def output(self, layer: RowLinear, x: torch.Tensor, batch: "_Batch | None") -> torch.Tensor:
        if len(self.members) == 1:
            return self._compute(x, batch)
        # the same tensor object (held here, so its id cannot be reused): no layer between siblings changes its
        # input in place in the models the decode loop runs (an inference tensor has no version counter to check)
        if self._x is not x:
            self._x, self._y, self._waiting = x, self._compute(x, batch), set(self.names)
        y = self._y[..., self.slices[layer.name]]
        self._waiting.discard(layer.name)
        if not self._waiting:
            self._x = self._y = None
        return y

    def _compute(self, x: torch.Tensor, batch: "_Batch | None") -> torch.Tensor:
        fold = self.fold if batch is not None else None
        n = self.out + (fold.ranks if fold is not None else 0)
        ye = F.linear(x, self.buffer[:n], self.bias[:n] if self.bias is not None else None)
        if fold is None:
            return ye
        ye[..., self.out:].mul_(batch.mask(fold.owner, x.dtype))  # each row keeps only its own adapter's ranks
        flat = ye.view(-1, n)
        flat[:, :self.out].addmm_(flat[:, self.out:], fold.bt)  # y += h @ Bt in one op
        y = ye[..., :self.out]
        if fold.g is None:
            return y
        g = fold.g[batch.index][:, None, :]  # (B, 1, out), or (1, 1, out) for a batch of one adapter
        if self.bias is None:
            return g * y
        bias = self.bias[:self.out]
        return g * (y - bias) + bias

    def set_fold(self, adapters: tuple, owners: dict) -> None:
        """Fold ``adapters`` (their updates of this group's layers) in: A rows after the base weights, B and DoRA's
        rescaling in ``self.fold``. ``owners``: one ``owner`` tensor per layout of ranks, shared by the groups
        adapted alike (so a forward computes one mask for all of them)."""
        parts = [(i, self.slices[m.name], a.layers[m.name])
                 for i, a in enumerate(adapters, 1) for m in self.members if m.name in a.layers]
        if not parts:
            self.fold = None
            return
        ranks = sum(u.a.shape[0] for _, _, u in parts)
        self._make_room(ranks)
        self.buffer[self.out:self.out + ranks] = torch.cat([u.a for _, _, u in parts])
        whole = len(parts) == 1 and parts[0][1] == slice(0, self.out)
        bt = parts[0][2].bt if whole else self.buffer.new_zeros(ranks, self.out)
        g = None
        if any(u.g is not None for _, _, u in parts):
            g = self.buffer.new_ones(len(adapters) + 1, self.out)
        row = 0
        for i, cols, u in parts:
            r = u.a.shape[0]
            if not whole:
                bt[row:row + r, cols] = u.bt
            if u.g is not None:
                g[i, cols] = u.g
            row += r
        layout = tuple((i, u.a.shape[0]) for i, _, u in parts)
        if layout not in owners:
            owners[layout] = torch.cat([torch.full((r,), i) for i, r in layout]).to(self.buffer.device)
        self.fold = _Fold(ranks, bt, owners[layout], g)

    def _make_room(self, ranks: int) -> None:
        """Grow the buffer (and the bias) to hold ``ranks`` A rows after the base weights: doubled, so that a
        growing fold copies the base weights a few times at most."""
        if self.buffer.shape[0] >= self.out + ranks:
            return
        room = max(ranks, 2 * (self.buffer.shape[0] - self.out))
        buffer = self.buffer.new_empty(self.out + room, self.buffer.shape[1])
        buffer[:self.out] = self.buffer[:self.out]
        self.buffer = buffer
        if self.bias is not None:
            bias = self.bias.new_zeros(self.out + room)
            bias[:self.out] = self.bias[:self.out]
            self.bias = bias
        self._point_members()


@dataclass
class _Batch:
    index: torch.Tensor  # (B,) 0 = base, i = the i-th adapter of the fold; (1,) when every row has one adapter
    masks: dict = field(default_factory=dict)

    def mask(self, owner: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B, 1, C): 1 where rank c belongs to the row's adapter. Groups adapted alike share ``owner`` (one
        tensor), so a forward computes each mask once, not once per layer."""
        key = id(owner)
        if key not in self.masks:
            self.masks[key] = (self.index[:, None] == owner[None, :]).to(dtype)[:, None, :]
        return self.masks[key]


class RowLora:
    """Wraps every ``nn.Linear`` of ``model`` in a ``RowLinear`` (once, at start: a server cannot change the
    modules of a model its decode thread is running) and applies, inside ``rows(...)``, each batch row's adapter.

    Thread-safety: ``rows`` runs on the decode thread only; adapters are plain objects the rows carry, so one
    unloaded while a row still decodes stays alive (and applied) until that row is done.
    """

    STALE = 32  # forwards after which an adapter no batch used leaves the fold

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers: dict[str, nn.Linear] = {}
        self.current: _Batch | None = None
        self.recording: list | None = None  # (layer, input) of each call, while the siblings are being found
        self.folded: tuple[RowAdapter, ...] = ()
        self._last_used: dict[RowAdapter, int] = {}  # folded adapter -> the forward that last used it
        self._forwards = 0
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        wrapped = []
        for name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                if type(child) is nn.Linear and child is not head:  # the LM head: PEFT's all-linear skips it too
                    full = f"{name}.{child_name}" if name else child_name
                    self.layers[full] = child
                    wrapped.append(RowLinear(child, full, self))
                    setattr(module, child_name, wrapped[-1])
        self.siblings = [Group(run) for run in self._find_siblings()]
        self.groups = self.siblings + [Group([layer]) for layer in wrapped if layer.group is None]

    def _find_siblings(self) -> list[list[RowLinear]]:
        """Groups of layers called one after another with one input tensor, in a one-token forward."""
        device = next(self.model.parameters()).device
        self.recording = []
        try:
            with torch.inference_mode():
                self.model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=False)
            calls = self.recording
        finally:
            self.recording = None
        runs: list[list[RowLinear]] = []
        previous = None
        for layer, x in calls:
            if runs and x is previous:
                runs[-1].append(layer)
            else:
                runs.append([layer])
            previous = x
        counts = collections.Counter(layer for layer, _ in calls)
        return [run for run in runs
                if len(run) > 1 and all(counts[m] == 1 for m in run)
                and len({(m.base.weight.dtype, m.base.weight.device) for m in run}) == 1]

    @contextlib.contextmanager
    def rows(self, adapters: list[RowAdapter | None]):
        """Within the block, row i of the model's batch gets ``adapters[i]`` (None: the base alone)."""
        # an adapter without layers (prompt tuning) leaves its rows to the base
        present = tuple(dict.fromkeys(a for a in adapters if a is not None and a.layers))
        self._fold(present)
        position = {a: i + 1 for i, a in enumerate(self.folded)}
        device = next(self.model.parameters()).device
        index = torch.tensor([position.get(a, 0) for a in adapters], device=device)
        self.current = _Batch(index) if present else None
        try:
            yield
        finally:
            self.current = None

    @contextlib.contextmanager
    def applied(self, adapter: RowAdapter | None):
        """Within the block, every row of every forward gets ``adapter`` (a command working with one adapter at a
        time over the loaded base: eval); None: the base alone. A prompt-tuning adapter changes the model's input,
        not its layers: refused here (the decode loop runs it: generate, chat, serve)."""
        if adapter is not None and adapter.virtual is not None:
            raise UnsupportedError(f"adapter {adapter.name!r} is a prompt-tuning adapter: its virtual tokens go before "
                                   "the prompt in lmforge's decode loop (generate, chat, serve), not into a forward "
                                   "that scores; evaluate it on its own (--model ADAPTER_DIR)")
        present = (adapter,) if adapter is not None and adapter.layers else ()
        self._fold(present)
        device = next(self.model.parameters()).device
        self.current = _Batch(torch.tensor([self.folded.index(adapter) + 1], device=device)) if present else None
        try:
            yield
        finally:
            self.current = None

    def _fold(self, present: tuple) -> None:
        """Keep the fold a superset of ``present``: rewritten (the adapters of the last ``STALE`` forwards first,
        then the new ones) when one of ``present`` is missing or a folded adapter went unused that long."""
        self._forwards += 1
        for a in present:
            self._last_used[a] = self._forwards
        kept = tuple(a for a in self.folded if self._forwards - self._last_used[a] <= self.STALE)
        if kept == self.folded and set(present) <= set(kept):
            return
        self.folded = kept + tuple(a for a in present if a not in kept)
        self._last_used = {a: self._last_used[a] for a in self.folded}
        owners: dict = {}
        for group in self.groups:
            group.set_fold(self.folded, owners)
