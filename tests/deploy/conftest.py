"""Shared pieces of the deployment tests: the repository's paths, external linters, and one live
server over tiny models whose /metrics is what the dashboard, promtool and the autoscaler read."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import MODEL, make_engine, serve

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
K8S = ROOT / "deploy" / "k8s"


def find_tool(name: str) -> str | None:
    """A tool on PATH, or in the running venv's bin (where pip-installed linters and .ci/run's
    promtool land; pytest run as .venv/bin/python does not put that on PATH)."""
    found = shutil.which(name)
    if found:
        return found
    local = Path(sys.executable).parent / name
    return str(local) if local.is_file() else None


def require_tool(name: str, how: str) -> str:
    path = find_tool(name)
    if path is None:
        pytest.skip(f"{name} is not installed ({how}); .ci/run installs it")
    return path


def run_tool(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=120)


@dataclass(frozen=True)
class LiveServer:
    url: str
    port: int
    scrape: str  # the /metrics text after a served, a refused and an aborted request


@pytest.fixture(scope="session")
def live() -> Iterator[LiveServer]:
    # One slot and no queue, so a second concurrent request is refused: labelled families such
    # as request_rejected only show their labels once something was counted.
    with serve(make_engine(max_slots=1, step_delay=0.02), max_queue=0) as running:
        url = f"{running.url}/v1/completions"
        short = {"model": MODEL, "prompt": "hello world", "max_tokens": 8, "temperature": 0}
        assert httpx.post(url, json=short, timeout=30).status_code == 200
        long = short | {"max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url, json=long, timeout=30):
            running.wait_for(lambda: running.context.core.num_in_flight == 1)
            assert httpx.post(url, json=short, timeout=30).status_code == 429
        # Leaving the stream unread aborts it; wait until its slot is back.
        running.wait_for(lambda: running.context.core.num_in_flight == 0, timeout=10)
        scrape = httpx.get(f"{running.url}/metrics", timeout=10).text
        port = int(running.url.rsplit(":", 1)[1])
        yield LiveServer(url=running.url, port=port, scrape=scrape)
