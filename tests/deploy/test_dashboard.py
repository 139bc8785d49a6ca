"""The Grafana dashboard and the alert rules, statically: the JSON is a well-formed dashboard, every
PromQL expression parses (promtool), and every metric it names is one the service exports (collected
from app/metrics.py's registry). tests/deploy/test_prometheus_e2e.py runs them against real data."""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from .helpers import (
    dashboard_targets,
    dashboards,
    exported_series_names,
    find_tool,
    grafana_expr_to_promql,
    metric_names_in,
    rule_exprs,
)

DASHBOARDS = dashboards()


def test_there_is_a_dashboard():
    assert [p.name for p, _ in DASHBOARDS] == ["s2amnet.json"]


@pytest.mark.parametrize("path,dashboard", DASHBOARDS, ids=[p.name for p, _ in DASHBOARDS])
def test_dashboard_structure(path, dashboard):
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']!r} overlaps another"
                cells.add((x, y))
        if p["type"] == "row":
            continue
        assert p["title"] and p["description"], p
        assert p["datasource"] == {"type": "prometheus", "uid": "prometheus"}
        assert p["targets"], f"panel {p['title']!r} has no query"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for _, t in dashboard_targets(dashboard):
        for var in re.findall(r"\$(\w+)", t["expr"]):
            assert var.startswith("__") or var in variables, f"undefined variable ${var}"


def all_expressions() -> list[tuple[str, str]]:
    out = []
    for path, dashboard in DASHBOARDS:
        for panel, target in dashboard_targets(dashboard):
            out.append(
                (f"{path.name}: {panel['title']} [{target['refId']}]", grafana_expr_to_promql(target["expr"]))
            )
    out += [(f"rules.yml: {name}", expr) for name, expr in rule_exprs()]
    return out


def test_every_expression_parses(tmp_path):
    """promtool parses each expression as a recording rule: a syntax or type error fails here."""
    exprs = all_expressions()
    rules = [{"record": f"check:expr_{i}", "expr": expr} for i, (_, expr) in enumerate(exprs)]
    path = tmp_path / "exprs.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard_and_rules", "rules": rules}]}))
    exe = find_tool("promtool", "apt-get install prometheus (make test: system-deps)")
    out = subprocess.run([exe, "check", "rules", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{len(rules)} rules found" in out.stdout


def test_every_metric_name_is_exported_by_the_service():
    exported, source = exported_series_names()
    assert exported, source
    unknown = {}
    for where, expr in all_expressions():
        names = metric_names_in(expr)
        assert names, f"{where}: no metric in {expr!r}"
        bad = names - exported
        if bad:
            unknown[where] = sorted(bad)
    assert not unknown, f"metrics not defined in {source}: {unknown}"


def test_metric_name_extraction():
    assert metric_names_in('sum by (le) (rate(a_bucket{x="y"}[5m])) / on() group_left b_total') == {
        "a_bucket",
        "b_total",
    }
    assert metric_names_in("histogram_quantile(0.95, sum by (le, model) (rate(m[1m]))) > 1e-3") == {"m"}
    assert metric_names_in("count(max by (worker) (up) == 1) or vector(0)") == {"up"}
    assert metric_names_in("x unless x offset 15m") == {"x"}
    assert metric_names_in("time() - max by (w) (hb)") == {"hb"}


def test_every_exported_metric_is_on_the_dashboard():
    """Nothing the service measures is invisible to the operator."""
    exported, source = exported_series_names()
    families = {re.sub(r"_(bucket|sum|count|total|created)$", "", n) for n in exported}
    used = set()
    for _, dashboard in DASHBOARDS:
        for _, t in dashboard_targets(dashboard):
            used |= {re.sub(r"_(bucket|sum|count|total|created)$", "", n) for n in metric_names_in(t["expr"])}
    assert families <= used, f"not on the dashboard ({source}): {sorted(families - used)}"


# What the dashboard must show: a panel whose queries use these metrics (and, where given,
# this function) must exist.
REQUIRED_PANELS = {
    "request rate by endpoint": ("s2amnet_requests_total", r"sum by \(endpoint\)"),
    "errors by endpoint": ("s2amnet_requests_total", r'status=~"\[45\]\.\."'),
    "p50 latency": ("s2amnet_request_duration_seconds_bucket", r"histogram_quantile\(0\.5,"),
    "p95 latency": ("s2amnet_request_duration_seconds_bucket", r"histogram_quantile\(0\.95,"),
    "p99 latency": ("s2amnet_request_duration_seconds_bucket", r"histogram_quantile\(0\.99,"),
    "queue depth": ("s2amnet_queue_depth", r""),
    "queue wait": ("s2amnet_queue_wait_seconds_bucket", r"histogram_quantile"),
    "batch size distribution": ("s2amnet_batch_size_bucket", r"sum by \(le\)"),
    "inference time per batch": ("s2amnet_inference_duration_seconds_bucket", r"histogram_quantile"),
    "rejected": ("s2amnet_rejected_total", r"by \(reason\)"),
    "expired": ("s2amnet_jobs_expired_total", r""),
    "redelivered": ("s2amnet_jobs_redelivered_total", r""),
    "workers up": ("s2amnet_worker_up", r""),
    "images inspected": ("s2amnet_images_total", r""),
    "defects by label": ("s2amnet_defects_total", r"by \(model, label\)"),
    "pass/fail ratio": ("s2amnet_verdicts_total", r'verdict="fail"'),
}


@pytest.mark.parametrize("what", sorted(REQUIRED_PANELS))
def test_required_panel_exists(what):
    metric, pattern = REQUIRED_PANELS[what]
    for _, dashboard in DASHBOARDS:
        for _, t in dashboard_targets(dashboard):
            if metric in metric_names_in(t["expr"]) and re.search(pattern, t["expr"]):
                return
    pytest.fail(f"no panel shows {what} ({metric})")
