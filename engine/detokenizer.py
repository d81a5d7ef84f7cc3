from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from engine.request import Request

REPLACEMENT_CHAR = "\ufffd"


def _held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of ``text`` that could still grow into a stop string or a complete
    UTF-8 character, and so must not be streamed yet."""
    hold = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:size]):
                hold = size
                break
    stripped = len(text) - len(text.rstrip(REPLACEMENT_CHAR))
    return max(hold, stripped)


class OutputProcessor:
    """Applies the stop conditions to freshly accepted tokens and turns them into text deltas."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None, eos_token_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids

    def decode(self, token_ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def append(self, request: Request, new_tokens: list[int]) -> tuple[list[int], str]:
        """Adds accepted tokens to ``request`` and returns (tokens emitted, text emitted)."""
        params = request.params
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= self.eos_token_ids
        emitted: list[int] = []
        stopped_by_token = False
        for token in new_tokens:
            request.output_token_ids.append(token)
            emitted.append(token)
            if token in stop_ids:
                request.finish_reason, stopped_by_token = "stop", True
                break
            if len(request.output_token_ids) >= request.max_new_tokens:
                request.finish_reason = "length"
                break
        text_ids = request.output_token_ids[:-1] if stopped_by_token else request.output_token_ids
        text = self._text(request, text_ids)
        if params.stop:
            text, emitted = self._apply_stop_strings(request, text, emitted)
        if request.finish_reason is None:
            end = len(text) - _held_back(text, params.stop)
        else:
            end = len(text)
        end = max(end, request.emitted_text_len)
        delta = text[request.emitted_text_len : end]
        request.emitted_text_len = end
        return emitted, delta

    def _text(self, request: Request, text_ids: list[int]) -> str:
        """The text of ``text_ids`` (the completion so far), decoding only its recent tokens:
        the settled text plus whatever the tokens since ``prefix_offset`` add to it. Decoding
        the whole completion every round cost O(length) per round, a few ms per row per round
        at a thousand tokens, which a fast device would notice."""
        if self.tokenizer is None:
            return ""
        window = text_ids[request.prefix_offset :]
        prefix_text = self.decode(window[: request.read_offset - request.prefix_offset])
        new_text = self.decode(window)
        pending = new_text[len(prefix_text) :]
        # A trailing partial character (or nothing new) stays pending: the window must still
        # hold its bytes when the rest of them arrive.
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT_CHAR):
            request.settled_text += pending
            request.prefix_offset = request.read_offset
            request.read_offset = len(text_ids)
            pending = ""
        return request.settled_text + pending

    def _apply_stop_strings(
        self, request: Request, text: str, emitted: list[int]
    ) -> tuple[str, list[int]]:
        # A stop string may straddle the previous delta, so search from where it could begin.
        longest = max(len(s) for s in request.params.stop)
        search_from = max(0, request.emitted_text_len - longest + 1)
        # With min_tokens, only a stop string that ends past the text of the first min_tokens
        # tokens counts (vLLM checks none before then).
        min_tokens = request.params.min_tokens
        if len(request.output_token_ids) < min_tokens:
            return text, emitted
        if request.stop_floor is None:  # decoded once: it cannot change
            request.stop_floor = len(self.decode(request.output_token_ids[:min_tokens]))
        floor = request.stop_floor
        hits = [
            (i, s)
            for s in request.params.stop
            if (i := text.find(s, max(search_from, floor - len(s) + 1))) >= 0
        ]
        if not hits:
            return text, emitted
        index, stop = min(hits)
        # Keep tokens only up to the one that completed the stop string.
        outputs = request.output_token_ids
        first_new = len(outputs) - len(emitted)
        for keep in range(first_new + 1, len(outputs) + 1):
            if len(self.decode(outputs[:keep])) >= index + len(stop):
                break
        del outputs[keep:]
        request.finish_reason = "stop"
        return text[:index], emitted[: keep - first_new]
