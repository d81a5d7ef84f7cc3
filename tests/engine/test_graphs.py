"""CUDA-graph replay of forwards (engine/graphs.py), off CUDA.

``eager_capture`` stands in for a CUDA graph: a replay runs the captured forward again on the
static inputs only, so anything that reached the first capture some other way (a closure over
that batch's data, host lists) shows as wrong outputs here. Capturing on a GPU itself is
checked in tests/engine/test_cuda.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine.config import EngineConfig, SamplingParams
from engine.engine import Engine
from engine.graphs import MIN_KEYS, ForwardGraphs, bucket, eager_capture
from engine.runner import ModelRunner, RaggedBatch
from tests.engine.conftest import ARCHITECTURES, perturbed, tiny_model


def graphed(runner: ModelRunner, max_rows: int, max_width: int) -> ForwardGraphs:
    runner.graphs = ForwardGraphs(runner, max_rows, max_width, capture=eager_capture)
    return runner.graphs


# Operators that hand a device value to the host: on CUDA each waits for the device, which a
# graph capture refuses (and the captured graph could not repeat: it would keep the value read
# at capture time).
HOST_READS = {
    "aten::_local_scalar_dense",  # .item(), bool(), int(), if tensor: ...
    "aten::is_nonzero",
    "aten::equal",
    "aten::nonzero",
    "aten::masked_select",
}


class HostReads(TorchDispatchMode):
    """Records the host reads among the operators run under it, on any device."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        name = func._schema.name
        indices = args[1] if name == "aten::index" else []
        if name in HOST_READS or any(i is not None and i.dtype == torch.bool for i in indices):
            self.seen.append(name)  # a boolean index's output size is a host read too
        return func(*args, **(kwargs or {}))


def test_host_reads_are_seen() -> None:
    x = torch.arange(4.0)
    with HostReads() as reads:
        if x.sum() > 0:
            x.max().item()
        x[x > 1]
        torch.equal(x, x)
    assert reads.seen == [
        "aten::_local_scalar_dense", "aten::_local_scalar_dense", "aten::index", "aten::equal",
    ]  # fmt: skip


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_captured_forward_reads_nothing_back_from_the_device(arch: str) -> None:
    """What the CPU can check of a capture: no operator the forward runs (transformers'
    modules included) reads a value back; a capture on CUDA would fail on one."""
    runner = ModelRunner(tiny_model(arch), num_slots=3, capacity=64)
    reads = HostReads()

    def watched_capture(
        run: Callable[[], torch.Tensor], pool: object
    ) -> tuple[Callable[[], None], torch.Tensor]:
        def watched() -> torch.Tensor:
            with reads:
                return run()

        return eager_capture(watched, pool)

    runner.graphs = ForwardGraphs(runner, 4, 3, capture=watched_capture)
    runner.forward(RaggedBatch([[5, 6, 7], [8]], [2, 0], [0, 0], [3, 1]), output="all")
    runner.forward(RaggedBatch([[9], [10]], [2, 0], [3, 1], [1, 1]), output="all")
    assert runner.graphs.replays == 2 and len(runner.graphs.graphs) == 2
    assert reads.seen == []


