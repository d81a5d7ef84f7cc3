"""Replaying a request from scratch without repeating what its client already has.

After a failed round the innocent requests of that round restart from their prompt with the same
seed (server/async_engine.py). Greedy decoding and sampling with the client's seed (coupled
verification, engine/verifier.py) give the target's own tokens whatever was drafted, so their
replay produces the same tokens again; an unseeded request's sampled tokens depend on the
drafts they were verified against, which depend on the load, so its replay alone may not. The
cursor drops the part already handed out and checks that the replay really does agree with it
(a replay that does not fails its request rather than splice two samples).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from engine.request import RequestOutput


class ReplayDivergedError(Exception):
    """The replay produced a token other than one the client already received."""


@dataclass
class ReplayCursor:
    sent_ids: list[int] = field(default_factory=list)  # every token handed to the client
    sent_chars: int = 0
    seen_ids: int = 0  # tokens the current run has produced
    seen_chars: int = 0
    prompt_logprobs_sent: bool = False

    def restart(self) -> None:
        self.seen_ids = self.seen_chars = 0

    def trim(self, output: RequestOutput) -> RequestOutput:
        """``output`` less whatever the client already had; raises ReplayDivergedError."""
        ids = output.new_token_ids
        start, self.seen_ids = self.seen_ids, self.seen_ids + len(ids)
        overlap = max(0, min(len(self.sent_ids) - start, len(ids)))
        if ids[:overlap] != self.sent_ids[start : start + overlap]:
            raise ReplayDivergedError("the replayed request diverged from what was already sent")
        text = output.new_text
        text_start, self.seen_chars = self.seen_chars, self.seen_chars + len(text)
        text_skip = max(0, min(self.sent_chars - text_start, len(text)))
        self.sent_ids += ids[overlap:]
        self.sent_chars += len(text) - text_skip
        prompt_logprobs = output.prompt_logprobs
        if prompt_logprobs is not None:
            if self.prompt_logprobs_sent:
                prompt_logprobs = None
            self.prompt_logprobs_sent = True
        if not overlap and not text_skip and prompt_logprobs is output.prompt_logprobs:
            return output
        return dataclasses.replace(
            output,
            new_token_ids=ids[overlap:],
            new_text=text[text_skip:],
            new_logprobs=None if output.new_logprobs is None else output.new_logprobs[overlap:],
            prompt_logprobs=prompt_logprobs,
        )
