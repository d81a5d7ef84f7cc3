"""`specserve serve` as a user runs it: a separate process configured by flags and environment."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server.cli import main
from tests.engine.conftest import tiny_model
from tests.server.conftest import build_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", seed=0).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_command_end_to_end(model_dir: Path) -> None:
    port = _free_port()
    env = os.environ | {
        "SPECSERVE_PORT": str(port),
        "SPECSERVE_API_KEY": "k",
        "SPECSERVE_MAX_SLOTS": "2",
        "SPECSERVE_LOG_LEVEL": "info",
    }
    command = [sys.executable, "-m", "server.cli", "serve", "--target", str(model_dir),
               "--draft", str(model_dir), "--gamma", "3", "--dtype", "fp32", "--max-len", "128",
               "--no-adaptive-gamma",
               "--model-name", "served"]  # fmt: skip
    process = subprocess.Popen(
        command, env=env, cwd=Path(__file__).parents[2], stderr=subprocess.PIPE, text=True
    )
    url, auth = f"http://127.0.0.1:{port}", {"Authorization": "Bearer k"}
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, "the server exited during start-up"
            try:
                if httpx.get(f"{url}/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server never became ready"
            time.sleep(0.2)
        card = httpx.get(f"{url}/v1/models", headers=auth).json()["data"][0]
        assert card["id"] == "served" and card["max_model_len"] == 128
        assert card["speculative_decoding"]["num_speculative_tokens"] == 3
        assert card["speculative_decoding"]["draft_model"] == str(model_dir)
        body = {"model": str(model_dir), "prompt": "hello", "max_tokens": 4, "ignore_eos": True}
        result = httpx.post(f"{url}/v1/completions", json=body, headers=auth, timeout=30).json()
        assert result["model"] == "served" and result["usage"]["completion_tokens"] == 4
        # A draft identical to the target is always right.
        assert result["metrics"]["speculative_decoding"]["draft_acceptance_rate"] == 1.0
    finally:
        process.terminate()
        _, log = process.communicate(timeout=30)
    # uvicorn shuts down gracefully, then re-raises the signal so the parent sees it.
    assert process.returncode in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in log


def test_serve_reports_bad_configuration(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--max-queue", "-1"]) == 2
    assert "--max-queue must be >= 0" in capsys.readouterr().err
    assert main(["serve", "--target", "/no/such/model", "--draft", "none"]) == 1
    assert "/no/such/model" in capsys.readouterr().err


def test_generate_prints_the_completion_alone_on_stdout(
    model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from engine.config import EngineConfig, SamplingParams
    from engine.engine import Engine
    from engine.loader import load_pair

    prompt = "hello world"
    common = ["--target", str(model_dir), "--max-tokens", "5", "--no-chat"]
    assert main(["generate", prompt, *common, "--draft", str(model_dir), "--gamma", "2"]) == 0
    out, err = capsys.readouterr()
    target, _ = load_pair(str(model_dir), "none")
    engine = Engine(target.model, None, EngineConfig(gamma=0), target.tokenizer)
    [expected] = engine.generate([prompt], SamplingParams(max_tokens=5, temperature=0))
    # Greedy speculation gives target-only decoding's text; the stats go to stderr.
    assert out == expected.text + "\n"
    assert f"tokens={len(expected.token_ids)} " in err and "gamma=2" in err

    # Below 1 it rewards repeats: the random model, left alone, repeats nothing.
    penalties = ["--repetition-penalty", "0.2", "--presence-penalty", "0.5"]
    assert main(["generate", prompt, *common, "--draft", "none", *penalties]) == 0
    params = SamplingParams(
        max_tokens=5, temperature=0, repetition_penalty=0.2, presence_penalty=0.5
    )
    [penalised] = engine.generate([prompt], params)
    assert penalised.text != expected.text  # the flags reach the engine
    assert capsys.readouterr().out == penalised.text + "\n"


def test_generate_reports_bad_input_in_one_line(
    model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Inconsistent settings are refused before any model loads (this target does not exist).
    missing = ["--target", "/no/such/model", "--draft", "none"]
    for flags, message in [
        # Named by the flags that set them, not by the config fields behind those.
        (["--draft-window", "64", "--draft-head", "64"],
         "--draft-head must be >= 0 and below --draft-window (64)"),
        (["--gamma", "-1"], "--gamma must be >= 0"),
        (["--max-tokens", "0"], "--max-tokens must be >= 1"),
        (["--temperature", "-1"], "--temperature must be >= 0"),
        (["--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--presence-penalty", "3"], "--presence-penalty must be between -2 and 2"),
        (["--threads", "-2"], "--threads must be >= 1"),
    ]:  # fmt: skip
        assert main(["generate", "hi", *missing, *flags]) == 2
        assert capsys.readouterr().err.startswith(f"specserve: {message}")
    assert main(["serve", *missing, "--draft-window", "8", "--draft-head", "9"]) == 2
    assert "--draft-head" in capsys.readouterr().err
    # A model that cannot be found, a prompt that cannot fit: one line each, no traceback.
    assert main(["generate", "hi", *missing]) == 1
    err = capsys.readouterr().err
    assert "/no/such/model" in err and "Traceback" not in err
    too_long = ["--target", str(model_dir), "--draft", "none", "--max-len", "4", "--no-chat"]
    assert main(["generate", "a b c d e f g h", *too_long]) == 1
    err = capsys.readouterr().err
    assert "shorten the prompt" in err and "Traceback" not in err


def test_engine_settings_come_from_flags_and_environment(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import argparse

    from server.cli import add_model_arguments, build_engine

    def config(argv: list[str]):
        parser = argparse.ArgumentParser()
        add_model_arguments(parser)
        args = parser.parse_args(["--target", str(model_dir), "--draft", "none", *argv])
        engine, _, _ = build_engine(args)
        return engine.config

    assert config([]).prefill_chunk == 512
    assert config(["--prefill-chunk", "7"]).prefill_chunk == 7
    monkeypatch.setenv("SPECSERVE_PREFILL_CHUNK", "0")
    assert config([]).prefill_chunk == 0
    assert config([]).prefill_chunk_seconds == 6.0
    assert config(["--prefill-chunk-seconds", "0.5"]).prefill_chunk_seconds == 0.5
    monkeypatch.setenv("SPECSERVE_PREFILL_CHUNK_SECONDS", "0")
    assert config([]).prefill_chunk_seconds == 0.0
    assert config([]).draft_weights == "int4"
    assert config(["--draft-weights", "int8"]).draft_weights == "int8"
    monkeypatch.setenv("SPECSERVE_DRAFT_WEIGHTS", "bf16")
    assert config([]).draft_weights == "bf16"
    with pytest.raises(SystemExit):
        config(["--draft-weights", "int2"])
    assert (config([]).draft_window, config([]).draft_head) == (256, 128)
    assert config(["--draft-head", "0"]).draft_head == 0
    # A smaller window alone keeps the head within it: half of it.
    assert config(["--draft-window", "64"]).draft_head == 32
    monkeypatch.setenv("SPECSERVE_DRAFT_HEAD", "64")
    assert config([]).draft_head == 64
    # Adaptive gamma's timings are kept beside the converted models unless told otherwise.
    monkeypatch.setenv("SPECSERVE_CACHE", str(model_dir.parent / "cache"))
    assert config([]).calibration_cache == str(model_dir.parent / "cache" / "calibration")
    assert config(["--no-calibration-cache"]).calibration_cache is None
    monkeypatch.setenv("SPECSERVE_CALIBRATION_CACHE", "0")
    assert config([]).calibration_cache is None


def test_the_engine_is_built_in_a_thread_that_ends() -> None:
    """Model code run in the main thread would leave an OpenMP worker pool behind beside the
    engine thread's (see serve._in_passing_thread): loading happens in a thread that ends."""
    import threading

    from engine.loader import ModelNotFoundError
    from server.serve import _in_passing_thread

    ran_in: list[threading.Thread] = []

    def build() -> str:
        ran_in.append(threading.current_thread())
        return "engine"

    assert _in_passing_thread(build) == "engine"
    assert ran_in[0] is not threading.current_thread() and not ran_in[0].is_alive()
    assert ran_in[0].daemon  # Ctrl-C during loading must not wait for the load to finish

    def missing() -> None:
        raise ModelNotFoundError("no such model")

    with pytest.raises(ModelNotFoundError, match="no such model"):
        _in_passing_thread(missing)
