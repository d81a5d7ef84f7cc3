"""What one streamed request measured, built chunk by chunk from its SSE payloads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RequestRecord:
    task: str
    ok: bool
    start: float  # perf_counter seconds
    end: float
    error: str | None = None
    ttft: float | None = None
    output_tokens: int = 0
    # False when the stream carried no usage and tokens are counted as content chunks.
    exact_tokens: bool = False
    # True when every content chunk carried cumulative usage, so ITL is per token.
    per_token_itl: bool = False
    itl: list[float] = field(default_factory=list)
    prompt: str | None = None  # Prompt.key of what was sent

    @property
    def e2e(self) -> float:
        return self.end - self.start


def chunk_text(payload: dict[str, Any]) -> str:
    """The generated text in a chat (``delta.content``) or completions (``text``) chunk."""
    parts = []
    for choice in payload.get("choices") or []:
        delta = choice.get("delta")
        text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
        if isinstance(text, str):
            parts.append(text)
    return "".join(parts)


class StreamAccumulator:
    """Folds a stream's chunks into a :class:`RequestRecord`.

    A server may put several tokens in one chunk (ours sends a whole speculative round), so
    when chunks carry cumulative usage (``continuous_usage_stats``) the gap before a chunk of
    k tokens counts as k inter-token gaps of gap/k; otherwise each chunk counts as one token.
    """

    def __init__(self, task: str, start: float) -> None:
        self.task = task
        self.start = start
        self.error: str | None = None
        self._first: float | None = None
        self._last: float | None = None
        self._payloads = 0
        self._chunks = 0
        self._usage_tokens: int | None = None
        self._counted = 0  # usage tokens already attributed to a content chunk
        self._all_chunks_had_usage = True
        self._itl: list[float] = []

    def add(self, now: float, payload: dict[str, Any]) -> None:
        self._payloads += 1
        if "error" in payload and not payload.get("choices"):
            self.error = str(payload["error"])[:500]
            return
        usage = payload.get("usage")
        cumulative = usage.get("completion_tokens") if isinstance(usage, dict) else None
        if isinstance(cumulative, int):
            self._usage_tokens = cumulative
        if not chunk_text(payload):
            return
        self._chunks += 1
        tokens = 1
        if isinstance(cumulative, int):
            tokens = max(cumulative - self._counted, 1)
            self._counted = cumulative
        else:
            self._all_chunks_had_usage = False
        if self._last is None:
            self._first = now
        else:
            gap = now - self._last
            self._itl.extend([gap / tokens] * tokens)
        self._last = now

    def finish(self, now: float) -> RequestRecord:
        exact = self._usage_tokens is not None
        tokens = self._usage_tokens if exact else self._chunks
        # Zero tokens is a valid answer (an immediate end of text); no chunk at all is not.
        ok = self.error is None and self._payloads > 0
        return RequestRecord(
            task=self.task,
            ok=ok,
            start=self.start,
            end=now,
            error=self.error if self.error is not None else (None if ok else "empty stream"),
            ttft=None if self._first is None else self._first - self.start,
            output_tokens=tokens or 0,
            exact_tokens=exact,
            per_token_itl=self._chunks > 0 and self._all_chunks_had_usage,
            itl=self._itl,
        )


def failed(task: str, start: float, end: float, error: str) -> RequestRecord:
    return RequestRecord(task=task, ok=False, start=start, end=end, error=error)
