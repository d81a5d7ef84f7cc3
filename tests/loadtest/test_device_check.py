"""The prepared run for a lent GPU must not rot between the sessions that get one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_device_check_runs_end_to_end_on_a_cpu(tmp_path: Path) -> None:
    env = os.environ | {"OUT": str(tmp_path), "PYTHON": sys.executable}
    argv = ["--shapes", "tiny", "--concurrency", "1", "2", "--prompt-tokens", "8"]
    argv += ["--max-tokens", "4", "--device", "cpu"]
    done = subprocess.run(
        ["bash", str(ROOT / "loadtest" / "device_check.sh"), *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert {p.name for p in tmp_path.iterdir()} >= {
        "machine.txt", "tests.log", "synthetic_bench.json", "synthetic_bench.log",
        "synthetic_bench_eager.json", "synthetic_bench_eager.log",
    }  # fmt: skip
    # Here the CUDA tests skip (they ran, and said why); there they run.
    tests_log = (tmp_path / "tests.log").read_text()
    assert "needs a CUDA device" in tests_log or "passed" in tests_log
    report = json.loads((tmp_path / "synthetic_bench.json").read_text())
    assert [level["spec"]["concurrency"] for level in report["levels"]] == [1, 2]
    eager = json.loads((tmp_path / "synthetic_bench_eager.json").read_text())
    assert [level["spec"]["concurrency"] for level in eager["levels"]] == [1, 8]
    assert eager["args"]["cuda_graphs"] is False
    assert (
        "tests exit 0, bench exit 0, eager bench exit 0" in (tmp_path / "machine.txt").read_text()
    )
