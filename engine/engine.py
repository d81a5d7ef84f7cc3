from __future__ import annotations

import logging
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from engine import calibration, cpu_attention, cpu_linear
from engine.config import CLI_PROMPT_LOOKUP, EngineConfig, SamplingParams
from engine.cpu_linear import patch_model
from engine.detokenizer import OutputProcessor
from engine.device import to_device
from engine.gamma import CostModel, OutputLengths
from engine.grammar import DraftConstraint, GrammarCompiler, advance, constrain
from engine.logprobs import prompt_logprobs, token_logprobs
from engine.ngram import PromptLookup
from engine.penalties import PenaltyState
from engine.planner import CATCH_UP_ALONE, RoundPlanner, draft_gap, draft_missing
from engine.prefill_pace import CHUNK_GRAIN, PrefillPace
from engine.proposer import DraftProposer, DraftRows, RowSampling
from engine.request import Request, RequestOutput, RequestStats, TokenLogprob
from engine.runner import ModelRunner, RaggedBatch, max_context
from engine.scheduler import Scheduler
from engine.stats import EngineStats, RoundRecord
from engine.verifier import verify

log = logging.getLogger("specserve.engine")


Row = TypeVar("Row")  # what padding_groups sorts: requests, or (request, size) pairs


class PromptTooLongError(ValueError):
    pass


