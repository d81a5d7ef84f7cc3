from __future__ import annotations

from collections import deque

from engine.request import Request, Status


class Scheduler:
    """Owns slot assignment: FIFO admission into free slots, release on finish or abort."""

    def __init__(self, max_slots: int) -> None:
        self.max_slots = max_slots
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}  # slot -> request
        self._free = list(range(max_slots))

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def admit(self, token_budget: int = 0) -> list[Request]:
        """Moves waiting requests into free slots, first come first served. With a
        ``token_budget``, stops once the admitted prompts hold that many tokens (always
        admitting at least one), so one step's prefill stays short and decoding continues
        between prefills instead of stalling behind a crowd of long prompts."""
        admitted = []
        tokens = 0
        while self.waiting and self._free and not (token_budget and tokens >= token_budget):
            request = self.waiting.popleft()
            # Lowest free slot first keeps busy slots packed, so a batch is often one view.
            self._free.sort()
            request.slot = self._free.pop(0)
            request.status = Status.RUNNING
            self.running[request.slot] = request
            admitted.append(request)
            tokens += len(request.prompt_token_ids)
        return admitted

    def batch(self) -> list[Request]:
        return [self.running[slot] for slot in sorted(self.running)]

    def release(self, request: Request) -> None:
        if request.status is Status.RUNNING:
            del self.running[request.slot]
            self._free.append(request.slot)
        request.status = Status.FINISHED
        request.slot = -1

    def find(self, request_id: str) -> Request | None:
        for request in self.running.values():
            if request.request_id == request_id:
                return request
        for request in self.waiting:
            if request.request_id == request_id:
                return request
        return None

    def remove_waiting(self, request: Request) -> None:
        self.waiting.remove(request)
        request.status = Status.FINISHED

    @property
    def num_free_slots(self) -> int:
        return len(self._free)
