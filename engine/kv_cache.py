from __future__ import annotations

import torch


class SlotKVCache:
    """Preallocated per-slot K/V buffers that transformers' attention layers write through.

    Layout per layer: ``[num_slots + 1, kv_heads, capacity, head_dim]``. The extra last slot is a
    trash slot: padded positions of a ragged batch write there, so real slots only ever receive
    real tokens. The cache holds no lengths: the engine owns them, which makes rollback a matter
    of not advancing a host integer (nothing is copied or zeroed).

    Buffers are allocated lazily on the first ``update`` of each layer, from the shapes the model
    actually produces, so every architecture (MHA, GQA, odd head sizes) is handled the same way.
    """

    def __init__(self, num_slots: int, capacity: int, device: torch.device) -> None:
        self.num_slots = num_slots
        self.capacity = capacity
        self.device = device
        self.trash_slot = num_slots
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        # The plan of the forward in flight; set by ``plan`` before each model call.
        self._write_slot: torch.Tensor | None = None  # [B, T]
        self._write_pos: torch.Tensor | None = None  # [B, T]
        self._read_slots: torch.Tensor | None = None  # [B]
        self._read_len = 0
        self._contiguous_start: int | None = None

    def plan(
        self,
        write_slot: torch.Tensor,
        write_pos: torch.Tensor,
        read_slots: torch.Tensor,
        read_len: int,
        contiguous_start: int | None,
    ) -> None:
        self._write_slot = write_slot
        self._write_pos = write_pos
        self._read_slots = read_slots
        self._read_len = read_len
        # When the batch's slots are consecutive, reading is a view instead of a gather.
        self._contiguous_start = contiguous_start

    def planned(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The forward in flight's plan: per token its write slot and position [B, T], per row
        the slot it reads [B] (for forwards that write the cache themselves, the C step)."""
        assert self._write_slot is not None and self._write_pos is not None
        assert self._read_slots is not None
        return self._write_slot, self._write_pos, self._read_slots

    def _allocate(self, key: torch.Tensor, value: torch.Tensor) -> None:
        _, kv_heads, _, head_dim = key.shape
        shape = (self.num_slots + 1, kv_heads, self.capacity, head_dim)
        self.keys.append(torch.zeros(shape, dtype=key.dtype, device=self.device))
        vshape = (self.num_slots + 1, value.shape[1], self.capacity, value.shape[3])
        self.values.append(torch.zeros(vshape, dtype=value.dtype, device=self.device))

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states: [B, H, T, D] for the new tokens of this forward
        if layer_idx == len(self.keys):
            self._allocate(key_states, value_states)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        # Advanced indices separated by a slice put the index dims first: target is [B, T, H, D].
        keys[self._write_slot, :, self._write_pos] = key_states.transpose(1, 2)
        values[self._write_slot, :, self._write_pos] = value_states.transpose(1, 2)
        if self._contiguous_start is not None:
            start = self._contiguous_start
            end = start + key_states.shape[0]
            return keys[start:end, :, : self._read_len], values[start:end, :, : self._read_len]
        return (
            keys[self._read_slots, :, : self._read_len],
            values[self._read_slots, :, : self._read_len],
        )

    def copy(self, source: int, dest: int, start: int, end: int) -> None:
        """Positions [start, end) of slot ``source``'s K/V into slot ``dest``, every layer: a
        shared prompt prefix for a few MB of copying instead of a forward over it."""
        with torch.inference_mode():  # the buffers were made inside the forwards' mode
            for keys, values in zip(self.keys, self.values, strict=True):
                keys[dest, :, start:end] = keys[source, :, start:end]
                values[dest, :, start:end] = values[source, :, start:end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        # Only consulted by models to infer positions when none are given; we always pass them.
        return 0

    def slot_keys(self, layer_idx: int, slot: int, length: int) -> torch.Tensor:
        return self.keys[layer_idx][slot, :, :length]

    def slot_values(self, layer_idx: int, slot: int, length: int) -> torch.Tensor:
        return self.values[layer_idx][slot, :, :length]

    @property
    def allocated(self) -> bool:
        return bool(self.keys)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
