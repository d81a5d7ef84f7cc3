"""``python -m loadtest compare`` through real subprocesses: our server on tiny saved models,
and a system that fails to start."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

from loadtest import compare
from loadtest.cli import main
from loadtest.results import Report
from loadtest.systems import ServerSystem
from tests.engine.conftest import perturbed, tiny_model
from tests.server.conftest import build_tokenizer


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("models")
    tokenizer = build_tokenizer()
    target = tiny_model("llama", seed=0)
    for name, model in (("target", target), ("draft", perturbed(target, 0.1))):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root / "target", root / "draft"


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"task": "qa", "turns": ["hello world"]}\n')
    return path


def test_compare_starts_measures_and_stops_our_server(
    tiny_pair: tuple[Path, Path], prompts: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    code = main([
        "compare", "--systems", "ours-spec", "--target", str(tiny_pair[0]),
        "--draft", str(tiny_pair[1]), "--prompts", str(prompts), "--max-tokens", "4",
        "--concurrency", "1", "--num-requests", "2", "--warmup", "1",
        "--serve-args", "--max-slots 1 --max-len 128", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    (system,) = Report.load(out / "report.json").systems
    assert system.error is None and system.levels[0].ok == 2
    assert system.levels[0].acceptance is not None
    assert "--gamma" not in (out / "logs" / "ours-spec.log").read_text().splitlines()[0]
    assert (out / "throughput.png").is_file()


def test_a_system_that_fails_to_start_is_reported(
    monkeypatch: pytest.MonkeyPatch, prompts: Path, tmp_path: Path
) -> None:
    def broken(name: str, port: int, args: argparse.Namespace) -> ServerSystem:
        script = "import sys; print('no such model', file=sys.stderr); sys.exit(2)"
        return ServerSystem(name, [sys.executable, "-c", script], "/health")

    monkeypatch.setattr(compare, "build_server", broken)
    out = tmp_path / "out"
    code = main(["compare", "--systems", "transformers-serve", "--prompts", str(prompts),
                 "--concurrency", "1", "--out", str(out)])  # fmt: skip
    assert code == 1
    (system,) = Report.load(out / "report.json").systems
    assert "exited with code 2" in (system.error or "")
    assert "no such model" in (system.log_tail or "")
    assert "**not measured**" in (out / "report.md").read_text()


def test_the_peer_runs_without_its_prefix_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    from loadtest import peer_serve, systems

    assert ContinuousBatchingConfig().allow_block_sharing  # transformers' default: shared
    monkeypatch.setattr(
        ContinuousBatchingConfig, "__post_init__", ContinuousBatchingConfig.__post_init__
    )
    peer_serve.disable_block_sharing()
    assert not ContinuousBatchingConfig().allow_block_sharing
    system = systems.transformers_serve(8123, Path("/models/x"), [])
    assert system.argv[1:4] == ["-m", "loadtest.peer_serve", "serve"]
    assert "--continuous-batching" in system.argv
