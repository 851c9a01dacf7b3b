"""Several LoRA/DoRA adapters over one base model, chosen per batch row inside one batched forward.

Why written here: PEFT's mixed-batch path (``model(..., adapter_names=[...])``) refuses DoRA, registers a hook on
every LoRA layer at each forward and loops over the adapters in Python in every layer (an index, two matmuls
and an index-add each), and it needs the adapters injected into the live model's modules, which a server cannot
do while its decode thread runs them. Here each linear layer of the base is wrapped once (``RowLinear``); the
adapters present in a batch are concatenated once per change of that set (``Tables``), so a forward costs every
wrapped layer two matmuls over all those adapters' ranks and a mask that zeroes the ranks a row does not use:

    h = (x @ A_cat.T) * mask[row]      # (B, T, sum of ranks)
    y = base(x) + h @ Bt_cat           # Bt_cat holds (B * scaling).T, stored so (contiguous: 2x faster)

Layers that take the same input (q/k/v of an attention, gate/up of an MLP: learnt from the first forward, as the
layers called one after another with one tensor) are computed together (``Siblings``): one matmul over their
concatenated base weights (each layer's weight becomes a view into it: no copy) and, for the adapters, one
A matmul, one mask and one B matmul with a block-diagonal B; the other layers of the group take their slice.
A decoding step is bound by the number of ops per layer more than by FLOPs (measured: ``benchmarks/serve_adapters.py``).

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
class _Table:
    """A layer's updates for the adapters of the current batch, concatenated along the rank."""

    a: torch.Tensor  # (C, in): the adapters' A rows one after another (C = sum of their ranks)
    bt: torch.Tensor  # (C, out)
    owner: torch.Tensor  # (C,) which adapter (1-based position in the batch's set) each rank belongs to
    g: torch.Tensor | None  # (1 + adapters, out): row 0 (the base) and LoRA-only adapters are ones; None: no DoRA


class RowLinear(nn.Module):
    """A base ``nn.Linear`` plus the per-row adapter update of the batch ``rows`` describes (nothing outside it)."""

    def __init__(self, base: nn.Linear, name: str, rows: "RowLora"):
        super().__init__()
        self.base, self.name = base, name
        self._rows = [rows]  # in a list: not registered as a submodule (it is not part of the model's state)
        self.siblings: Siblings | None = None  # the layers computed together with this one, if any

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self._rows[0]
        if rows.recording is not None:
            rows.recording.append((self, x))
        batch = rows.current
        if self.siblings is not None:
            key = self.siblings.names
            if batch is None or key not in batch.tables or batch.tables[key] is not None:
                return self.siblings.output(self, x, batch)
        y = self.base(x)
        table = batch.tables.get(self.name) if batch is not None else None
        if table is None:
            return y
        h = F.linear(x, table.a)  # (B, T, in) -> (B, T, C)
        if batch.index is not None:  # each row keeps only its own adapter's ranks
            h.mul_(batch.mask(table.owner, x.dtype))
        if table.g is None:  # y += h @ Bt_cat in one op: in decoding each layer's extra ops cost more than FLOPs
            y.view(-1, y.shape[-1]).addmm_(h.view(-1, h.shape[-1]), table.bt)
            return y
        delta = h @ table.bt
        g = table.g[1] if batch.index is None else table.g[batch.index][:, None, :]  # (out,) or (B, 1, out)
        bias = self.base.bias
        if bias is None:
            return g * (y + delta)
        return g * (y - bias + delta) + bias


class Siblings:
    """Linear layers that take the same input, computed as one: their base weights concatenated (each layer's
    weight and bias become views into these), and the batch's adapters as one table with a block-diagonal B.
    The first of them called with an input computes every one's output; the others take their slice of it."""

    def __init__(self, members: list[RowLinear]):
        self.names = tuple(m.name for m in members)
        first = members[0].base.weight
        self.weight = torch.cat([m.base.weight.detach() for m in members])
        has_bias = any(m.base.bias is not None for m in members)
        self.bias = torch.cat([m.base.bias.detach() if m.base.bias is not None else first.new_zeros(m.base.out_features)
                               for m in members]) if has_bias else None
        self.slices: dict[str, slice] = {}
        start = 0
        for m in members:
            end = start + m.base.out_features
            self.slices[m.name] = slice(start, end)
            m.base.weight = nn.Parameter(self.weight[start:end], requires_grad=False)
            if m.base.bias is not None:
                m.base.bias = nn.Parameter(self.bias[start:end], requires_grad=False)
            m.siblings = self
            start = end
        self._x: torch.Tensor | None = None  # the input whose outputs ``_y`` holds, until every member took its part
        self._y: torch.Tensor | None = None
        self._waiting: set[str] = set()

    def output(self, layer: RowLinear, x: torch.Tensor, batch: "_Batch | None") -> torch.Tensor:
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
        y = F.linear(x, self.weight, self.bias)
        table = batch.tables.get(self.names) if batch is not None else None
        if table is None:
            return y
        h = F.linear(x, table.a)
        if batch.index is not None:
            h.mul_(batch.mask(table.owner, x.dtype))
        y.view(-1, y.shape[-1]).addmm_(h.view(-1, h.shape[-1]), table.bt)
        return y

    def table(self, tables: dict[str, "_Table"], owners: dict) -> "_Table | None":
        """The group's table from its members' (None: a member rescales its output (DoRA): each computes its own).
        ``owners``: one ``owner`` tensor per layout of ranks, shared by the groups adapted alike (so a forward
        computes one mask for all of them)."""
        parts = [(self.slices[n], tables[n]) for n in self.names if n in tables]
        if any(t.g is not None for _, t in parts):
            return None
        a = torch.cat([t.a for _, t in parts])
        bt = a.new_zeros(a.shape[0], self.weight.shape[0])  # block-diagonal: each member's ranks feed its outputs
        row = 0
        for cols, t in parts:
            bt[row:row + t.a.shape[0], cols] = t.bt
            row += t.a.shape[0]
        layout = tuple(id(t.owner) for _, t in parts)
        if layout not in owners:
            owners[layout] = torch.cat([t.owner for _, t in parts])
        return _Table(a, bt, owners[layout], None)


