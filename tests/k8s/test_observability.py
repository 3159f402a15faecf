"""The Grafana dashboard, the alert rules and the scrape config, checked by real promtool and Prometheus."""

from __future__ import annotations

import json

import pytest
import yaml

from cluster.config import all_stage_names
from cluster.observability import DASHBOARD_PATH, build_dashboard, dashboard_queries, render
from tests.prometheus import OBSERVABILITY, promtool, start_prometheus, substitute_dashboard_variables

ALERTS = ("ReelserveStageQueueWaitOverSLO", "ReelserveJobErrorRateHigh", "ReelserveStageAtMaxReplicas",
          "ReelserveJobsNotProgressing", "ReelserveReplicasRestarting")


def rule_queries() -> list[str]:
    groups = yaml.safe_load((OBSERVABILITY / "alerts.yaml").read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    server = start_prometheus(tmp_path_factory.mktemp("prometheus"), targets=[])
    yield server
    server.stop()


def test_the_checked_in_dashboard_is_the_generators_output():
    assert DASHBOARD_PATH.read_text() == render(), "run `make dashboard` (python -m cluster.observability)"


def test_the_dashboard_has_a_datasource_variable_a_jobs_row_and_a_row_per_stage():
    dashboard = json.loads(DASHBOARD_PATH.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = dashboard["panels"]
    assert all(p["datasource"]["uid"] == "${datasource}" for p in panels if p["type"] != "row")
    rows, current = {}, None
    for panel in panels:
        if panel["type"] == "row":
            current = rows.setdefault(panel["title"], [])
        else:
            current.append(panel["title"])
    assert list(rows) == ["jobs"] + [f"stage: {stage}" for stage in all_stage_names()]
    assert {"throughput", "end-to-end latency", "errors by code", "rejections"} <= set(rows["jobs"])
    for stage in all_stage_names():
        assert rows[f"stage: {stage}"] == ["request latency", "queue wait", "in flight and queued", "replicas", "GPU memory"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))


def test_promtool_accepts_the_rules_and_the_scrape_config():
    rules = promtool("check", "rules", "alerts.yaml", cwd=OBSERVABILITY)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in rules.stdout
    config = promtool("check", "config", "prometheus.yml", cwd=OBSERVABILITY)
    assert config.returncode == 0, config.stdout + config.stderr


def test_promtool_unit_tests_cover_each_alert():
    tests = yaml.safe_load((OBSERVABILITY / "alerts-test.yaml").read_text())["tests"]
    fired = {
        case["alertname"] for test in tests for case in test["alert_rule_test"] if case["exp_alerts"]
    }
    quiet = {
        case["alertname"] for test in tests for case in test["alert_rule_test"] if not case["exp_alerts"]
    }
    assert fired == set(ALERTS), "every alert has a case where it fires"
    assert set(ALERTS) - {"ReelserveStageAtMaxReplicas"} <= quiet  # that one's quiet cases are in the firing list
    result = promtool("test", "rules", "alerts-test.yaml", cwd=OBSERVABILITY)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_dashboard_and_rule_query_parses_in_prometheus(prometheus):
    queries = [substitute_dashboard_variables(q) for q in dashboard_queries(build_dashboard())] + rule_queries()
    assert len(queries) > 40
    for expr in queries:
        if expr.startswith("label_values("):  # a Grafana function: check the metric it reads instead
            expr = expr[len("label_values("):].split(",")[0]
        answer = prometheus.query(expr)
        assert answer["status"] == "success", f"{expr}: {answer.get('error')}"


def test_prometheus_loads_the_alert_rules(prometheus):
    groups = prometheus.api("rules")["data"]["groups"]
    names = {rule["name"] for group in groups for rule in group["rules"]}
    assert names == set(ALERTS)
    deadline_rules = [rule for group in groups for rule in group["rules"] if rule.get("health") == "err"]
    assert not deadline_rules, deadline_rules
