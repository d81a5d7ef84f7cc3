"""/metrics parses as Prometheus text and moves exactly as the served requests say it should."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import MODEL, RunningServer

P = "specserve:"
COUNTERS = ["request_success", "request_rejected", "prompt_tokens", "generation_tokens",
            "spec_decode_num_drafts", "spec_decode_num_draft_tokens",
            "spec_decode_num_accepted_tokens",
            "spec_decode_num_accepted_tokens_per_pos"]  # fmt: skip
GAUGES = ["num_requests_running", "num_requests_waiting", "kv_slots_used", "kv_slots_capacity",
          "spec_decode_gamma"]  # fmt: skip
HISTOGRAMS = ["time_to_first_token_seconds", "inter_token_latency_seconds",
              "e2e_request_latency_seconds", "spec_decode_accepted_tokens_per_round",
              "batch_size_per_round"]  # fmt: skip


def test_exposition_has_every_family(server: RunningServer) -> None:
    response = httpx.get(f"{server.url}/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f.type for f in text_string_to_metric_families(response.text)}
    assert {P + n: "counter" for n in COUNTERS}.items() <= families.items()
    assert {P + n: "gauge" for n in GAUGES}.items() <= families.items()
    assert {P + n: "histogram" for n in HISTOGRAMS}.items() <= families.items()
    samples = server.metrics()
    assert samples[(P + "kv_slots_capacity", ())] == 4
    assert samples[(P + "spec_decode_gamma", ())] == 4
    positions = {
        k[1] for k in samples if k[0] == P + "spec_decode_num_accepted_tokens_per_pos_total"
    }
    assert positions == {(("position", str(i)),) for i in range(4)}


def test_counters_follow_a_request(server: RunningServer) -> None:
    server.wait_for(lambda: server.context.core.num_in_flight == 0)
    before = server.metrics()
    result = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": MODEL, "prompt": "hello world", "max_tokens": 30, "temperature": 0,
              "ignore_eos": True},
        timeout=30,
    ).json()  # fmt: skip
    after = server.metrics()

    def delta(name: str, **labels: str) -> float:
        key = (P + name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    spec = result["metrics"]["speculative_decoding"]
    usage = result["usage"]
    assert delta("request_success_total", finished_reason="length") == 1
    assert delta("request_success_total", finished_reason="stop") == 0
    assert delta("prompt_tokens_total") == usage["prompt_tokens"]
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    assert delta("prompt_tokens_cached_total") == cached
    assert delta("generation_tokens_total") == usage["completion_tokens"] == 30
    assert delta("spec_decode_num_drafts_total") == spec["num_spec_steps"]
    assert delta("spec_decode_num_draft_tokens_total") == spec["num_draft_tokens"]
    assert delta("spec_decode_num_accepted_tokens_total") == spec["num_accepted_draft_tokens"]
    histogram = spec["acceptance_histogram"]
    for position in range(4):
        # Position i is counted by every draft that accepted more than i tokens.
        want = sum(histogram[position + 1 :])
        assert (
            delta("spec_decode_num_accepted_tokens_per_pos_total", position=str(position)) == want
        )
    assert delta("spec_decode_accepted_tokens_per_round_count") == spec["num_spec_steps"]
    assert delta("spec_decode_accepted_tokens_per_round_sum") == spec["num_accepted_draft_tokens"]
    assert delta("time_to_first_token_seconds_count") == 1
    assert delta("e2e_request_latency_seconds_count") == 1
    assert delta("inter_token_latency_seconds_count") == 29  # every token after the first
    assert delta("batch_size_per_round_count") >= spec["num_spec_steps"]
    assert delta("batch_size_per_round_sum") == delta("batch_size_per_round_count")  # alone
    assert after[(P + "num_requests_running", ())] == 0
    assert after[(P + "kv_slots_used", ())] == 0
