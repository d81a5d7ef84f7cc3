from __future__ import annotations

import pytest

from engine.prefill_pace import CHUNK_GRAIN, DECAY, PrefillPace


def test_before_any_prefill_was_timed_the_token_chunk_holds() -> None:
    pace = PrefillPace()
    assert pace.chunk_tokens(512, 3.0) == 512
    assert pace.chunk_tokens(0, 3.0) == 0


def test_a_slow_pace_shrinks_the_chunk_to_whole_grains_within_the_seconds() -> None:
    pace = PrefillPace()
    pace.observe(100, 2.0)  # 50 tokens/s: a 2-core CPU and a 1.5B target
    assert pace.seconds_per_token == pytest.approx(0.02)
    assert pace.chunk_tokens(512, 3.0) == 128  # 150 fit, rounded down to a grain
    assert pace.chunk_tokens(512, 0.1) == CHUNK_GRAIN  # never below one grain
    assert pace.chunk_tokens(100, 3.0) == 100  # never above the token chunk
    assert pace.chunk_tokens(512, 0.0) == 512  # seconds 0: tokens only
    assert pace.chunk_tokens(0, 3.0) == 0  # whole prompts stay whole


def test_a_fast_pace_keeps_the_token_chunk() -> None:
    pace = PrefillPace()
    pace.observe(512, 0.01)  # a GPU
    assert pace.chunk_tokens(512, 3.0) == 512


def test_the_pace_follows_recent_prefills_and_ignores_tiny_ones() -> None:
    pace = PrefillPace()
    pace.observe(100, 2.0)
    pace.observe(100, 4.0)
    assert pace.seconds_per_token == pytest.approx(DECAY * 0.02 + (1 - DECAY) * 0.04)
    before = pace.seconds_per_token
    pace.observe(CHUNK_GRAIN - 1, 10.0)  # mostly fixed cost
    pace.observe(64, 0.0)
    assert pace.seconds_per_token == before
