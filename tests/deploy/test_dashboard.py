"""The Grafana dashboard queries only series a live server exports, with labels they carry, in
PromQL that Prometheus' own parser accepts, and covers what an operator needs to see."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.conftest import DOCKER, LiveServer, require_tool, run_tool

DASHBOARD = DOCKER / "grafana" / "dashboards" / "specserve.json"
P = "specserve:"
# Labels Prometheus attaches to every scraped series; the server never exports them.
TARGET_LABELS = {"instance", "job"}
_GROUPING = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)"
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
             "and", "or", "unless", "atan2", "inf", "nan", "start", "end"}  # fmt: skip
_STRING = r""""(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`"""
_GRAFANA_VARIABLE = r"\$\{[^}]*\}|\$\w+"
# The series a family adds to PromQL, by type (the parser strips a counter's _total).
SUFFIXES = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"],
            "summary": ["", "_sum", "_count"]}  # fmt: skip


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))  # collapsed rows nest their panels


def queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    found = []
    for panel in panels(dashboard()["panels"]):
        for target in panel.get("targets", []):
            found.append((f"panel {panel['id']} {target['refId']}", target["expr"]))
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        query = query["query"] if isinstance(query, dict) else query
        # Grafana's label_values(selector, label) wraps a series selector.
        match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query.strip())
        assert match, f"variable {variable['name']}: unexpected query {query}"
        selector, label = match.groups()
        found.append((f"variable {variable['name']}", f"count by ({label}) ({selector})"))
    return found


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: identifiers that are not functions,
    aggregations, keywords, label names, durations or Grafana variables."""
    text = re.sub(_STRING, '""', expr)
    text = re.sub(_GRAFANA_VARIABLE, " ", text)
    text = re.sub(r"\{[^{}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(_GROUPING, " ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word, before = match.group(0), text[: match.start()]
        if before and (before[-1].isdigit() or before[-1] == "."):
            continue  # an exponent or a duration unit, as in 1e3 or 5m
        if text[match.end() :].lstrip().startswith("(") or word in _KEYWORDS:
            continue
        names.add(word)
    return names


def label_names(expr: str) -> set[str]:
    text = re.sub(_STRING, '""', expr)
    labels = set()
    for group in re.findall(_GROUPING, text):
        labels |= {label.strip() for label in group.split(",") if label.strip()}
    for matchers in re.findall(r"\{([^{}]*)\}", text):
        labels |= set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
    return labels


def exported(scrape: str) -> dict[str, set[str]]:
    """Series name -> label names, as PromQL sees them: counters as _total, histograms as
    _bucket/_sum/_count (also for families that have no samples yet)."""
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(scrape):
        for suffix in SUFFIXES.get(family.type, [""]):
            series.setdefault(family.name + suffix, set())
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


def test_metric_names_are_extracted() -> None:
    # The extractor decides what the live comparison sees; pin its behaviour on hard cases.
    expr = (
        'histogram_quantile(0.95, sum by (le) (rate(a:b_bucket{instance=~"$instance", '
        'x="y(z)"}[$__rate_interval]))) / ignoring(pos) group_left c_total offset 5m '
        "> bool 1e3 and on (job) up unless scalar(d) * inf"
    )
    assert metric_names(expr) == {"a:b_bucket", "c_total", "up", "d"}
    assert label_names(expr) == {"le", "instance", "x", "pos", "job"}


def test_dashboard_queries_only_exported_series(live: LiveServer) -> None:
    series = exported(live.scrape)
    if sys.platform != "linux":  # prometheus_client's process metrics read /proc
        series |= {n: TARGET_LABELS for _, e in queries() for n in metric_names(e)
                   if n.startswith("process_")}  # fmt: skip
    missing = []
    for where, expr in queries():
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr}"
        missing += [f"{where}: {name}" for name in sorted(names - series.keys())]
        available = set().union(*(series.get(n, set()) for n in names)) | TARGET_LABELS
        assert label_names(expr) <= available, f"{where}: unknown label in {expr}"
    assert not missing, "the dashboard queries series the server does not export:\n" + "\n".join(
        missing
    )


def test_every_specserve_family_is_on_the_dashboard(live: LiveServer) -> None:
    # A metric nobody charts is easy to miss in an incident: a new one belongs on the dashboard.
    # (process_* from prometheus_client are generic; the dashboard charts what it needs of them.)
    used = set().union(*(metric_names(expr) for _, expr in queries()))
    for family in text_string_to_metric_families(live.scrape):
        if not family.name.startswith(P) or family.name.endswith("_created"):
            continue  # _created: prometheus_client's start timestamps, nothing to chart
        names = {family.name + suffix for suffix in SUFFIXES.get(family.type, [""])}
        assert names & used, f"{family.name} is on no panel"


def test_covers_what_an_operator_watches() -> None:
    exprs = [expr for _, expr in queries()]
    used = set().union(*(metric_names(expr) for expr in exprs))
    required = {
        "acceptance rate": ["spec_decode_num_accepted_tokens_total",
                            "spec_decode_num_draft_tokens_total"],
        "accepted tokens per round": ["spec_decode_accepted_tokens_per_round_sum",
                                      "spec_decode_accepted_tokens_per_round_count"],
        "tokens/s": ["generation_tokens_total"],
        "queue depth": ["num_requests_waiting"],
        "slots in use": ["kv_slots_used", "kv_slots_capacity"],
        "requests by finish reason": ["request_success_total"],
        "batch size per round": ["batch_size_per_round_sum", "batch_size_per_round_count"],
    }  # fmt: skip
    for subject, names in required.items():
        assert {P + n for n in names} <= used, subject
    for histogram in ("time_to_first_token_seconds", "inter_token_latency_seconds"):
        quantiles = [
            e for e in exprs if e.startswith("histogram_quantile(") and P + histogram in e
        ]  # fmt: skip
        assert len(quantiles) >= 2, f"{histogram}: percentiles expected"
    assert any("by (finished_reason)" in e for e in exprs)


def test_dashboard_structure() -> None:
    board = dashboard()
    assert board["uid"] == "specserve" and board["schemaVersion"] >= 36
    ids = [panel["id"] for panel in panels(board["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in panels(board["panels"]):
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]


def test_the_provisioned_datasource_is_the_variable_default() -> None:
    provisioned = yaml.safe_load(
        (DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text()
    )["datasources"]
    defaults = [d for d in provisioned if d.get("isDefault")]
    assert len(defaults) == 1 and defaults[0]["type"] == "prometheus"


def test_promql_parses(tmp_path: Path) -> None:
    promtool = require_tool("promtool", "Debian package prometheus")
    # Each query becomes a recording rule, so Prometheus' own parser reads every expression.
    grafana = {"$__rate_interval": "1m", "$instance": ".*"}
    rules = []
    for where, expr in queries():
        for variable, value in grafana.items():
            expr = expr.replace(variable, value)
        record = "dashboard:" + re.sub(r"\W+", "_", where)
        rules.append({"record": record, "expr": expr})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_tool([promtool, "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout + result.stderr


@pytest.mark.parametrize("expr", ["rate(x[5m]", "sum by (le rate(x[5m]))"])
def test_promtool_rejects_broken_promql(tmp_path: Path, expr: str) -> None:
    # Proves the parse check above has teeth.
    promtool = require_tool("promtool", "Debian package prometheus")
    path = tmp_path / "broken.yml"
    rule = {"record": "dashboard:broken", "expr": expr}
    path.write_text(yaml.safe_dump({"groups": [{"name": "broken", "rules": [rule]}]}))
    assert run_tool([promtool, "check", "rules", str(path)]).returncode != 0
