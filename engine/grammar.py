"""Structured output: grammars (a JSON schema, any JSON object, a regex, a list of choices, a
Lark or GBNF grammar) that constrain what a request may generate, matched by llguidance.

The constraint is a mask on the target's verify logits: position t of a row allows what the
grammar allows after the row's output and its drafts 0..t-1. Verification then treats the
masked target law like any other, so speculation stays lossless for it: greedy output equals
constrained target-only greedy, and sampling follows the masked distribution. The draft
model's proposals are masked the same way as they are drafted (``DraftConstraint``): an
ungrammatical draft has target probability 0 and would always be rejected. Prompt-lookup
copies are not: they are cut at their first ungrammatical token.

Matching is inherently sequential per token, so this file walks constrained rows token by
token on the host (about 0.1-0.3 ms a token for the 152k-token vocabulary); unconstrained
batches never enter it.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict

import llguidance
import llguidance.hf
import torch
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from engine.config import GrammarSpec

BITS = 32  # tokens per word of llguidance's bitmask
COMPILED_KEPT = 64  # grammars kept compiled (the server checks a request's, the engine runs it)


def grammar_source(spec: GrammarSpec) -> str:
    """The llguidance grammar for ``spec``; ValueError when its text cannot be one."""
    try:
        if spec.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"})
        if spec.kind == "json_schema":
            schema = json.loads(spec.text)
            if not isinstance(schema, dict):
                raise ValueError("a JSON schema must be a JSON object")
            return llguidance.LLMatcher.grammar_from_json_schema(schema)
        if spec.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(spec.text)
        if spec.kind == "choice":
            choices = json.loads(spec.text)
            if not (
                isinstance(choices, list)
                and choices
                and all(isinstance(c, str) and c for c in choices)
            ):
                raise ValueError("choices must be a non-empty list of non-empty strings")
            return llguidance.grammar_from("choice", spec.text)
        return llguidance.grammar_from("grammar", spec.text)  # Lark, or GBNF converted to it
    except json.JSONDecodeError as exc:
        raise ValueError(f"the {spec.kind} is not valid JSON: {exc}") from exc


class GrammarCompiler:
    """Builds a request's matcher. The tokenizer's llguidance twin costs ~1-3 s to build for a
    152k-token vocabulary, so it is built once, on the first request that asks for a grammar;
    compiled grammars are kept (the most recent COMPILED_KEPT) and each request gets a copy."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | None,
        vocab_size: int,
        eos_token_ids: set[int],
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[GrammarSpec, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()  # add_request runs on callers' threads

    def _ll_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                if not isinstance(self.tokenizer, PreTrainedTokenizerFast):
                    raise ValueError("structured output needs the model's (fast) tokenizer")
                if len(self.tokenizer) > self.vocab_size:
                    raise ValueError(
                        f"structured output needs a tokenizer within the model's vocabulary "
                        f"({len(self.tokenizer)} tokens > {self.vocab_size})"
                    )
                self._tokenizer = llguidance.hf.from_tokenizer(
                    self.tokenizer,
                    n_vocab=self.vocab_size,
                    eos_token=self.eos_token_ids or None,
                )
        return self._tokenizer

    def matcher(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        """A fresh matcher for ``spec``; ValueError, with llguidance's reason, when the grammar
        is invalid."""
        with self._lock:
            compiled = self._compiled.get(spec)
            if compiled is not None:
                self._compiled.move_to_end(spec)
                return compiled.deep_copy()
        tokenizer = self._ll_tokenizer()
        compiled = llguidance.LLMatcher(tokenizer, grammar_source(spec), log_level=0)
        if compiled.is_error():
            raise ValueError(f"invalid {spec.kind}: {compiled.get_error()}")
        with self._lock:
            self._compiled[spec] = compiled
            while len(self._compiled) > COMPILED_KEPT:
                self._compiled.popitem(last=False)
        return compiled.deep_copy()


def _fill(matcher: llguidance.LLMatcher, words: torch.Tensor) -> None:
    matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * words.element_size())


def verify_bitmask(
    matchers: list[llguidance.LLMatcher], drafts: list[list[int]], width: int, vocab: int
) -> torch.Tensor:
    """int32 bitmask [rows, width, words] (host): row r, position t allows what its matcher
    allows after drafts[r][:t]. Positions past a row's first ungrammatical draft are never
    reached by acceptance; they repeat that draft's position so no row is left empty. The
    matchers end as they began."""
    words = -(-vocab // BITS)
    bitmask = torch.empty((len(matchers), width, words), dtype=torch.int32)
    for row, (matcher, proposed) in enumerate(zip(matchers, drafts, strict=True)):
        # Checked first: a matcher fed a token it rejects stays in its error state for good.
        valid = matcher.validate_tokens(proposed)
        consumed = 0
        for position in range(valid + 1):
            _fill(matcher, bitmask[row, position])
            # A completed grammar takes EOS without counting it, so rollback must not either.
            if position < valid and not matcher.is_stopped():
                matcher.consume_token(proposed[position])
                consumed += 1
        bitmask[row, valid + 1 :] = bitmask[row, valid]
        matcher.rollback(consumed)
    return bitmask


def allowed_tokens(bitmask: torch.Tensor, vocab: int, device: torch.device) -> torch.Tensor:
    """bool [rows, width, vocab] from an int32 bitmask [rows, width, words]."""
    shifts = torch.arange(BITS, dtype=torch.int32, device=device)
    bits = (bitmask.to(device).unsqueeze(-1) >> shifts) & 1
    return bits.flatten(-2)[..., :vocab].bool()


def constrain(
    logits: torch.Tensor,
    model_logits: torch.Tensor,
    rows: list[int],
    matchers: list[llguidance.LLMatcher],
    drafts: list[list[int]],
) -> torch.Tensor:
    """``logits`` [B, T, V] (after penalties and bias) with what the grammars of ``rows`` rule
    out at -inf, as a new tensor. ``model_logits``: the model's own, the fallback where the
    grammar and the other rules leave nothing."""
    _, width, vocab = logits.shape
    allowed = allowed_tokens(verify_bitmask(matchers, drafts, width, vocab), vocab, logits.device)
    index = torch.tensor(rows, device=logits.device)
    masked = logits[index].masked_fill(~allowed, float("-inf"))
    # Where a grammar allows only what another rule forbids (min_tokens masks EOS, and a
    # complete grammar allows nothing else), the grammar wins rather than leave an empty law.
    # A complete grammar ends its request before that position's token is emitted anyway.
    empty = torch.isneginf(masked).all(dim=-1, keepdim=True)
    if bool(empty.any()):
        masked = torch.where(empty & allowed, model_logits[index], masked)
    return logits.index_copy(0, index, masked)


class DraftConstraint:
    """The grammars of a draft pass's rows, walked along its drafts: each draft step proposes
    only what the row's grammar allows after the drafts before it. An ungrammatical draft
    would be rejected for sure and cut the row's round short; masked, the draft proposes its
    best grammatical token instead. Lossless as any draft is: the proposer samples from the
    masked law and reports that law as q. The matchers end as they began (``rollback``)."""

    def __init__(self, matchers: list[llguidance.LLMatcher | None], vocab: int) -> None:
        self.rows = [i for i, m in enumerate(matchers) if m is not None]
        self.matchers = [m for m in matchers if m is not None]
        self.vocab = vocab
        self._consumed = [0] * len(self.rows)
        # A row whose grammar completed, or took a draft the mask did not give it (an empty
        # mask's fallback), drafts on unmasked: its later drafts are the verifier's to reject.
        self._live = [not m.is_stopped() for m in self.matchers]

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` [B, V] with what the grammars rule out at -inf (a row whose grammar
        leaves nothing keeps its logits)."""
        words = -(-self.vocab // BITS)
        bitmask = torch.full((len(self.rows), 1, words), -1, dtype=torch.int32)
        for j, matcher in enumerate(self.matchers):
            if self._live[j]:
                _fill(matcher, bitmask[j, 0])
        allowed = allowed_tokens(bitmask, self.vocab, logits.device)[:, 0]
        extra = logits.shape[-1] - self.vocab
        if extra:  # columns past the grammar's vocabulary: left as they are (none in practice)
            allowed = torch.nn.functional.pad(allowed, (0, extra), value=True)
        whole = len(self.rows) == logits.shape[0]
        index = None if whole else torch.tensor(self.rows, device=logits.device)
        rows = logits if index is None else logits[index]
        masked = rows.masked_fill(~allowed, float("-inf"))
        empty = torch.isneginf(masked).all(dim=-1, keepdim=True)
        if bool(empty.any()):  # the drafting already waits on the host every step
            masked = torch.where(empty, rows, masked)
        return masked if index is None else logits.index_copy(0, index, masked)

    def consume(self, tokens: list[int]) -> None:
        """Moves each row's grammar past its draft of this step (``tokens``: one per row)."""
        for j, (row, matcher) in enumerate(zip(self.rows, self.matchers, strict=True)):
            if not self._live[j]:
                continue
            # Checked first: a matcher fed a token it rejects stays in its error state.
            if matcher.validate_tokens([tokens[row]]) != 1:
                self._live[j] = False
                continue
            matcher.consume_token(tokens[row])
            self._consumed[j] += 1
            self._live[j] = not matcher.is_stopped()

    def rollback(self) -> None:
        for j, matcher in enumerate(self.matchers):
            matcher.rollback(self._consumed[j])
            self._consumed[j] = 0
        self._live = [not m.is_stopped() for m in self.matchers]


def advance(matcher: llguidance.LLMatcher, tokens: list[int]) -> tuple[list[int], bool]:
    """Feeds a round's emitted tokens to the row's matcher; returns the tokens up to where the
    grammar completed (if it did) and whether it did."""
    for index, token in enumerate(tokens):
        if not matcher.consume_token(token):
            # Emitted tokens were sampled under the matcher's own mask: this is a bug.
            raise RuntimeError(f"grammar rejected an emitted token: {matcher.get_error()}")
        if matcher.is_stopped():
            return tokens[: index + 1], True
    return tokens, False
