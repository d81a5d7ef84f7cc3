from __future__ import annotations

from engine.config import EngineConfig, SamplingParams
from engine.engine import Engine
from engine.stream_bench import StreamReport, run_streams
from tests.engine.conftest import perturbed, tiny_model


def test_streams_keep_the_concurrency_and_count_every_token() -> None:
    target = tiny_model("llama", seed=0)
    engine = Engine(target, perturbed(target, 0.1), EngineConfig(gamma=3, max_slots=4))
    in_engine: list[int] = []
    real_step = engine.step

    def counted_step() -> list:
        in_engine.append(engine.num_running + engine.num_waiting)
        return real_step()

    engine.step = counted_step  # type: ignore[method-assign]
    prompts = [[5, 6, 7], [20, 21], list(range(40, 60)), [9]]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    report = run_streams(engine, prompts, params, concurrency=2)
    assert report.tokens == 4 * 6
    assert len(report.first_token) == 4
    assert max(in_engine) == 2 and not engine.has_work()
    # Every output after a request's first is one stall, each at most the whole run.
    assert report.stalls and max(report.stalls) <= report.seconds
    summary = report.summary()
    assert summary["tokens_per_s"] > 0 and summary["stall_max_ms"] >= summary["stall_p50_ms"]


def test_the_summary_reads_its_quantiles_from_the_stalls() -> None:
    report = StreamReport(tokens=10, seconds=2.0, stalls=[0.1] * 99 + [5.0], first_token=[1, 3])
    assert report.summary() == {
        "tokens_per_s": 5.0, "stall_p50_ms": 100, "stall_p99_ms": 5000, "stall_max_ms": 5000,
        "ttft_mean_s": 2.0, "ttft_max_s": 3,
    }  # fmt: skip
