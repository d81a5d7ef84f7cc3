from __future__ import annotations

import pytest
import torch

from engine.device import to_device


def test_host_lists_keep_their_values_and_dtypes_on_the_cpu() -> None:
    cpu = torch.device("cpu")
    assert to_device([True, False], cpu).dtype == torch.bool
    assert to_device([0.5, 1.0], cpu).dtype == torch.float32
    ints = to_device([[3, 4], [5, 6]], cpu)
    assert ints.dtype == torch.int64 and ints.tolist() == [[3, 4], [5, 6]]
    assert to_device([1, 2], cpu, torch.int32).dtype == torch.int32
    assert to_device([], cpu, torch.long).shape == (0,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_copy_is_queued_without_a_wait() -> None:
    cuda = torch.device("cuda")
    busy = torch.randn(4096, 4096, device=cuda)
    for _ in range(8):  # a queue of work a waiting copy would have to sit out
        busy = busy @ busy
        busy /= busy.norm()
    torch.cuda.set_sync_debug_mode("error")
    try:
        values = to_device([7, 8, 9], cuda)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert values.device.type == "cuda" and values.tolist() == [7, 8, 9]
