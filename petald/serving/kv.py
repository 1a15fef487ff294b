"""The KV cache of inference sessions, laid out so that the steps of several sessions run as one forward pass.

Each session owns, for each of its layers, a key and a value buffer [batch, kv heads, capacity, head dim] that
grows by doubling up to the session's max_length: a step writes its new tokens in place, so a session that steps
alone attends to a view of its own buffer and nothing is copied (transformers' DynamicCache concatenates, copying
the whole history, at every step).

A batched step (StepCache) stacks the rows of several sessions, each with its own cached length, padding mask and
positions. The layer's projections and MLP run once on all rows; its attention gets, per layer, the sessions'
keys and values side by side, right-padded to the longest (one copy of each session's history, the same bytes the
attention reads anyway), with a mask that gives every row its own causal offset and hides the padding. A session
that leaves mid-batch only stops receiving results: its buffers are released with the session object."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from petald.errors import SpanError

MIN_CAPACITY = 16  # tokens allocated at a session's first step, at least


class SessionCache:
    """One session's keys and values for `num_layers` consecutive layers (local numbering from `first_layer`)."""

    def __init__(self, num_layers: int, first_layer: int, max_length: int):
        self.num_layers = num_layers
        self.first_layer = first_layer
        self.max_length = max_length
        self.length = 0  # tokens cached in every layer
        self._keys: list[torch.Tensor | None] = [None] * num_layers
        self._values: list[torch.Tensor | None] = [None] * num_layers

    def crop(self, length: int) -> None:
        """Keep the first `length` tokens (the rest is overwritten by the next step)."""
        if not 0 <= length <= self.length:
            raise SpanError(f"cannot keep {length} tokens: the session holds {self.length}")
        self.length = length

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens' `keys`, `values` [batch, heads, T, dim] of module layer `layer` after the cached
        ones (the length moves on only at `advance`); views of this layer's keys and values so far."""
        index = layer - self.first_layer
        end = self.length + keys.shape[2]
        if end > self.max_length:
            raise SpanError(f"this step would make the session {end} tokens long, over its max_length")
        buffer_keys, buffer_values = self._keys[index], self._values[index]
        if buffer_keys is None or buffer_keys.shape[2] < end:
            capacity = min(
                self.max_length, max(end, MIN_CAPACITY, 2 * (0 if buffer_keys is None else buffer_keys.shape[2]))
            )
            buffer_keys = _grown(buffer_keys, keys, capacity, self.length)
            buffer_values = _grown(buffer_values, values, capacity, self.length)
            self._keys[index], self._values[index] = buffer_keys, buffer_values
        buffer_keys[:, :, self.length : end] = keys
        buffer_values[:, :, self.length : end] = values
        return buffer_keys[:, :, :end], buffer_values[:, :, :end]

    def nbytes(self) -> int:
        """The bytes its buffers hold (allocated capacity, not only the cached tokens)."""
        return sum(b.nbytes for b in (*self._keys, *self._values) if b is not None)

    def advance(self, tokens: int) -> None:
        self.length += tokens


def _grown(old: torch.Tensor | None, like: torch.Tensor, capacity: int, keep: int) -> torch.Tensor:
    batch, heads, _, dim = like.shape
    buffer = like.new_empty(batch, heads, capacity, dim)
    if old is not None and keep:
        buffer[:, :, :keep] = old[:, :, :keep]
    return buffer


@dataclass(frozen=True)
class StepRows:
    """One session's part of a batched step: its cache and the padding mask of its tokens so far and new."""

    cache: SessionCache
    mask: torch.Tensor  # [batch, cached + new], 1 = real token


class StepCache:
    """The cache of one forward pass over the rows of several sessions (or one), all adding `new_tokens` tokens.

    Passed to the decoder layers as their cache: `update` stores each session's new keys and values in its own
    buffers and returns what the attention attends to. The span builds its mask and positions from
    `key_mask`, `offsets` (attention_bias, position_ids); a sliding-window layer gets a bias of its own."""

    def __init__(self, parts: Sequence[StepRows], new_tokens: int):
        self.parts = list(parts)
        self.new_tokens = new_tokens
        self.rows = [part.mask.shape[0] for part in self.parts]
        self.key_length = max(part.cache.length for part in self.parts) + new_tokens
        masks = [part.mask.long() for part in self.parts]
        self.key_mask = torch.cat([_pad_right(mask, self.key_length) for mask in masks])  # [rows, keys]
        self.offsets = torch.cat(  # cached tokens of each row: where its new tokens start among the keys
            [torch.full((part.mask.shape[0],), part.cache.length, dtype=torch.long) for part in self.parts]
        )

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Keys and values [rows, heads, key_length, dim] of module layer `layer_idx` after storing the new ones."""
        stored = []
        begin = 0
        for rows, part in zip(self.rows, self.parts, strict=True):
            stored.append(part.cache.write(layer_idx, keys[begin : begin + rows], values[begin : begin + rows]))
            begin += rows
        if len(stored) == 1:
            return stored[0]  # the session's own buffer: nothing copied
        return _stack_padded([k for k, _ in stored], self.key_length), _stack_padded(
            [v for _, v in stored], self.key_length
        )

    def commit(self) -> None:
        """The pass is done: every session's cache now holds its new tokens."""
        for part in self.parts:
            part.cache.advance(self.new_tokens)

    def position_ids(self) -> torch.Tensor:
        """[rows, new tokens]: each new token's position among its row's real tokens (padding does not count)."""
        positions = self.key_mask.cumsum(-1) - 1
        positions = positions.masked_fill(self.key_mask == 0, 1)
        index = self.offsets[:, None] + torch.arange(self.new_tokens)[None, :]
        return positions.gather(1, index)

    def attention_bias(self, dtype: torch.dtype, sliding_window: int | None = None) -> torch.Tensor:
        """[rows, 1, new tokens, keys], added to attention scores: 0 where a new token may attend (its row's real
        tokens up to itself; with `sliding_window`, only the last `sliding_window` of its row's slots, itself
        included, as transformers' sliding-window layers count them, padding too), the dtype's minimum elsewhere."""
        keys = torch.arange(self.key_length)[None, None, None, :]
        queries = self.offsets[:, None, None, None] + torch.arange(self.new_tokens)[None, None, :, None]
        allowed = (keys <= queries) & self.key_mask[:, None, None, :].bool()
        if sliding_window is not None:
            allowed &= keys > queries - sliding_window
        bias = torch.zeros(allowed.shape, dtype=dtype)
        return bias.masked_fill(~allowed, torch.finfo(dtype).min)


def _pad_right(tensor: torch.Tensor, length: int) -> torch.Tensor:
    return torch.nn.functional.pad(tensor, (0, length - tensor.shape[-1]))


def _stack_padded(tensors: list[torch.Tensor], length: int) -> torch.Tensor:
    """[sum of batches, heads, length, dim]: `tensors` [batch_i, heads, length_i, dim] stacked, zero-padded."""
    first = tensors[0]
    out = first.new_zeros(sum(t.shape[0] for t in tensors), first.shape[1], length, first.shape[3])
    begin = 0
    for tensor in tensors:
        out[begin : begin + tensor.shape[0], :, : tensor.shape[2]] = tensor
        begin += tensor.shape[0]
    return out
