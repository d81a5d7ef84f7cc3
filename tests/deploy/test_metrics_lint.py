"""promtool, Prometheus' own checker, reads a live /metrics scrape.

`promtool check metrics` exits 1 when the exposition does not parse and 3 when it parses but
its linter has remarks (this promtool has no flag to turn the linter off). Parsing is the hard
requirement. Of the linter's remarks, these are accepted:

* the `specserve:` prefix puts a colon in every name, which Prometheus' naming guide reserves
  for recording rules, but which vLLM's `vllm:` metrics made the convention for inference
  servers, so dashboards and adapters written for vLLM read ours;
* KNOWN_REMARKS, each named with its metric: existing names that dashboards, the autoscaler
  and README already use. A remark listed there that promtool no longer makes fails the test,
  so the list only ever shrinks.

Any other remark (a counter without _total, a unit in the wrong form, ...) fails the test.
"""

from __future__ import annotations

import re

from tests.deploy.conftest import LiveServer, require_tool, run_tool

COLON = "metric names should not contain ':'"
# Remarks we accept knowingly (none today; the slot-count gauge once ended in _total).
KNOWN_REMARKS: set[tuple[str, str]] = set()
PARSE_ERROR_EXIT, LINT_EXIT = 1, 3


def lint_remarks(output: str) -> list[tuple[str, str]]:
    """(metric, remark) for each line promtool prints as `<metric> <remark>`."""
    remarks = []
    for line in output.splitlines():
        match = re.fullmatch(r"(\S+) (.+)", line.strip())
        if match:
            remarks.append((match.group(1), match.group(2)))
    return remarks


def test_promtool_parses_the_live_scrape(live: LiveServer) -> None:
    promtool = require_tool("promtool", "Debian package prometheus")
    result = run_tool([promtool, "check", "metrics"], stdin=live.scrape)
    output = result.stdout + result.stderr
    assert result.returncode in (0, LINT_EXIT), output
    assert "error while linting" not in output, output
    remarks = set(lint_remarks(output))
    unexpected = sorted(r for r in remarks - KNOWN_REMARKS if r[1] != COLON)
    assert not unexpected, "new promtool lint remarks:\n" + "\n".join(map(str, unexpected))
    fixed = KNOWN_REMARKS - remarks
    assert not fixed, f"fixed, so drop from KNOWN_REMARKS: {sorted(fixed)}"
    if result.returncode == LINT_EXIT:
        assert remarks, f"exit 3 without remarks we could read:\n{output}"


def test_promtool_fails_a_broken_exposition() -> None:
    # Proves the exit codes the test above relies on.
    promtool = require_tool("promtool", "Debian package prometheus")
    broken = run_tool([promtool, "check", "metrics"], stdin="specserve:x{{\n")
    assert broken.returncode == PARSE_ERROR_EXIT
    counter = "# HELP x_thing X.\n# TYPE x_thing counter\nx_thing 1\n"
    linted = run_tool([promtool, "check", "metrics"], stdin=counter)
    assert linted.returncode == LINT_EXIT
    assert ("x_thing", 'counter metrics should have "_total" suffix') in lint_remarks(
        linted.stdout + linted.stderr
    )
