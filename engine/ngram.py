"""Prompt lookup: draft tokens copied from the request's own context, at no model cost.

Summaries, RAG answers, code edits and translations keep repeating spans of their prompt (and
of what they already wrote). When the last n tokens occurred before, the tokens that followed
that occurrence are a free guess at what comes next; the target verifies them like any draft.
As a proposal this is a point mass (q = 1 on the copied token), so sampling stays lossless
through the same rejection rule: accept with probability p(x), else sample max(p - q, 0).
"""

from __future__ import annotations


class PromptLookup:
    """Where each n-gram of one request's tokens last occurred, kept up to date incrementally.

    ``tables[n][ngram]`` is the position right after the latest occurrence of ``ngram`` whose
    continuation is already known, so a lookup never finds the sequence's own suffix.
    """

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.sizes = list(range(max_ngram, min_ngram - 1, -1))  # longest match first
        self.tables: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.sizes}
        self.tokens: list[int] = []
        self._indexed = 0  # continuations starting before this position are in the tables

    def extend(self, tokens: list[int]) -> None:
        self.tokens.extend(tokens)

    def _index(self) -> None:
        # A continuation starting at i needs i < len(tokens): the suffix itself is not indexed.
        tokens = self.tokens
        end = len(tokens) - 1
        for position in range(self._indexed, end + 1):
            for n, table in self.tables.items():
                if position >= n:
                    table[tuple(tokens[position - n : position])] = position
        self._indexed = max(self._indexed, end + 1)

    def propose(self, limit: int) -> list[int]:
        """Up to ``limit`` tokens that followed the latest earlier occurrence of the longest
        matching suffix; empty when no suffix of a tracked size occurred before."""
        if limit <= 0:
            return []
        self._index()
        tokens = self.tokens
        for n in self.sizes:
            if len(tokens) <= n:
                continue
            start = self.tables[n].get(tuple(tokens[-n:]))
            if start is not None:
                return tokens[start : start + limit]
        return []
