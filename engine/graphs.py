"""Decode, verify and draft forwards replayed from CUDA graphs.

A 1.5B model's decode step on a GPU is a few hundred small kernels; launched one by one from
Python they take longer than they run, and a 0.5B draft step costs nearly what a target step
does, which leaves speculation little to gain. A CUDA graph launches them all at once. A graph
holds fixed shapes and addresses, so each shape gets its own graph and its own static inputs:
rows rounded up to a power of two (padding rows write to the trash slot and are dropped),
the batch's width as it is (1 for decoding, gamma + 1 for a verify), and the keys attended over
rounded up to a power of two (masked keys cost attention, not correctness). Shapes are captured
on first use, all in one memory pool: a replay may overwrite what another graph left there, so
each replay's output is copied out before anything else runs.

Prompt prefill stays eager (long, rare, many shapes), as does any forward past the largest
captured shape.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.device import to_device

if TYPE_CHECKING:
    from engine.runner import ModelRunner, RaggedBatch

log = logging.getLogger(__name__)

# The fewest keys a graph attends over: below this the saving is not worth another graph.
MIN_KEYS = 128

# Runs a forward on the static inputs and returns (replay, static output); ``replay`` runs it
# again on whatever the static inputs hold then.
Capture = Callable[[Callable[[], torch.Tensor], object], tuple[Callable[[], None], torch.Tensor]]


def cuda_capture(
    run: Callable[[], torch.Tensor], pool: object
) -> tuple[Callable[[], None], torch.Tensor]:
    """Captures ``run`` into a CUDA graph in ``pool``, after one eager run on a side stream
    (cuBLAS and attention kernels set up workspaces on first use, which a capture must not)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: the server's other threads may use CUDA while this one captures.
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        output = run()
    return graph.replay, output


def eager_capture(
    run: Callable[[], torch.Tensor], pool: object
) -> tuple[Callable[[], None], torch.Tensor]:
    """Stands in for ``cuda_capture`` off CUDA: a replay runs the forward again on the static
    inputs and writes the static output, so tests check what reaches a graph through them."""
    output = run()

    def replay() -> None:
        output.copy_(run())

    return replay, output


def bucket(value: int, floor: int, limit: int) -> int:
    """The smallest power of two >= ``value`` and ``floor``, but at most ``limit``."""
    size = floor
    while size < value:
        size *= 2
    return min(size, limit)


@dataclass
class Graph:
    """One captured shape: its static inputs and output, and how to replay it."""

    input_ids: torch.Tensor  # [rows, width]
    plan: torch.Tensor  # [3, rows]: per row its slot, first position and real tokens
    hidden: torch.Tensor  # [rows, width, hidden]
    replay: Callable[[], None]


class ForwardGraphs:
    """Replays a runner's forwards of up to ``max_rows`` x ``max_width`` tokens from graphs."""

    def __init__(
        self,
        runner: ModelRunner,
        max_rows: int,
        max_width: int,
        capture: Capture = cuda_capture,
    ) -> None:
        self.runner = runner
        self.max_rows = max_rows
        self.max_width = max_width
        self.capture = capture
        self.pool = torch.cuda.graph_pool_handle() if capture is cuda_capture else None
        self.graphs: dict[tuple[int, int, int], Graph] = {}
        self.replays = 0
        # Set when a capture fails (a model whose forward waits for the device, say): every
        # forward is eager from then on, as if graphs were off.
        self.broken = False

    def fits(self, rows: int, width: int) -> bool:
        return not self.broken and rows <= self.max_rows and width <= self.max_width

    def shape(self, rows: int, width: int, read_len: int) -> tuple[int, int, int]:
        keys = bucket(read_len, MIN_KEYS, self.runner.capacity)
        return bucket(rows, 1, self.max_rows), width, keys

    def hidden(self, input_ids: torch.Tensor, batch: RaggedBatch) -> torch.Tensor | None:
        """The final hidden states [rows, width, H] of ``input_ids`` (K/V written to the
        slots), from the graph of the batch's shape; None where none could be captured."""
        rows, width = input_ids.shape
        read_len = max(s + n for s, n in zip(batch.starts, batch.num_new, strict=True))
        key = self.shape(rows, width, read_len)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self._capture(*key)
            if graph is None:
                return None
        graph.input_ids[:rows].copy_(input_ids)
        # Padding rows get their trash-slot plan again each time: left over from a fuller batch,
        # they would write their stale tokens into a live slot.
        padding = len(graph.input_ids) - rows
        trash = self.runner.cache.trash_slot
        plan = [
            batch.slots + [trash] * padding,
            batch.starts + [0] * padding,
            batch.num_new + [1] * padding,
        ]
        graph.plan.copy_(to_device(plan, input_ids.device, torch.long))
        graph.replay()
        self.replays += 1
        # The pool is shared: the next replay of any graph may reuse this output's memory.
        return graph.hidden[:rows].clone()

    def _capture(self, rows: int, width: int, keys: int) -> Graph | None:
        runner = self.runner
        device = runner.device
        input_ids = torch.zeros((rows, width), dtype=torch.long, device=device)
        plan = torch.tensor([[runner.cache.trash_slot], [0], [1]], device=device).repeat(1, rows)

        def run() -> torch.Tensor:
            hidden = runner.planned_hidden(input_ids, plan[0], plan[1], plan[2], keys)
            assert hidden is not None
            return hidden

        try:
            with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
                replay, hidden = self.capture(run, self.pool)
        except Exception as error:  # whatever went wrong, eager forwards still work
            self.broken = True
            log.warning("CUDA graphs off: capturing %s failed: %s", (rows, width, keys), error)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return None
        graph = Graph(input_ids, plan, hidden, replay)
        self.graphs[(rows, width, keys)] = graph
        return graph
