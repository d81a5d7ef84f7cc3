"""Starting, probing and stopping systems as subprocesses: nothing may outlive stop()."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import httpx
import pytest

from loadtest.process import ManagedProcess, SystemStartError, free_port

# Ignores SIGTERM and leaves a grandchild that ignores it too: only a group SIGKILL ends both.
STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
print(child.pid, flush=True)
time.sleep(60)
"""


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (a container's init may not reap)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def gone_soon(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_http_server_starts_answers_and_is_gone_after_stop(tmp_path: Path) -> None:
    port = free_port()
    argv = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)]
    with ManagedProcess(argv, tmp_path / "logs" / "http.log", cwd=tmp_path) as process:
        waited = process.wait_ready(f"http://127.0.0.1:{port}/", timeout_s=30)
        assert waited < 30 and process.running()
        assert httpx.get(f"http://127.0.0.1:{port}/").status_code == 200
        pid = process.pid
    assert not process.running() and gone_soon(pid)
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
    assert "http.server" in (tmp_path / "logs" / "http.log").read_text().splitlines()[0]


def test_stubborn_process_group_is_killed_after_the_grace(tmp_path: Path) -> None:
    log = tmp_path / "stubborn.log"
    process = ManagedProcess([sys.executable, "-c", STUBBORN], log)
    process.start()
    deadline = time.monotonic() + 10
    # The log starts with the command line; the script's own output is the pid on the last line.
    while not log.read_text().splitlines()[-1].isdigit():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    grandchild = int(log.read_text().splitlines()[-1])
    started = time.monotonic()
    process.stop(grace_s=0.5)
    assert time.monotonic() - started < 5
    assert gone_soon(process.pid) and gone_soon(grandchild)


def test_a_system_that_dies_is_reported_with_its_log(tmp_path: Path) -> None:
    script = "import sys; print('cannot load the model', flush=True); sys.exit(3)"
    process = ManagedProcess([sys.executable, "-c", script], tmp_path / "dead.log")
    with process, pytest.raises(SystemStartError) as info:
        process.wait_ready(f"http://127.0.0.1:{free_port()}/health", timeout_s=30)
    assert "code 3" in str(info.value) and "cannot load the model" in info.value.log_tail


def test_a_system_that_never_answers_times_out(tmp_path: Path) -> None:
    script = "import time; time.sleep(60)"
    process = ManagedProcess([sys.executable, "-c", script], tmp_path / "mute.log")
    with process, pytest.raises(SystemStartError, match="not ready after"):
        process.wait_ready(f"http://127.0.0.1:{free_port()}/health", 1.0, interval_s=0.1)
    assert gone_soon(process.pid)
