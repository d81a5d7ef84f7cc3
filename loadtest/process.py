"""Starts a system as a subprocess, waits for it to answer, and stops it with its children."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import httpx


class SystemStartError(Exception):
    def __init__(self, message: str, log_tail: str) -> None:
        super().__init__(message)
        self.log_tail = log_tail


def free_port() -> int:
    # The port is released before the child binds it; a race is possible but harmless here:
    # the child then fails to start and is reported like any other start failure.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def read_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class ManagedProcess:
    """A child in its own process group, so stopping it also stops whatever it spawned
    (uvicorn workers, compile helpers) and nothing else on the machine."""

    def __init__(
        self,
        argv: Sequence[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            log.write(("$ " + " ".join(self.argv) + "\n").encode())
            log.flush()
            self.popen = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        assert self.popen is not None, "not started"
        return self.popen.pid

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        return read_tail(self.log_path, lines)

    def wait_ready(self, url: str, timeout_s: float, interval_s: float = 0.5) -> float:
        """Polls ``url`` until it answers 200; returns the seconds it took. Fails fast, with the
        log tail, if the process exits first."""
        started = time.monotonic()
        last = "no answer yet"
        while time.monotonic() - started < timeout_s:
            if not self.running():
                code = self.popen.returncode if self.popen else None
                raise SystemStartError(f"exited with code {code} before ready", self.log_tail())
            try:
                status = httpx.get(url, timeout=5).status_code
                if status == 200:
                    return time.monotonic() - started
                last = f"HTTP {status}"
            except httpx.HTTPError as exc:
                last = type(exc).__name__
            time.sleep(interval_s)
        raise SystemStartError(f"not ready after {timeout_s:.0f}s ({last})", self.log_tail())

    def wait(self, timeout_s: float) -> int | None:
        """Exit code, or None if it is still running after ``timeout_s``."""
        assert self.popen is not None, "not started"
        try:
            return self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def _signal_group(self, sig: signal.Signals) -> None:
        # The group id is the child's pid (start_new_session); gone already is fine.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, sig)

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM to the group, SIGKILL after ``grace_s``; idempotent."""
        if self.popen is None:
            return
        self._signal_group(signal.SIGTERM)
        if self.wait(grace_s) is None:
            self._signal_group(signal.SIGKILL)
            self.popen.wait()
        # Children that ignored SIGTERM outlive their parent in the same group.
        self._signal_group(signal.SIGKILL)

    def __enter__(self) -> ManagedProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