@dataclass
class Completion:
    """Result of one prompt in ``Engine.generate``."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    stats: RequestStats
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


def _size(item: tuple[object, int]) -> int:
    return item[1]


def padding_groups(rows: list[Row], length: Callable[[Row], int]) -> list[list[Row]]:
    """Splits prompts into forwards that waste little on padding: a ragged forward computes
    every row at the longest row's width, so an 800-token prompt beside seven 60-token ones
    would triple the work. Rows join a group (longest first) while the padded size stays
    within 25 % of the real tokens."""
    groups: list[list[Row]] = []
    real = 0
    for row in sorted(rows, key=length, reverse=True):
        if groups and length(groups[-1][0]) * (len(groups[-1]) + 1) <= 1.25 * (real + length(row)):
            groups[-1].append(row)
            real += length(row)
        else:
            groups.append([row])
            real = length(row)
    return groups


def use_cpu_kernels(model: PreTrainedModel, eager_attention: bool, weights: str = "bf16") -> int:
    """Swaps in the CPU bf16 GEMM kernel (with ``weights`` "int8" / "int4", quantised copies of
    the weights for few-row forwards: drafts only); returns how many linears were patched (0 when
    the model is not bf16 on a CPU, or the kernel cannot be built here)."""
    parameter = next(model.parameters())
    if parameter.device.type != "cpu" or parameter.dtype != torch.bfloat16:
        return 0
    patched = patch_model(model, weights=weights)
    if patched and eager_attention:
        # SDPA's CPU kernel is not batch-invariant; ours and eager attention are, so a verify
        # forward gives the very logits one-token decoding would (greedy output identical bit
        # for bit). Ours is also fast over long contexts, where eager's bf16 matmuls are not.
        model.set_attn_implementation(cpu_attention.NAME if cpu_attention.available() else "eager")
    return patched


def _prompt_gemm_probe(model: PreTrainedModel) -> torch.Tensor | None:
    """The weight that stands for ``model``'s layers when timing prompt GEMMs: its largest
    linear weight of at most half the fp32 route's limit (an MLP projection; a layer's fused
    gate/up pair would double the start-up cost and tell the same)."""
    limit = cpu_linear.PROMPT_GEMM_MAX_WEIGHT // 2
    weights = [
        m.weight for m in model.modules() if isinstance(m, nn.Linear) and m.weight.numel() <= limit
    ]
    return max(weights, key=lambda w: w.numel(), default=None)


def draft_vocab_subset(size: int, vocab: int, special_ids: set[int]) -> torch.Tensor | None:
    """The first ``size`` token ids plus the special ones (EOS must stay proposable)."""
    if size <= 0 or size >= vocab:
        return None
    extra = sorted(i for i in special_ids if size <= i < vocab)
    return torch.cat([torch.arange(size), torch.tensor(extra, dtype=torch.long)])


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None) -> set[int]:
    ids: set[int] = set()
    for source in (model.generation_config, model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class Engine:
    """Batched lossless speculative decoding over static KV slots.

    ``add_request`` and ``abort`` may be called from any thread: they only queue work. ``step``
    (one scheduling pass plus one speculative round over every running request) must be called
    from a single thread, the one that owns the models.
    """

    def __init__(
        self,
        target: PreTrainedModel,
        draft: PreTrainedModel | None,
        config: EngineConfig,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.config = config
        self.tokenizer = tokenizer
        # Without a draft model only prompt lookup can propose; without either, gamma is 0.
        self.gamma = config.gamma if draft is not None or config.prompt_lookup else 0
        limits = [config.max_len] + [
            limit - self.gamma - 1
            for m in (target, draft)
            if m is not None and (limit := max_context(m)) is not None
        ]
        self.max_len = min(limits)
        capacity = self.max_len + self.gamma + 1
        if config.cpu_kernels:
            use_cpu_kernels(target, eager_attention=True)
            probe = _prompt_gemm_probe(target) if config.tune_prompt_gemm else None
            if probe is not None and probe.is_cpu:
                cpu_linear.tune_prompt_gemm(probe)  # a no-op unless bf16 on the kernel's CPU
            if draft is not None:
                use_cpu_kernels(draft, eager_attention=False, weights=config.draft_weights)
        fused = config.cpu_kernels and config.fused_decoder
        self.target = ModelRunner(
            target,
            config.max_slots,
            capacity,
            fused=fused,
            graph_width=self.gamma + 1 if config.cuda_graphs else 0,
        )
        if target.config._attn_implementation in ("eager", cpu_attention.NAME):
            # Batch-invariant attention scores each query alone, several times slower than
            # SDPA over a long prompt; target-only and speculative decoding share the same
            # prefill either way, so its numerics need no invariance.
            self.target.prefill_attention = "sdpa"
        self.vocab_size = self.target.vocab_size
        self.processor = OutputProcessor(tokenizer, _eos_ids(target, tokenizer))
        self.grammars = GrammarCompiler(tokenizer, self.vocab_size, self.processor.eos_token_ids)
        self.penalties = PenaltyState(
            config.max_slots, self.vocab_size, self.target.device, self.processor.eos_token_ids
        )
        # Ids a restricted draft head keeps whatever its size (EOS must stay proposable).
        self.special_ids = set(self.processor.eos_token_ids)
        if tokenizer is not None:
            self.special_ids |= set(tokenizer.all_special_ids)
            self.special_ids |= set(tokenizer.added_tokens_decoder)
        self.proposer: DraftProposer | None = None
        if draft is not None and self.gamma > 0:
            # A draft step feeds one token a row, two where the row catches up on a bonus token.
            runner = ModelRunner(
                draft,
                config.max_slots,
                capacity,
                fused=fused,
                graph_width=2 if config.cuda_graphs else 0,
            )
            self.proposer = DraftProposer(
                runner,
                self.vocab_size,
                draft_vocab_subset(config.draft_vocab, self.vocab_size, self.special_ids),
                weights=config.draft_weights if config.cpu_kernels else "bf16",
            )
        self.scheduler = Scheduler(config.max_slots, reuse_prefixes=config.prefix_cache)
        self.stats = EngineStats()
        self.on_round: Callable[[RoundRecord], None] | None = None
        self.costs: CostModel | None = None
        self.output_lengths = OutputLengths()
        self.planner = RoundPlanner(
            config, self.proposer is not None, self.stats, self.output_lengths
        )
        if config.adaptive_gamma and self.gamma > 0:
            self.costs = calibration.start_up_costs(self.target, self.proposer, config, self.gamma)
        self._inbox: deque[Request] = deque()
        self._aborts: deque[str] = deque()
        self._prefilling: list[Request] = []  # admitted, prompt not yet all in the target slot
        self.prefill_pace = PrefillPace()
        self._lock = threading.Lock()
        log.info(self.describe())

    def kv_cache_bytes(self) -> int:
        total = self.target.cache.nbytes()
        if self.proposer is not None:
            total += self.proposer.runner.cache.nbytes()
        return total

    def describe(self) -> str:
        text = (
            f"KV slots: {self.config.max_slots} x {self.max_len} tokens, gamma={self.gamma}, "
            f"pool {self.kv_cache_bytes() / 2**20:.1f} MiB on {self.target.device} "
            f"({self.target.dtype})"
        )
        if self.target.device.type == "cpu" and self.config.cpu_kernels:
            text += f", CPU kernels: {cpu_linear.isa() or 'unavailable (torch)'}"
        return text

    # ---- request intake (thread-safe) -------------------------------------------------------

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: pass token ids")
            return list(self.tokenizer(prompt).input_ids)
        return list(prompt)

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        seed: int | None = None,
    ) -> str:
        """Queues a request. Its random numbers come from ``params.seed``, else from ``seed``
        (a caller replaying an unseeded request), else a fresh one. A sampled request with
        ``params.seed`` set samples the tokens target-only sampling would (the verifier's coupled
        rows), so it repeats under any load; without one, it takes rejection sampling, which
        accepts a few more drafts."""
        token_ids = self.tokenize(prompt)
        if not token_ids:
            raise ValueError("prompt is empty")
        if any(not 0 <= t < self.vocab_size for t in token_ids):
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        if len(token_ids) >= self.max_len:
            raise PromptTooLongError(
                f"prompt has {len(token_ids)} tokens but the context holds {self.max_len} "
                "(prompt plus at least one generated token): shorten the prompt"
            )
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        if params.logit_bias and any(t >= self.vocab_size for t in params.logit_bias):
            raise ValueError(f"logit_bias token ids must be below {self.vocab_size}")
        if params.prediction and any(not 0 <= t < self.vocab_size for t in params.prediction):
            raise ValueError(f"prediction token ids must be in [0, {self.vocab_size})")
        matcher = self.grammars.matcher(params.grammar) if params.grammar is not None else None
        gamma = self.gamma if params.gamma is None else min(params.gamma, self.gamma)
        if params.seed is not None:
            seed = params.seed
        elif seed is None:
            seed = secrets.randbits(62)
        request = Request(
            request_id=request_id or uuid.uuid4().hex,
            prompt_token_ids=token_ids,
            params=params,
            seed=seed,
            gamma=gamma,
            max_new_tokens=min(params.max_tokens, self.max_len - len(token_ids)),
            prompt_logprobs_pending=params.prompt_logprobs is not None,
            matcher=matcher,
        )
        if len(token_ids) == 1 and request.prompt_logprobs_pending:
            request.prompt_logprobs_cache = [None]
        with self._lock:
            self._inbox.append(request)
        return request.request_id

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.append(request_id)

    def has_work(self) -> bool:
        return bool(self._inbox or self._aborts or self.scheduler.waiting or self.scheduler.running)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting) + len(self._inbox)

    # ---- the loop ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        started = time.perf_counter()
        outputs = self._take_inbox()
        admitted = self.scheduler.admit(self.config.prefill_budget)
        if admitted:
            self._admit(admitted)
        if self._prefilling:
            self._prefill_chunks()
        # Rows still prefilling sit out the round: only the last token may be pending.
        batch = [r for r in self.scheduler.batch() if r.prefilled]
        if batch:
            outputs += self._round(batch)
        self.stats.busy_seconds += time.perf_counter() - started
        return outputs

    def _take_inbox(self) -> list[RequestOutput]:
        with self._lock:
            new, self._inbox = list(self._inbox), deque()
            aborts, self._aborts = set(self._aborts), deque()
        for request in new:
            self.scheduler.add(request)
        outputs = []
        for request_id in aborts:
            request = self.scheduler.find(request_id)
            if request is None or request.finished:
                continue
            if request.slot >= 0:
                self.scheduler.release(request)
            else:
                self.scheduler.remove_waiting(request)
            request.finish_reason = "abort"
            outputs.append(self._output(request, [], ""))
        return outputs

    def _admit(self, requests: list[Request]) -> None:
        """New slot holders start prefilling: both slot caches get every prompt token but the
        last, which the first round feeds (so prefill and decode share one invariant: the last
        token is always pending). The target's K/V already in the slot counts as done."""
        for request in requests:
            request.stats.arrival_time = min(request.stats.arrival_time, time.monotonic())
            self.stats.prompt_tokens += len(request.prompt_token_ids)
            prediction = request.params.prediction
            if (
                (self.config.prompt_lookup or prediction)
                and request.gamma > 0
                and request.params.proposer != "draft"
            ):
                # A predicted output turns lookup on for its request even where it is off.
                size = self.config.prompt_lookup or CLI_PROMPT_LOOKUP
                request.lookup = PromptLookup(size, min(2, size))
                request.lookup.extend(request.prompt_token_ids)
                if prediction:
                    request.lookup.predict(request.prompt_token_ids, prediction)
            request.target_len = request.cached_len
            self._prefilling.append(request)

    def _prefill_chunks(self) -> None:
        """Computes a chunk of prompt tokens of the prefilling rows, so that a long prompt is
        prefilled over several steps and neither the decoding rows nor a request arriving
        meanwhile wait out the whole prompt. While rows decode, chunks go first come first
        served, ``prefill_chunk`` tokens a step, fewer where those would take over
        ``prefill_chunk_seconds``. With none decoding (a burst of arrivals, or one long
        prompt alone), the shortest prompts go first, ``prefill_chunk`` tokens at most: on a
        2-core CPU parts of 230-640 tokens of a 1280-token prompt cost what the whole does,
        and a prompt arriving between two parts starts before the long one goes on. A prompt
        whose prefix another slot holds or is computing copies it rather than computing it too
        (``_copy_shared_prefixes``)."""
        self._prefilling = [r for r in self._prefilling if not r.finished]  # aborted meanwhile
        self._copy_shared_prefixes()
        following = self.scheduler.prefix_followers(self._prefilling)
        computing = [r for r in self._prefilling if r.request_id not in following]
        decoding = any(r.prefilled for r in self.scheduler.running.values())
        if decoding:
            work = self._chunks_beside_decoding(computing)
        else:
            left = [(r, r.num_tokens - 1 - r.target_len) for r in computing]
            groups = padding_groups([item for item in left if item[1]], _size)
            # The group closest to its first tokens (by what is left) goes, a chunk of it.
            chunk = self.config.prefill_chunk
            work = [(r, self._part(r, size, chunk)) for r, size in groups[-1]] if groups else []
        for group in padding_groups(work, _size):
            self._prefill_group([r for r, _ in group], [size for _, size in group])
            # Only now: a slot released after a failed prefill must not claim K/V it lacks.
            for request, size in group:
                request.target_len += size
        if following:
            self._copy_shared_prefixes()  # what their leaders have just computed
        self._prefilling = [r for r in self._prefilling if not r.prefilled]

    def _copy_shared_prefixes(self) -> None:
        """Each prefilling row takes the longest prefix of its prompt that another running
        row's target slot holds beyond its own: n choices of one prompt, or requests on one
        document, compute it once. The copied K/V are the donor's bit for bit; the draft slot
        catches up on its own, as after any prefix-cache hit."""
        for request in self._prefilling:
            donor, shared = self.scheduler.prefix_donor(request)
            if donor is not None:
                self.target.cache.copy(donor.slot, request.slot, request.target_len, shared)
                request.stats.cached_tokens += shared - request.target_len
                request.target_len = shared

    def _chunks_beside_decoding(self, prefilling: list[Request]) -> list[tuple[Request, int]]:
        config = self.config
        chunk = self.prefill_pace.chunk_tokens(config.prefill_chunk, config.prefill_chunk_seconds)
        budget = chunk or float("inf")
        work: list[tuple[Request, int]] = []
        for request in prefilling:
            if budget <= 0:
                break
            remaining = request.num_tokens - 1 - request.target_len
            size = int(min(self._part(request, remaining, chunk), budget))
            # Nor a sliver of the budget's rest for the next row: a forward of a few tokens
            # costs about a decode step whatever it computes.
            if work and size < min(remaining, CHUNK_GRAIN):
                break
            if size:
                work.append((request, size))
            budget -= size
        return work

    @staticmethod
    def _part(request: Request, remaining: int, chunk: int) -> int:
        """The next forward's share of a prompt's ``remaining`` tokens under ``chunk`` (0: all):
        even parts, not a full chunk and a sliver, so each part is a fair-sized GEMM. Prompt
        logprobs come from one forward over the whole prompt."""
        if not chunk or request.prompt_logprobs_pending:
            return remaining
        parts = max(1, -(-remaining // chunk))
        return -(-remaining // parts)

    def _prefill_group(self, rows: list[Request], sizes: list[int]) -> None:
        # Each row computes the next ``size`` prompt tokens after the K/V its slot holds.
        pairs = zip(rows, sizes, strict=True)
        batch = RaggedBatch(
            [r.prompt_token_ids[r.target_len : r.target_len + n] for r, n in pairs],
            [r.slot for r in rows],
            [r.target_len for r in rows],
            sizes,
        )
        wants_logprobs = any(r.prompt_logprobs_pending for r in rows)
        started = time.perf_counter()
        hidden = self.target.prefill(batch, output="hidden" if wants_logprobs else "none")
        if self.config.prefill_chunk_seconds:
            self.target.synchronize()  # a CUDA forward returns before it has run
            self.prefill_pace.observe(sum(sizes), time.perf_counter() - started)
        # The draft's copy of the prompt waits until the row first drafts (_catch_up_draft):
        # under load adaptive gamma may never draft for it, and then it would be pure cost.
        for index, request in enumerate(rows):
            if request.prompt_logprobs_pending:
                request.prompt_logprobs_cache = prompt_logprobs(
                    self.target.lm_head,
                    hidden[index, : request.num_tokens - 1],
                    request.prompt_token_ids,
                    request.params.prompt_logprobs,
                )

    def _sampling(self, batch: list[Request]) -> RowSampling:
        return RowSampling.build(
            [r.params for r in batch],
            [r.seed for r in batch],
            self.target.device,
            self.penalties.rows(batch),
        )

    def _catch_up_draft(self, rows: list[Request]) -> None:
        """Feeds the draft, in prompt-style forwards, what its slots miss beyond the last
        token (which the first draft step feeds): a new row's prompt window, or the tokens of
        rounds that copied their drafts or skipped drafting. Left to the draft step, one long
        catch-up would pad every other row of the step to its length."""
        assert self.proposer is not None
        behind = []
        for request in rows:
            request.draft_gap = draft_gap(request, self.config.draft_window)
            if draft_missing(request) >= CATCH_UP_ALONE:
                behind.append(request)
        for group in padding_groups(behind, draft_missing):
            batch = RaggedBatch(
                [self._draft_unseen(r)[:-1] for r in group],
                [r.slot for r in group],
                [r.draft_len for r in group],
                [draft_missing(r) for r in group],
            )
            self.proposer.runner.prefill(batch)
            for request in group:
                request.draft_len = request.num_tokens - 1 - request.draft_gap

    def _draft_unseen(self, request: Request) -> list[int]:
        """The tokens the row's draft slot has not seen, ending with the last one: for an empty
        slot that skips part of the context, the head and then the window."""
        gap = request.draft_gap
        if request.draft_len == 0 and gap > 0:
            head = self.config.draft_head
            return request.token_ids[:head] + request.tokens_from(head + gap)
        return request.tokens_from(gap + request.draft_len)

    def _outside_ids(self, rows: list[Request]) -> set[int]:
        """The rows' context tokens that the draft's restricted head lacks (new tokens only
        are scanned each round)."""
        assert self.proposer is not None
        if self.proposer.subset is None:
            return set()
        union: set[int] = set()
        for request in rows:
            new = request.tokens_from(request.outside_scanned)
            request.outside_ids |= self.proposer.outside(new)
            request.outside_scanned += len(new)
            union |= request.outside_ids
        return union

    def _round(self, batch: list[Request]) -> list[RequestOutput]:
        device = self.target.device
        coming = len(self._prefilling) + len(self.scheduler.waiting)
        plan = self.planner.plan(batch, self.costs, coming)
        row_gamma = plan.row_gamma
        gamma = max(row_gamma)
        num_tokens = [r.num_tokens for r in batch]
        sampling = self._sampling(batch)
        t0 = time.perf_counter()
        draft_tokens = torch.zeros((len(batch), gamma), dtype=torch.long, device=device)
        draft_probs = None
        if sampling.rejection_rows and gamma > 0:
            draft_probs = torch.zeros((len(batch), gamma, self.vocab_size), device=device)
        if plan.draft_rows:
            assert self.proposer is not None
            chosen = [batch[i] for i in plan.draft_rows]
            self._catch_up_draft(chosen)
            rows = DraftRows(
                slots=[r.slot for r in chosen],
                catch_up=[self._draft_unseen(r) for r in chosen],
                draft_lens=[r.draft_len for r in chosen],
                next_positions=[r.num_tokens - r.draft_gap for r in chosen],
                first_positions=[r.num_tokens for r in chosen],
                outside_ids=self._outside_ids(chosen),
            )
            index = to_device(plan.draft_rows, device)
            constraint = None
            if any(r.matcher is not None for r in chosen):
                constraint = DraftConstraint([r.matcher for r in chosen], self.vocab_size)
            proposed, proposed_probs = self.proposer.propose(
                rows, plan.draft_gamma, sampling.select(plan.draft_rows, index), constraint
            )
            draft_tokens[index, : plan.draft_gamma] = proposed
            if draft_probs is not None and proposed_probs is not None:
                draft_probs[index, : plan.draft_gamma] = proposed_probs
        if plan.lookups:
            index = to_device(list(plan.lookups), device)
            copied = [t + [0] * (gamma - len(t)) for t in plan.lookups.values()]
            draft_tokens[index] = to_device(copied, device)
            if draft_probs is not None:
                # A copied token is a certain proposal: q = 1 on it (padding lies past row_gamma).
                certain = torch.zeros_like(draft_probs[index])
                draft_probs[index] = certain.scatter_(-1, draft_tokens[index, :, None], 1.0)
        t1 = time.perf_counter()
        last = to_device([[r.last_token] for r in batch], device)
        verify_batch = RaggedBatch(
            torch.cat([last, draft_tokens], dim=1),
            [r.slot for r in batch],
            [n - 1 for n in num_tokens],
            [g + 1 for g in row_gamma],
        )
        target_logits = self.target.forward(verify_batch, output="all")
        # Penalties and bias shape what is sampled; logprobs report the model's own logits.
        scored = sampling.penalise(target_logits, draft_tokens)
        constrained = [i for i, r in enumerate(batch) if r.matcher is not None]
        if constrained:
            proposed = draft_tokens[constrained].tolist()
            scored = constrain(
                scored,
                target_logits,
                constrained,
                [batch[i].matcher for i in constrained],
                [proposed[j][: row_gamma[i]] for j, i in enumerate(constrained)],
            )
        target_probs = None if sampling.all_greedy else sampling.warp(scored)
        verdict = verify(
            draft_tokens,
            draft_probs,
            scored,
            target_probs,
            to_device(row_gamma, device),
            sampling.greedy,
            sampling.seeds,
            to_device(num_tokens, device),
            sampling.coupled_index(device),
            rejection=bool(sampling.rejection_rows),
        )
        # The round's single device-to-host transfer.
        host = torch.cat([verdict.tokens, verdict.accepted_len[:, None]], dim=1).tolist()
        logprobs = None
        if any(r.params.logprobs is not None for r in batch):
            logprobs = token_logprobs(
                target_logits, verdict.tokens, [r.params.logprobs for r in batch]
            )
        t2 = time.perf_counter()
        if self.costs is not None:
            keys = sum((g + 1) * n for g, n in zip(row_gamma, num_tokens, strict=True))
            self.costs.observe_verify(sum(row_gamma) + len(batch), keys, t2 - t1)

        outputs, emitted_counts = [], []
        drafted_by_model = set(plan.draft_rows)
        for index, request in enumerate(batch):
            accepted = host[index][-1]
            n = num_tokens[index]
            request.target_len = n + accepted
            from_lookup = index in plan.lookups
            if index in drafted_by_model:
                # The draft fed the catch-up tokens and its first draft_gamma - 1 proposals.
                last_fed = n + plan.draft_gamma - 1
                request.draft_len = min(n + accepted, last_fed) - request.draft_gap
            stats = request.stats
            stats.rounds += 1
            stats.drafted += row_gamma[index]
            stats.accepted += accepted
            if len(stats.acceptance_histogram) < request.gamma + 1:
                stats.acceptance_histogram.extend(
                    [0] * (request.gamma + 1 - len(stats.acceptance_histogram))
                )
            lookup = request.lookup
            if from_lookup and lookup is not None and lookup.proposed_from_prediction:
                stats.prediction_accepted += accepted
                stats.prediction_rejected += row_gamma[index] - accepted
            if row_gamma[index] > 0:
                stats.acceptance_histogram[accepted] += 1
                estimate = request.ngram_acceptance if from_lookup else request.acceptance
                estimate.observe(row_gamma[index], accepted)
            if stats.first_token_time is None:
                stats.first_token_time = time.monotonic()
            emitted = host[index][: accepted + 1]
            if request.matcher is not None:
                emitted, complete = advance(request.matcher, emitted)
                if complete:
                    # Nothing can follow: the request ends here, EOS or not (the detokenizer
                    # then hands out any text it was holding back).
                    request.finish_reason = "stop"
            tokens, text = self.processor.append(request, emitted)
            if request.lookup is not None:
                request.lookup.extend(request.tokens_from(len(request.lookup.tokens)))
            emitted_counts.append(len(tokens))
            stats.generated += len(tokens)
            row_logprobs = logprobs[index][: len(tokens)] if logprobs else None
            if request.finish_reason is not None:
                self.scheduler.release(request)
            outputs.append(self._output(request, tokens, text, row_logprobs))

        accepted_counts = [row[-1] for row in host]
        self.stats.rounds += 1
        self.stats.row_rounds += len(batch)
        self.stats.drafted += sum(row_gamma)
        self.stats.accepted += sum(accepted_counts)
        rejected = [accepted_counts[i] < row_gamma[i] for i in range(len(batch))]
        self.stats.rejections += sum(rejected)
        for index in plan.lookups:
            self.stats.ngram_drafted += row_gamma[index]
            self.stats.ngram_accepted += accepted_counts[index]
            self.stats.ngram_rejections += rejected[index]
        self.stats.generated_tokens += sum(emitted_counts)
        if self.on_round is not None:
            self.on_round(
                RoundRecord(
                    batch_size=len(batch),
                    gamma=gamma,
                    drafted=row_gamma,
                    ngram=[i in plan.lookups for i in range(len(batch))],
                    accepted=accepted_counts,
                    emitted=emitted_counts,
                    draft_seconds=t1 - t0,
                    verify_seconds=t2 - t1,
                )
            )
        return outputs

    def _output(
        self,
        request: Request,
        tokens: list[int],
        text: str,
        logprobs: list[TokenLogprob] | None = None,
    ) -> RequestOutput:
        finished = request.finish_reason is not None
        if finished:
            request.stats.finish_time = time.monotonic()
            self.stats.finished_requests += 1
            if request.finish_reason in ("stop", "length"):
                stopped = request.finish_reason == "stop"
                self.output_lengths.observe(len(request.output_token_ids), stopped)
        prompt_lp = None
        if request.prompt_logprobs_pending and request.prompt_logprobs_cache is not None:
            prompt_lp = request.prompt_logprobs_cache
            request.prompt_logprobs_pending = False
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=tokens,
            new_text=text,
            finished=finished,
            finish_reason=request.finish_reason,
            prompt_token_ids=request.prompt_token_ids,
            num_generated=len(request.output_token_ids),
            stats=request.stats,
            new_logprobs=logprobs,
            prompt_logprobs=prompt_lp,
        )

    # ---- synchronous batch API ----------------------------------------------------------------

    def generate(
        self,
        prompts: list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams],
        seeds: list[int] | None = None,
    ) -> list[Completion]:
        """Runs prompts to completion, batched; results in prompt order. ``seeds``: per
        prompt, as ``add_request``'s ``seed``."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        row_seeds: list[int | None] = [None] * len(prompts) if seeds is None else list(seeds)
        ids = [
            self.add_request(p, sp, seed=seed)
            for p, sp, seed in zip(prompts, params, row_seeds, strict=True)
        ]
        state: dict[str, dict] = {
            i: {"tokens": [], "text": "", "logprobs": [], "prompt_logprobs": None} for i in ids
        }
        done: dict[str, Completion] = {}
        while len(done) < len(ids):
            for out in self.step():
                if out.request_id not in state:
                    continue
                entry = state[out.request_id]
                entry["tokens"] += out.new_token_ids
                entry["text"] += out.new_text
                if out.new_logprobs:
                    entry["logprobs"] += out.new_logprobs
                if out.prompt_logprobs is not None:
                    entry["prompt_logprobs"] = out.prompt_logprobs
                if out.finished:
                    done[out.request_id] = Completion(
                        request_id=out.request_id,
                        prompt_token_ids=out.prompt_token_ids,
                        token_ids=entry["tokens"],
                        text=entry["text"],
                        finish_reason=out.finish_reason or "stop",
                        stats=out.stats,
                        logprobs=entry["logprobs"] or None,
                        prompt_logprobs=entry["prompt_logprobs"],
                    )
        return [done[i] for i in ids]
