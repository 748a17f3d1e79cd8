"""KVCache: every layer's keys and values for incremental decoding, preallocated for the whole batch.

LayerCache is what the model asks of any cache it is given: KVCache here, and the engine's SlotBatch (a decode
step's view of its slot pool, whose rows each write at their own position).

Layout per layer is (B, H, capacity, D). A forward pass writes its T new positions at [length, length + T)
in every layer, then the model advances `length` once. Capacity is set up front (generation knows its final
length) so decoding never reallocates; when a caller goes past it, the buffers grow geometrically.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .config import PersimmonConfig


class LayerCache(Protocol):
    """What a forward pass reads and calls on the cache it is given."""

    chunks: list[tuple[int, int, int]] | None  # (first row, end row, positions to read): None, one read for all

    @property
    def batch_size(self) -> int: ...

    @property
    def length(self) -> int:
        """Positions already filled before this pass (the first new token's position)."""
        ...

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this pass's keys and values (B, H, T, D) for `layer`; return every position to attend over."""
        ...

    def advance(self, num_tokens: int) -> None:
        """After every layer has written: num_tokens more positions are filled."""
        ...


class KVCache:
    """A LayerCache of its own tensors: every row's new positions written at [length, length + T)."""

    chunks = None  # one attention read for all rows (the engine's SlotBatch may split it by row ranges)
    borrowed = False  # True: the tensors are someone else's (a slot pool's rows); growing would detach them

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (batch_size, num_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0

    @classmethod
    def for_model(
        cls, config: PersimmonConfig, batch_size: int, capacity: int, dtype: torch.dtype, device: torch.device | str
    ) -> "KVCache":
        return cls(config.num_hidden_layers, batch_size, config.num_attention_heads, config.head_dim,
                   capacity, dtype, device)

    @classmethod
    def over(cls, keys: list[torch.Tensor], values: list[torch.Tensor]) -> "KVCache":
        """A cache that writes into these tensors (e.g. views of a slot pool's rows), nothing allocated."""
        cache = cls.__new__(cls)
        cache.keys, cache.values, cache.length = list(keys), list(values), 0
        cache.borrowed = True
        return cache

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def get_seq_length(self) -> int:
        return self.length

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write key/value (B, H, T, D) after the filled positions; return this layer's (B, H, length + T, D)."""
        end = self.length + key.shape[2]
        if end > self.capacity:
            self._grow(end)
        self.keys[layer][:, :, self.length : end] = key
        self.values[layer][:, :, self.length : end] = value
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, num_tokens: int) -> None:
        """Mark num_tokens more positions as filled (called once per forward, after every layer wrote)."""
        self.length += num_tokens

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (e.g. drop finished sequences), in the given order."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]

    def _grow(self, needed: int) -> None:
        if self.borrowed:
            raise ValueError(f"{needed} positions do not fit this borrowed cache's {self.capacity}")
        new_capacity = max(needed, 2 * self.capacity)
        pad = new_capacity - self.capacity
        self.keys = [torch.nn.functional.pad(k, (0, 0, 0, pad)) for k in self.keys]
        self.values = [torch.nn.functional.pad(v, (0, 0, 0, pad)) for v in self.values]


def copy_positions(target, rows, source, source_rows, length: int) -> None:
    """Every layer's keys and values: target[rows, :, :length] = source[source_rows, :, :length] (a KVCache or
    the engine's SlotPool on either side)."""
    for mine, theirs in ((target.keys, source.keys), (target.values, source.values)):
        for layer in range(len(mine)):
            mine[layer][rows, :, :length] = theirs[layer][source_rows, :, :length]
