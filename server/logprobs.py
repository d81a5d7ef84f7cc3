"""Target log-probabilities in OpenAI's two wire formats (legacy completions and chat)."""

from __future__ import annotations

import math
from typing import Any

from engine.request import TokenLogprob
from server.tokens import TokenText

_FLOOR = -9999.0  # JSON has no -inf; a token the model rules out gets this instead


def _finite(value: float) -> float:
    return value if math.isfinite(value) else _FLOOR


class CompletionLogprobs:
    """Builds ``{tokens, token_logprobs, top_logprobs, text_offset}`` chunk by chunk; the text
    offsets continue across chunks of one choice."""

    def __init__(self, tokens: TokenText) -> None:
        self.tokens = tokens
        self.offset = 0

    def build(self, entries: list[tuple[int, TokenLogprob | None]]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {
            "tokens": [],
            "token_logprobs": [],
            "top_logprobs": [],
            "text_offset": [],
        }
        for token_id, entry in entries:
            text = self.tokens.token_str(token_id)
            out["tokens"].append(text)
            out["text_offset"].append(self.offset)
            self.offset += len(text)
            if entry is None:  # the first prompt token has no context
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(_finite(entry.logprob))
            top: dict[str, float] = {}
            for alt_id, value in entry.top.items():
                # Two ids can print alike (partial UTF-8); keep the likelier, which comes first.
                top.setdefault(self.tokens.token_str(alt_id), _finite(value))
            out["top_logprobs"].append(top)
        return out


def _entry(tokens: TokenText, token_id: int, logprob: float) -> dict[str, Any]:
    text = tokens.token_str(token_id)
    return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode())}


def chat_logprobs(tokens: TokenText, entries: list[TokenLogprob]) -> list[dict[str, Any]]:
    result = []
    for entry in entries:
        item = _entry(tokens, entry.token_id, entry.logprob)
        item["top_logprobs"] = [_entry(tokens, t, v) for t, v in entry.top.items()]
        result.append(item)
    return result
