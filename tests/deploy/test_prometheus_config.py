"""docker/prometheus: `promtool check config`, `promtool check rules`, and `promtool test rules` with the
alert unit tests in tests/deploy/promtool/rules_test.yml (each alert fires on its situation and stays
quiet on a harmless neighbour)."""

from __future__ import annotations

import subprocess

from .helpers import PROMETHEUS_CONFIG, RULES_FILE, find_tool, load_yaml, rule_exprs

RULES_TEST = RULES_FILE.parents[2] / "tests" / "deploy" / "promtool" / "rules_test.yml"
HOW = "apt-get install prometheus (make test: system-deps)"

# What the alert rules must catch, and the alert that does.
REQUIRED_ALERTS = {
    "no workers up": "S2AMNetNoWorkersUp",
    "queue backlog growing": "S2AMNetQueueBacklogGrowing",
    "p95 latency over target": "S2AMNetLatencyP95High",
    "error ratio high": "S2AMNetErrorRatioHigh",
    "dead letters appearing": "S2AMNetDeadLetters",
}


def promtool(*args: str) -> subprocess.CompletedProcess:
    exe = find_tool("promtool", HOW)
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120)


def test_promtool_check_config():
    out = promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr


def test_promtool_check_rules():
    out = promtool("check", "rules", str(RULES_FILE))
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_rejects_a_broken_rule(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("groups:\n  - name: x\n    rules:\n      - alert: A\n        expr: sum(rate(x[5m])\n")
    assert promtool("check", "rules", str(bad)).returncode != 0


def test_alert_unit_tests_pass():
    out = promtool("test", "rules", str(RULES_TEST))
    assert out.returncode == 0, out.stdout + out.stderr


def test_required_alerts_exist_and_each_alert_is_unit_tested():
    alerts = {name for name, _ in rule_exprs()}
    for what, name in REQUIRED_ALERTS.items():
        assert name in alerts, f"no alert for {what}"
    tested = {
        case["alertname"]
        for test in load_yaml(RULES_TEST)["tests"]
        for case in test.get("alert_rule_test", [])
    }
    assert alerts <= tested, f"alerts without a unit test: {alerts - tested}"


def test_rules_have_severity_and_summary():
    for group in load_yaml(RULES_FILE)["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in {"warning", "critical"}
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_rule_files_of_the_config_resolve_to_the_shipped_rules():
    config = load_yaml(PROMETHEUS_CONFIG)
    assert [(PROMETHEUS_CONFIG.parent / f).resolve() for f in config["rule_files"]] == [RULES_FILE.resolve()]
