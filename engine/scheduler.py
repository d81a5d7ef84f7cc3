from __future__ import annotations

from collections import deque

from engine.request import Request, Status


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the usual case for a follow-up turn: one C-level comparison
        return n
    low, high = 0, n  # a[:low] == b[:low] and a[:high] != b[:high]
    while high - low > 1:
        middle = (low + high) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle
    return low


class Scheduler:
    """Owns slot assignment: FIFO admission into free slots, release on finish or abort.

    With ``reuse_prefixes``, a free slot remembers which tokens its target K/V still holds (its
    last request's prompt and output), and a new request goes to the free slot sharing the
    longest prefix with its prompt: those positions are not computed again. A chat's next turn
    (the previous turn's prompt and answer, then a new message) or prompts sharing a system
    prompt skip most of their prefill. Busy slots share too (``prefix_donor``): a prompt that
    another running request has computed part of (the n choices of one prompt, questions on one
    document) is copied from its slot, and ``prefix_followers`` says which prompts wait for
    another's prefill rather than compute the same prefix beside it.
    """

    def __init__(self, max_slots: int, reuse_prefixes: bool = False) -> None:
        self.max_slots = max_slots
        self.reuse_prefixes = reuse_prefixes
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}  # slot -> request
        self._free = list(range(max_slots))
        self._resident: dict[int, list[int]] = {}  # free slot -> tokens its target K/V holds

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
            request.slot, request.stats.cached_tokens = self._pick_slot(request)
            self._free.remove(request.slot)
            self._resident.pop(request.slot, None)
            request.status = Status.RUNNING
            self.running[request.slot] = request
            admitted.append(request)
            tokens += len(request.prompt_token_ids)
        return admitted

    def _pick_slot(self, request: Request) -> tuple[int, int]:
        """The free slot for ``request`` and how many of its prompt tokens that slot already
        holds. The prompt's last token is always left to compute (the first round feeds it)."""
        # Lowest free slot first keeps busy slots packed, so a batch is often one view.
        best_slot, best_len = min(self._free), 0
        if not self.reuse_prefixes or request.prompt_logprobs_pending:
            return best_slot, 0  # prompt logprobs need every prompt position computed
        prompt = request.prompt_token_ids[:-1]
        for slot in sorted(self._free):
            shared = common_prefix(self._resident.get(slot, []), prompt)
            if shared > best_len:
                best_slot, best_len = slot, shared
        return best_slot, best_len

    def prefix_donor(self, request: Request) -> tuple[Request | None, int]:
        """The running request whose target slot holds the longest prefix of ``request``'s
        prompt (all but its last token), if longer than what ``request``'s own slot holds, and
        that length. A slot's K/V before its ``target_len`` never change, so they can be
        copied while their request goes on."""
        best, best_len = None, request.target_len
        if not self.reuse_prefixes or request.prompt_logprobs_pending:
            return best, best_len
        needed = request.prompt_token_ids[:-1]
        for holder in self.running.values():
            if holder is request or holder.target_len <= best_len:
                continue
            shared = common_prefix(holder.token_ids[: holder.target_len], needed)
            if shared > best_len:
                best, best_len = holder, shared
        return best, best_len

    def prefix_followers(self, prefilling: list[Request]) -> set[str]:
        """The ids of prefilling requests that should wait for another one's prefill and then
        copy it (``prefix_donor``) rather than compute the same prefix alongside: those for
        which a request at least as far along will compute at least half of what they lack.
        The half keeps a short prompt that merely shares a chat header with a long one from
        waiting out the long one's chunks."""
        leaders: list[Request] = []
        following: set[str] = set()
        if not self.reuse_prefixes:
            return following
        # The furthest along leads; among equals, the first admitted (sorted is stable).
        for request in sorted(prefilling, key=lambda r: -r.target_len):
            needed = request.prompt_token_ids[:-1]
            lacking = len(needed) - request.target_len
            if leaders and lacking > 0 and not request.prompt_logprobs_pending:
                shared = max(common_prefix(r.prompt_token_ids[:-1], needed) for r in leaders)
                if 2 * (shared - request.target_len) >= lacking:
                    following.add(request.request_id)
                    continue
            leaders.append(request)
        return following

    def batch(self) -> list[Request]:
        return [self.running[slot] for slot in sorted(self.running)]

    def release(self, request: Request) -> None:
        if request.status is Status.RUNNING:
            del self.running[request.slot]
            self._free.append(request.slot)
            if self.reuse_prefixes:
                self._resident[request.slot] = request.token_ids[: request.target_len]
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
