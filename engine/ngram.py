"""Prompt lookup: draft tokens copied from the request's own context, at no model cost.

Summaries, RAG answers, code edits and translations keep repeating spans of their prompt (and
of what they already wrote). When the last n tokens occurred before, the tokens that followed
that occurrence are a free guess at what comes next; the target verifies them like any draft.
As a proposal this is a point mass (q = 1 on the copied token), so sampling stays lossless
through the same rejection rule: accept with probability p(x), else sample max(p - q, 0).
"""

from __future__ import annotations

from bisect import bisect_right


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
        # A predicted output (``predict``): its tokens, and per n-gram every position right
        # after it there, ascending; proposals walk forward through it past ``_cursor``.
        self.prediction: list[int] = []
        self._prediction_tables: dict[int, dict[tuple[int, ...], list[int]]] = {}
        self._cursor = 0
        self.proposed_from_prediction = False  # where the latest proposal came from

    def predict(self, lead: list[int], prediction: list[int]) -> None:
        """Takes a text the output is expected to follow (OpenAI's predicted outputs), read
        as if it came right after ``lead`` (the context so far), so that the context's own
        ending already proposes its start. Its n-grams are looked up before the context's."""
        reference = lead[-max(self.sizes) :] + prediction
        start = len(reference) - len(prediction)
        tables: dict[int, dict[tuple[int, ...], list[int]]] = {n: {} for n in self.sizes}
        for position in range(start, len(reference)):
            for n, table in tables.items():
                if position >= n:
                    table.setdefault(tuple(reference[position - n : position]), []).append(position)
        self.prediction, self._prediction_tables, self._cursor = reference, tables, start - 1

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
        """Up to ``limit`` tokens that followed the longest matching suffix: in the predicted
        output if there is one and it matches there, else at the suffix's latest earlier
        occurrence in the context; empty when no suffix of a tracked size occurred before."""
        self.proposed_from_prediction = False
        if limit <= 0:
            return []
        tokens = self.tokens
        for n, table in self._prediction_tables.items():
            positions = table.get(tuple(tokens[-n:])) if len(tokens) >= n else None
            if positions:
                # The first occurrence past where the last proposal started, else the latest:
                # the output follows the prediction forward, repeated lines included.
                at = bisect_right(positions, self._cursor)
                self._cursor = positions[at] if at < len(positions) else positions[-1]
                self.proposed_from_prediction = True
                return self.prediction[self._cursor : self._cursor + limit]
        self._index()
        for n in self.sizes:
            if len(tokens) <= n:
                continue
            start = self.tables[n].get(tuple(tokens[-n:]))
            if start is not None:
                return tokens[start : start + limit]
        return []