@dataclass
class _Batch:
    index: torch.Tensor | None  # (B,) 0 = base, i = the i-th adapter present; None: every row has the one adapter
    tables: dict  # layer name or siblings.names -> _Table (None: the siblings compute one by one)
    masks: dict = field(default_factory=dict)

    def mask(self, owner: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B, 1, C): 1 where rank c belongs to the row's adapter. Layers adapted alike share ``owner`` (one
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

    KEEP = 4  # adapter sets whose tables are kept

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers: dict[str, nn.Linear] = {}
        self.current: _Batch | None = None
        self.recording: list | None = None  # (layer, input) of each call, while the siblings are being found
        self._cached: collections.OrderedDict[tuple, dict[str, _Table]] = collections.OrderedDict()
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        for name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                if type(child) is nn.Linear and child is not head:  # the LM head: PEFT's all-linear skips it too
                    full = f"{name}.{child_name}" if name else child_name
                    self.layers[full] = child
                    setattr(module, child_name, RowLinear(child, full, self))
        self.siblings = self._find_siblings()

    def _find_siblings(self) -> list[Siblings]:
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
        return [Siblings(run) for run in runs
                if len(run) > 1 and all(counts[m] == 1 for m in run)
                and len({(m.base.weight.dtype, m.base.weight.device) for m in run}) == 1]

    @contextlib.contextmanager
    def rows(self, adapters: list[RowAdapter | None]):
        """Within the block, row i of the model's batch gets ``adapters[i]`` (None: the base alone)."""
        # one order for a set, whatever the rows' order (else every row joining or leaving would rebuild the tables);
        # an adapter without layers (prompt tuning) leaves its rows to the base
        present = tuple(sorted({a for a in adapters if a is not None and a.layers}, key=id))
        position = {a: i + 1 for i, a in enumerate(present)}
        device = next(self.model.parameters()).device
        index = torch.tensor([position.get(a, 0) for a in adapters], device=device)
        self.current = _Batch(index, self._tables(present))
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
        self.current = _Batch(None, self._tables((adapter,) if adapter is not None else ()))
        try:
            yield
        finally:
            self.current = None

    def _tables(self, present: tuple) -> dict[str, _Table]:
        """The concatenated updates for the adapters ``present``. The last ``KEEP`` sets are kept: in a continuous
        batch the set changes when an adapter's first row joins or its last row leaves, and prompts are prefilled
        one adapter at a time (a set of one shares the adapter's own tensors: no copy)."""
        if present in self._cached:
            self._cached.move_to_end(present)
            return self._cached[present]
        tables, owners = {}, {}
        for name in dict.fromkeys(n for a in present for n in a.layers):
            users = [(i + 1, a.layers[name]) for i, a in enumerate(present) if name in a.layers]
            layout = tuple((i, u.a.shape[0]) for i, u in users)
            if layout not in owners:
                owners[layout] = torch.cat([torch.full((r,), i) for i, r in layout]).to(users[0][1].a.device)
            owner = owners[layout]
            g = None
            if any(u.g is not None for _, u in users):
                g = users[0][1].a.new_ones(len(present) + 1, users[0][1].bt.shape[1])
                for i, u in users:
                    if u.g is not None:
                        g[i] = u.g
            if len(users) == 1:
                a, bt = users[0][1].a, users[0][1].bt
            else:
                a, bt = torch.cat([u.a for _, u in users]), torch.cat([u.bt for _, u in users])
            tables[name] = _Table(a, bt, owner, g)
        for group in self.siblings:
            if any(n in tables for n in group.names):
                tables[group.names] = group.table(tables, owners)  # None: its members compute their own (DoRA)
                if tables[group.names] is not None:  # the members' own tables go unused: not kept
                    for name in group.names:
                        tables.pop(name, None)
        self._cached[present] = tables
        while len(self._cached) > self.KEEP:
            self._cached.popitem(last=False)
        return tables
