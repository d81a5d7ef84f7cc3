"""Host lists onto the device without waiting for it."""

from __future__ import annotations

import torch


def to_device(values: list, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``values`` as a tensor on ``device``. On CUDA the copy goes through pinned memory and
    is queued behind the kernels already in flight: ``torch.tensor(values, device=cuda)`` copies
    from pageable memory, which waits for all of them, and a round builds a few dozen such
    index tensors (every forward's slots, starts and lengths), each such wait stalling the host
    until the GPU ran dry. The pinned block is reused only once the copy is done (torch's
    caching host allocator records it), so the host list may go at once."""
    tensor = torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return tensor
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
