"""The replay cursor: a restarted request hands out only what its client does not have yet."""

from __future__ import annotations

import pytest

from engine.request import RequestOutput, RequestStats, TokenLogprob
from server.replay import ReplayCursor, ReplayDivergedError


def _out(ids: list[int], text: str, finished: bool = False) -> RequestOutput:
    logprobs = [TokenLogprob(i, -1.0) for i in ids]
    return RequestOutput("r", ids, text, finished, "length" if finished else None, [1], 0,
                         RequestStats(), new_logprobs=logprobs)  # fmt: skip


def test_a_replay_resumes_where_the_client_is() -> None:
    cursor = ReplayCursor()
    assert cursor.trim(_out([1, 2], "ab")).new_token_ids == [1, 2]
    assert cursor.trim(_out([3], "c")).new_text == "c"
    cursor.restart()  # the round failed; the request starts over, in other round sizes
    first = cursor.trim(_out([1], "a"))
    assert first.new_token_ids == [] and first.new_text == "" and first.new_logprobs == []
    second = cursor.trim(_out([2, 3, 4], "bcd"))
    assert second.new_token_ids == [4] and second.new_text == "d"
    assert [lp.token_id for lp in second.new_logprobs or []] == [4]
    assert cursor.trim(_out([5], "e", finished=True)).new_token_ids == [5]
    assert cursor.sent_ids == [1, 2, 3, 4, 5]


def test_a_diverging_replay_is_refused() -> None:
    cursor = ReplayCursor()
    cursor.trim(_out([1, 2], "ab"))
    cursor.restart()
    with pytest.raises(ReplayDivergedError):
        cursor.trim(_out([1, 9], "ax"))