def test_bucket_rounds_up_to_a_power_of_two_within_limits() -> None:
    assert [bucket(n, 1, 8) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    assert bucket(3, 1, 6) == 4 and bucket(5, 1, 6) == 6
    assert [bucket(n, MIN_KEYS, 300) for n in (1, 128, 129, 257)] == [128, 128, 256, 300]


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_replayed_forwards_compute_what_eager_ones_do(arch: str) -> None:
    model = tiny_model(arch)
    eager = ModelRunner(model, num_slots=4, capacity=200)
    replayed = ModelRunner(model, num_slots=4, capacity=200)
    graphs = graphed(replayed, max_rows=4, max_width=3)
    prompts = {0: list(range(5, 30)), 2: list(range(40, 47)), 3: list(range(60, 200))}
    for runner in (eager, replayed):
        for slot, prompt in prompts.items():
            runner.prefill(RaggedBatch([prompt], [slot], [0], [len(prompt)]))
    assert graphs.replays == 0  # prompts stay eager
    lengths = {slot: len(p) for slot, p in prompts.items()}
    # Decode and verify batches of each kind: one row, rows in scattered slots, ragged widths,
    # the same shape again with other data (a replay must not see the first batch's), and a
    # row whose keys cross a bucket (140 -> 143 tokens: 256 keys).
    batches = [
        ([[7]], [0]),
        ([[8, 9, 10], [11]], [2, 0]),
        ([[12], [13, 14], [15, 16, 17]], [3, 0, 2]),
        ([[18, 19], [20]], [0, 3]),
        ([[21], [22], [23]], [2, 3, 0]),
    ]
    for tokens, slots in batches:
        starts = [lengths[s] for s in slots]
        batch = RaggedBatch(tokens, slots, starts, [len(t) for t in tokens])
        expected = eager.forward(batch, output="all")
        got = replayed.forward(batch, output="all")
        for row, row_tokens in enumerate(tokens):
            width = len(row_tokens)
            torch.testing.assert_close(got[row, :width], expected[row, :width])
        for slot, row_tokens in zip(slots, tokens, strict=True):
            lengths[slot] += len(row_tokens)
    assert graphs.replays == len(batches)
    # Rows 1, 2, 3, 2, 3 in buckets of 1, 2, 4; widths 1, 3, 3, 2, 1; keys 128, or 256
    # capped at the capacity.
    assert sorted(graphs.graphs) == [
        (1, 1, 128), (2, 2, 200), (2, 3, 128), (4, 1, 200), (4, 3, 200),
    ]  # fmt: skip
    for layer in range(len(eager.cache.keys)):
        for slot, length in lengths.items():
            torch.testing.assert_close(
                replayed.cache.slot_keys(layer, slot, length),
                eager.cache.slot_keys(layer, slot, length),
            )
            torch.testing.assert_close(
                replayed.cache.slot_values(layer, slot, length),
                eager.cache.slot_values(layer, slot, length),
            )


def test_padding_rows_write_the_trash_slot_only() -> None:
    runner = ModelRunner(tiny_model("qwen2"), num_slots=5, capacity=64)
    graphs = graphed(runner, max_rows=4, max_width=2)
    for slot in range(4):
        runner.prefill(RaggedBatch([[5, 6, 7]], [slot], [0], [3]))
    runner.forward(RaggedBatch([[8], [9], [10], [11]], [0, 1, 2, 3], [3] * 4, [1] * 4))
    # Slot 3's token at position 3 is replaced (a rejected draft, fed again), then three rows
    # replay the four-row graph: its fourth row, the one slot 3 filled last time, must write
    # the trash slot, not slot 3 with its old token.
    runner.forward(RaggedBatch([[12]], [3], [3], [1]))
    before = [k.clone() for k in runner.cache.keys]
    runner.forward(RaggedBatch([[13], [14], [15]], [0, 1, 2], [4] * 3, [1] * 3))
    assert sorted(graphs.graphs) == [(1, 1, 64), (4, 1, 64)]  # keys: the whole capacity
    for layer, keys in enumerate(runner.cache.keys):
        assert torch.equal(keys[3], before[layer][3])
        assert torch.equal(keys[4], before[layer][4])  # never used
        assert torch.equal(keys[:3, :, :4], before[layer][:3, :, :4])


def test_forwards_beyond_the_captured_shapes_or_in_prefill_run_eagerly() -> None:
    runner = ModelRunner(tiny_model("qwen2"), num_slots=4, capacity=64)
    graphs = graphed(runner, max_rows=2, max_width=2)
    runner.forward(RaggedBatch([[5, 6, 7]], [0], [0], [3]))  # 3 tokens a row: wider than 2
    runner.forward(RaggedBatch([[5], [6], [7]], [0, 1, 2], [3, 0, 0], [1, 1, 1]))  # 3 rows
    runner.prefill(RaggedBatch([[8]], [3], [0], [1]))
    assert graphs.replays == 0 and not graphs.graphs


def test_a_failed_capture_turns_graphs_off_and_the_forward_still_runs() -> None:
    model = tiny_model("qwen2")
    eager = ModelRunner(model, num_slots=2, capacity=64)
    runner = ModelRunner(model, num_slots=2, capacity=64)

    def failing(run: Callable[[], torch.Tensor], pool: object) -> Any:
        # as a capture does when the forward waits for the device
        raise RuntimeError("operation not permitted when stream is capturing")

    runner.graphs = ForwardGraphs(runner, 2, 2, capture=failing)
    batch = RaggedBatch([[5, 6]], [0], [0], [2])
    torch.testing.assert_close(runner.forward(batch), eager.forward(batch))
    assert runner.graphs.broken and runner.graphs.replays == 0
    assert not runner.graphs.fits(1, 1)


@pytest.mark.parametrize(
    ("temperature", "seed"),
    [(0.0, None), (0.9, 5), (0.9, None)],
    ids=["greedy", "coupled", "rejection"],
)
def test_speculation_on_replayed_forwards_is_what_eager_engines_give(
    temperature: float, seed: int | None
) -> None:
    target = tiny_model("qwen2", seed=0)
    draft = perturbed(tiny_model("qwen2", seed=0), 0.1)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [20, 21], list(range(40, 63)), [7]]
    params = SamplingParams(max_tokens=24, temperature=temperature, seed=seed, ignore_eos=True)
    seeds = [31, 32, 33, 34]  # unseeded requests' own seeds, the same in both engines
    config = EngineConfig(gamma=3, max_slots=4, max_len=128)
    eager = Engine(target, draft, config)
    replayed = Engine(target, draft, config)
    target_graphs = graphed(replayed.target, 4, 4)
    assert replayed.proposer is not None
    draft_graphs = graphed(replayed.proposer.runner, 4, 2)
    expected = [c.token_ids for c in eager.generate(prompts, params, seeds=seeds)]
    got = [c.token_ids for c in replayed.generate(prompts, params, seeds=seeds)]
    assert got == expected
    assert replayed.stats.accepted == eager.stats.accepted
    assert target_graphs.replays == replayed.stats.rounds
    assert draft_graphs.replays > 0
    if temperature == 0.0:
        target_only = Engine(target, None, EngineConfig(gamma=0, max_slots=4, max_len=128))
        assert got == [c.token_ids for c in target_only.generate(prompts, params)]
