"""Adaptive draft length: pick each round's gamma (0 included) for the most tokens per second.

Per request, draft tokens are accepted one after another until the first rejection, so the
number accepted is (truncated) geometric in a per-token acceptance probability alpha. From a
round that drafted g tokens and accepted a, the evidence is a successes plus one failure when
a < g; alpha's estimate is successes / (successes + failures), discounted over time, started
from the engine-wide rate so a new request is not judged on one round, and re-probed now and
then when it has fallen so low that the row stopped drafting. A row then gains

    E(g) = (1 - alpha^(g + 1)) / (1 - alpha)    tokens per round (the target's own token included)

and a round over B rows costs g draft steps plus one verify over B * (g + 1) tokens. Both costs
are measured at start-up for the engine's shapes: on a memory-bound CPU a 5-token verify costs
about as much as a 1-token one, but once the batch is large it does not, so the best gamma
shrinks with load down to 0 (plain decoding) where speculation stops paying. Start-up timings
are taken at an empty context; what each verify token pays for attention over its row's
context is calibrated too, and every round's verify time refines it and a fixed per-round
overhead.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

PRIOR_WEIGHT = 4.0  # pseudo-observations of the engine-wide rate behind each request's estimate
# Each new observation discounts the older ones, so a request that moves from prose into code
# (or back) is judged on its recent rounds.
DECAY = 0.9
# A row held at gamma 0 gets a one-token probe this often: without new evidence a pessimistic
# estimate could never recover.
PROBE_EVERY = 8
# Probes happen only where drafting at this acceptance (a very good draft's) would pay.
PROBE_ALPHA = 0.9
# Verify sizes past this are timed only while the cost per token still falls up to it, which
# counts as flat when the last two sizes' per-token costs are within LINEAR_TOLERANCE.
LINEAR_FROM = 16
LINEAR_TOLERANCE = 0.9


@dataclass
class AcceptanceEstimate:
    successes: float = 0.0
    failures: float = 0.0

    def observe(self, drafted: int, accepted: int) -> None:
        self.successes = DECAY * self.successes + accepted
        self.failures = DECAY * self.failures + (1.0 if accepted < drafted else 0.0)

    def alpha(self, prior: float) -> float:
        s = self.successes + PRIOR_WEIGHT * prior
        f = self.failures + PRIOR_WEIGHT * (1.0 - prior)
        return s / (s + f)


# Finished requests the output-length estimate remembers, and how many must have run past a
# row's present before they say more than its max_tokens does.
LENGTH_HISTORY = 64
LENGTH_MIN_SAMPLES = 4


@dataclass
class OutputLengths:
    """How many more tokens a running request can be expected to produce, from the lengths of
    recent finished requests: a catch-up judged against a request's whole ``max_tokens`` is
    overpaid whenever requests stop early (answers of 10-30 tokens under a cap of 64)."""

    # (tokens generated, whether the request stopped by itself rather than at its cap)
    finished: deque[tuple[int, bool]] = field(default_factory=lambda: deque(maxlen=LENGTH_HISTORY))

    def observe(self, generated: int, stopped: bool) -> None:
        self.finished.append((generated, stopped))

    def expected_remaining(self, generated: int, max_new: int) -> float:
        """Mean of min(L, max_new) - generated over the remembered lengths L beyond
        ``generated``; one cut short by its own cap only says L >= its length, so it counts
        as running to ``max_new``. ``max_new - generated`` until enough lengths are known."""
        cap = max_new - generated
        beyond = [
            min(length - generated, cap) if stopped else cap
            for length, stopped in self.finished
            if length > generated
        ]
        if len(beyond) < LENGTH_MIN_SAMPLES:
            return float(cap)
        return sum(beyond) / len(beyond)


def expected_tokens(alpha: float, gamma: int) -> float:
    if alpha >= 1.0:
        return gamma + 1.0
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


# How fast the learned round costs forget: about the last 20 rounds count.
LEARN_DECAY = 0.95
# The start-up figures weigh as much as this many rounds of evidence...
PRIOR_ROUNDS = 2.0
# ... of this many (query, context) pairs each, a round of 8 tokens at a 1250-token context.
TYPICAL_KEYS = 10_000.0


@dataclass
class CostModel:
    """Seconds per forward as a function of the tokens it carries, by linear interpolation,
    plus what a real round pays beyond the start-up table: a fixed overhead and the attention
    each token pays over its context."""

    target: dict[int, float] = field(default_factory=dict)  # tokens -> seconds at context 0
    draft: dict[int, float] = field(default_factory=dict)
    # Seconds of copying that many tokens of context into draft slots (a prompt-style forward).
    # A table, not a rate per token: on a CPU a long copy takes a faster GEMM than a short one
    # (7 vs 11 ms a token at 256 vs 64 tokens on a Zen 3 box).
    draft_catch_up: dict[int, float] = field(default_factory=dict)
    # Target seconds per (query token, context token): the table is timed at an empty context,
    # but a verify token at a 1500-token context pays ~5 ms more on a 2-core CPU, which makes
    # extra tokens dearer than the table says exactly where the batch is large.
    attention: float = 0.0
    # Seconds every real round pays beyond its forward (the verifier, the host sync, and in the
    # server the HTTP side's share of the CPU): it favours fewer, longer rounds.
    overhead: float = 0.0
    # Whether observe_verify refines overhead and attention (off for hand-written models).
    learn: bool = False
    # Discounted sums of the rounds' (1, keys, keys^2, excess, keys * excess).
    _sums: list[float] = field(default_factory=lambda: [0.0] * 5)
    _prior_attention: float | None = None

    def observe_verify(self, tokens: int, keys: float, seconds: float) -> None:
        """Folds one round's verify time in: its excess over the table, against the (query,
        context) pairs it attended, refits ``overhead + attention * keys`` by discounted least
        squares, held towards the start-up figures (no overhead, the calibrated attention) as
        if they were a couple of rounds, each round's excess capped so a stray stalled round
        moves little. The table itself is not refitted: its slope prices extra tokens, and the
        rounds observe too few sizes to learn it again."""
        if not self.learn:
            return
        if self._prior_attention is None:
            self._prior_attention = self.attention
        table = self._lookup(self.target, tokens)
        excess = min(seconds - table, table)
        sums = [LEARN_DECAY * total for total in self._sums]
        for index, value in enumerate((1.0, keys, keys * keys, excess, keys * excess)):
            sums[index] += value
        self._sums = sums
        count, k, kk, r, kr = sums
        ridge_overhead = PRIOR_ROUNDS
        ridge_attention = PRIOR_ROUNDS * TYPICAL_KEYS**2
        a11, a12, a22 = count + ridge_overhead, k, kk + ridge_attention
        b1, b2 = r, kr + ridge_attention * self._prior_attention
        det = a11 * a22 - a12 * a12
        attention = (a11 * b2 - a12 * b1) / det
        overhead = (b1 - a12 * attention) / a11
        if attention < 0.0:  # rounds cheaper at long contexts: noise; refit the overhead alone
            attention, overhead = 0.0, b1 / a11
        self.attention = attention
        # Never so negative that a forward would look nearly free.
        self.overhead = max(overhead, -0.5 * min(self.target.values()))

    @staticmethod
    def _lookup(table: dict[int, float], tokens: int) -> float:
        sizes = sorted(table)
        if tokens <= sizes[0]:
            return table[sizes[0]]
        for low, high in zip(sizes, sizes[1:], strict=False):
            if tokens <= high:
                share = (tokens - low) / (high - low)
                return table[low] + share * (table[high] - table[low])
        # Past the largest measurement cost grows linearly with the tokens.
        return table[sizes[-1]] * tokens / sizes[-1]

    def verify_seconds(self, tokens: int, context: float = 0.0) -> float:
        """A verify forward of ``tokens`` tokens whose rows hold ``context`` tokens on average."""
        attention = self.attention * context * tokens
        return self._lookup(self.target, tokens) + self.overhead + attention

    def catch_up_seconds(self, tokens: int) -> float:
        """One draft catch-up forward over ``tokens`` tokens (0 without a table)."""
        return self._lookup(self.draft_catch_up, tokens) if self.draft_catch_up else 0.0

    def round_seconds(
        self, rows: int, gamma: int, other_tokens: int = 0, context: float = 0.0
    ) -> float:
        """A round where ``rows`` rows draft ``gamma`` tokens each and other rows add
        ``other_tokens`` tokens to the verify forward, at a mean ``context``."""
        verify = self.verify_seconds(rows * (gamma + 1) + other_tokens, context)
        if not gamma or not self.draft:
            return verify
        return verify + gamma * self._lookup(self.draft, rows)


def measure(
    forward: Callable[[int], None],
    sizes: list[int],
    repeats: int = 3,
    synchronize: Callable[[], None] = lambda: None,
) -> dict[int, float]:
    """Best-of-``repeats`` wall time of ``forward(tokens)`` for each size, after one untimed
    call (the first forward of a shape pays for allocation and cold caches), made
    non-decreasing: a larger forward that timed faster bounds the smaller ones. The sizes take
    turns (1, 2, 4, 1, 2, 4, ...) rather than each being timed in a row: a shared machine's
    slow spell then slows one turn of every size, where timed size by size it would fall on a
    few sizes and make the table's slope, what an extra token costs, wrong (seen on a 2-core
    VM: a 5-token verify timed 1.6x a 1-token one where it costs 1.2x). ``synchronize`` waits
    for the device (a CUDA forward returns when its kernels are queued, not done)."""
    forward(sizes[0])
    synchronize()
    table = dict.fromkeys(sizes, float("inf"))
    for _ in range(repeats):
        for size in sizes:
            started = time.perf_counter()
            forward(size)
            synchronize()
            table[size] = min(table[size], time.perf_counter() - started)
    return _non_decreasing(table)


def _non_decreasing(table: dict[int, float]) -> dict[int, float]:
    sizes = sorted(table)
    for smaller, larger in reversed(list(zip(sizes, sizes[1:], strict=False))):
        table[smaller] = min(table[smaller], table[larger])
    return table


def measure_until_linear(
    forward: Callable[[int], None],
    sizes: list[int],
    synchronize: Callable[[], None] = lambda: None,
) -> dict[int, float]:
    """``measure`` over ``sizes``, but those past ``LINEAR_FROM`` only while a forward's cost
    per token was still falling there. Once it is flat (compute-bound) the table's proportional
    extrapolation past its largest size stands in for them: timing verifies of 24-48 tokens was
    half of the server's start-up on a 2-core CPU (10 of 20 s), where extrapolating from 16
    tokens gives them within 2 %. A GPU's verify stays nearly flat far past 16 tokens, so there
    the larger sizes are still timed."""
    head = [s for s in sizes if s <= LINEAR_FROM] or sizes[:1]
    rest = sizes[len(head) :]
    table = measure(forward, head, synchronize=synchronize)
    if not rest:
        return table
    if len(head) >= 2:
        below, top = head[-2], head[-1]
        if table[top] / top >= LINEAR_TOLERANCE * table[below] / below:
            return table
    table |= measure(forward, rest, synchronize=synchronize)
    return _non_decreasing(table)


def calibration_sizes(limit: int) -> list[int]:
    sizes = [1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 48, 64, 96, 128]
    return [s for s in sizes if s <= limit] or [1]


def best_lookup_length(
    alpha: float,
    available: int,
    costs: CostModel | None,
    round_tokens: int = 1,
    round_emitted: float = 1.0,
    context: float = 0.0,
) -> tuple[int, float]:
    """How many of ``available`` prompt-lookup tokens one row should add (0: none) to a round
    that so far verifies ``round_tokens`` tokens and expects to emit ``round_emitted``, and the
    round's expected tokens per second with that choice. The lookup itself is free; what it
    costs is the growth of the verify forward by its tokens, which at a large batch, where the
    forward is already full, is dear: judged at the margin, so each row's choice pays for
    itself whatever the other rows chose."""
    if costs is None:
        return available, 0.0
    best, best_rate = 0, round_emitted / costs.verify_seconds(round_tokens, context)
    for length in range(1, available + 1):
        emitted = round_emitted + expected_tokens(alpha, length) - 1.0
        rate = emitted / costs.verify_seconds(round_tokens + length, context)
        if rate > best_rate:
            best, best_rate = length, rate
    return best, best_rate


def drafting_saving(
    alpha: float, cap: int, rows: int, costs: CostModel, context: float = 0.0
) -> float:
    """Seconds per emitted token that drafting (at its best gamma) saves a batch of ``rows``
    rows like this one against plain decoding; 0 where drafting does not pay."""
    gamma = choose_gamma([alpha] * rows, [cap] * rows, cap, costs, context=context)
    if gamma == 0:
        return 0.0
    plain = costs.round_seconds(rows, 0, context=context)
    drafted = costs.round_seconds(rows, gamma, context=context) / expected_tokens(alpha, gamma)
    return plain - drafted


def catch_up_pays(
    alpha: float,
    cap: int,
    remaining: float,
    missing: int,
    rows: int,
    costs: CostModel,
    context: float = 0.0,
    saving: float | None = None,
) -> bool:
    """Whether a row whose draft slot misses ``missing`` tokens should catch it up and draft.

    The catch-up is a one-off forward that stalls the whole batch; drafting then saves time on
    each of the row's ``remaining`` tokens. Judged, like the rest, as if every one of ``rows``
    rows made the same choice: B rows' catch-ups (one forward) against their savings.
    ``saving`` is ``drafting_saving``'s answer when the caller has it already (rows alike in a
    round share it).
    """
    if saving is None:
        saving = drafting_saving(alpha, cap, rows, costs, context)
    return saving > 0.0 and remaining * saving > costs.catch_up_seconds(rows * missing)


def choose_gamma(
    alphas: list[float],
    caps: list[int],
    max_gamma: int,
    costs: CostModel,
    other_rows: int = 0,
    other_tokens: int = 0,
    context: float = 0.0,
) -> int:
    """The round's gamma maximising expected emitted tokens per second over the batch: the
    drafting rows (``alphas``, ``caps``) plus ``other_rows`` that do not draft from the model
    (plain or prompt-lookup rows) and put ``other_tokens`` into the same verify forward. Those
    wait through every draft step too, so a lone drafting row in a large batch drafts less."""
    # Rows alike are priced once: catch-up judgements pass a whole batch of one row's copies,
    # which summed row by row made planning quadratic in the batch (3 ms a round at 32 rows).
    kinds = Counter(zip(alphas, caps, strict=True))
    best_gamma, best_rate = 0, 0.0
    for gamma in range(max_gamma + 1):
        tokens = other_rows + sum(
            count * expected_tokens(alpha, min(gamma, cap)) for (alpha, cap), count in kinds.items()
        )
        rate = tokens / costs.round_seconds(len(alphas), gamma, other_tokens, context)
        if rate > best_rate:
            best_gamma, best_rate = gamma, rate
    return best_gamma
