"""Several LoRA/DoRA adapters over one base model, chosen per batch row inside one batched forward.

Why written here: PEFT's mixed-batch path (``model(..., adapter_names=[...])``) refuses DoRA, registers a hook on
every LoRA layer at each forward and loops over the adapters in Python in every layer (an index, two matmuls
and an index-add each), and it needs the adapters injected into the live model's modules, which a server cannot
do while its decode thread runs them. Here each linear layer of the base is wrapped once (``RowLinear``); the
adapters present in a batch are concatenated once per change of that set (``Tables``), so a forward costs every
wrapped layer two matmuls over all those adapters' ranks and a mask that zeroes the ranks a row does not use:

    h = (x @ A_cat.T) * mask[row]      # (B, T, sum of ranks)
    y = base(x) + h @ B_cat.T          # B_cat holds B * scaling

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


@dataclass(frozen=True)
class LayerUpdate:
    """One adapter's update of one linear layer: A (r, in), B (out, r) already times the scaling, and DoRA's
    per-output rescaling g (out,) or None for plain LoRA."""

    a: torch.Tensor
    b: torch.Tensor
    g: torch.Tensor | None = None


@dataclass(eq=False)  # compared and hashed by identity: a reloaded adapter is another object
class RowAdapter:
    """One adapter's weights: layer name (as in ``model.named_modules()`` of the plain base) -> update."""

    name: str
    layers: dict[str, LayerUpdate] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for u in self.layers.values() for t in (u.a, u.b, u.g)
                   if t is not None)


@dataclass
class _Table:
    """A layer's updates for the adapters of the current batch, concatenated along the rank."""

    a: torch.Tensor  # (C, in): the adapters' A rows one after another (C = sum of their ranks)
    b: torch.Tensor  # (out, C)
    owner: torch.Tensor  # (C,) which adapter (1-based position in the batch's set) each rank belongs to
    g: torch.Tensor | None  # (1 + adapters, out): row 0 (the base) and LoRA-only adapters are ones; None: no DoRA


class RowLinear(nn.Module):
    """A base ``nn.Linear`` plus the per-row adapter update of the batch ``rows`` describes (nothing outside it)."""

    def __init__(self, base: nn.Linear, name: str, rows: "RowLora"):
        super().__init__()
        self.base, self.name = base, name
        self._rows = [rows]  # in a list: not registered as a submodule (it is not part of the model's state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        batch = self._rows[0].current
        table = batch.tables.get(self.name) if batch is not None else None
        if table is None:
            return y
        h = F.linear(x, table.a)  # (B, T, in) -> (B, T, C)
        if batch.index is not None:  # each row keeps only its own adapter's ranks
            h.mul_(batch.mask(table.owner, x.dtype))
        if table.g is None:  # y += h @ B_cat^T in one op: in decoding each layer's extra ops cost more than FLOPs
            y.view(-1, y.shape[-1]).addmm_(h.view(-1, h.shape[-1]), table.b.T)
            return y
        delta = F.linear(h, table.b)
        g = table.g[1] if batch.index is None else table.g[batch.index][:, None, :]  # (out,) or (B, 1, out)
        bias = self.base.bias
        if bias is None:
            return g * (y + delta)
        return g * (y - bias + delta) + bias


@dataclass
class _Batch:
    index: torch.Tensor | None  # (B,) 0 = base, i = the i-th adapter present; None: every row has the one adapter
    tables: dict[str, _Table]
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
        self._cached: collections.OrderedDict[tuple, dict[str, _Table]] = collections.OrderedDict()
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        for name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                if type(child) is nn.Linear and child is not head:  # the LM head: PEFT's all-linear skips it too
                    full = f"{name}.{child_name}" if name else child_name
                    self.layers[full] = child
                    setattr(module, child_name, RowLinear(child, full, self))

    @contextlib.contextmanager
    def rows(self, adapters: list[RowAdapter | None]):
        """Within the block, row i of the model's batch gets ``adapters[i]`` (None: the base alone)."""
        # one order for a set, whatever the rows' order (else every row joining or leaving would rebuild the tables)
        present = tuple(sorted({a for a in adapters if a is not None}, key=id))
        position = {a: i + 1 for i, a in enumerate(present)}
        device = next(self.model.parameters()).device
        index = torch.tensor([position[a] if a is not None else 0 for a in adapters], device=device)
        self.current = _Batch(index, self._tables(present))
        try:
            yield
        finally:
            self.current = None

    @contextlib.contextmanager
    def applied(self, adapter: RowAdapter | None):
        """Within the block, every row of every forward gets ``adapter`` (a command working with one adapter at a
        time over the loaded base: eval, chat); None: the base alone."""
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
                g = users[0][1].a.new_ones(len(present) + 1, users[0][1].b.shape[0])
                for i, u in users:
                    if u.g is not None:
                        g[i] = u.g
            if len(users) == 1:
                a, b = users[0][1].a, users[0][1].b
            else:
                a, b = torch.cat([u.a for _, u in users]), torch.cat([u.b for _, u in users], dim=1)
            tables[name] = _Table(a, b, owner, g)
        self._cached[present] = tables
        while len(self._cached) > self.KEEP:
            self._cached.popitem(last=False)
        return tables
