"""Shared helpers of the deployment tests: paths, tools, YAML, PromQL metric names."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE_FILE = ROOT / "docker-compose.yml"
PROMETHEUS_CONFIG = DOCKER / "prometheus" / "prometheus.yml"
RULES_FILE = DOCKER / "prometheus" / "rules.yml"
DASHBOARD_DIR = DOCKER / "grafana" / "dashboards"
K8S_DIR = DOCKER / "k8s"
DEPLOY_DOC = ROOT / "docs" / "DEPLOY.md"  # its "Deploy" and "Scale out" sections

# The models the project ships; the KEDA triggers must cover each of them.
SHIPPED_MODELS = ("mt-classify", "neu-det-detect", "crack-segment", "mt-segment")


# ------------------------------------------------------------------------------------------ tools
def missing(what: str, how: str) -> None:
    """A tool or package is absent. `make test` installs every one of them, so in CI (CI=true) this is
    a failure, never a silent skip; on a developer's machine it is a skip that says what to install."""
    msg = f"{what} is not installed ({how})"
    if os.environ.get("CI"):
        pytest.fail(msg + " -- `make test` must install it")
    pytest.skip(msg)


def find_tool(name: str, how: str) -> str:
    """Path of an executable: the virtualenv's bin first (pip-installed tools), then PATH."""
    venv_bin = Path(sys.executable).parent / name
    if venv_bin.is_file() and os.access(venv_bin, os.X_OK):
        return str(venv_bin)
    found = shutil.which(name)
    if not found:
        missing(name, how)
    return found  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------ files
def load_yaml(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def load_yaml_all(path: Path) -> list[Any]:
    with open(path, encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE_FILE)


def dashboards() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, json.loads(p.read_text(encoding="utf-8"))) for p in sorted(DASHBOARD_DIR.glob("*.json"))]


def k8s_resources() -> list[tuple[Path, dict[str, Any]]]:
    """Every Kubernetes object in docker/k8s (kustomization.yaml is kubectl's build file, not one)."""
    out = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in load_yaml_all(path):
            out.append((path, doc))
    return out


def compose_interpolate(text: str) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default} with nothing set: every default applies."""

    def repl(m: re.Match[str]) -> str:
        return m.group(3) if m.group(3) is not None else ""

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:?-([^}]*))?\}", repl, text)


# ------------------------------------------------------------------------------------------ PromQL
GRAFANA_VARS = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "5m",
    "$model": ".*",
}


def grafana_expr_to_promql(expr: str, values: dict[str, str] | None = None) -> str:
    """Replace the dashboard's Grafana variables by values Prometheus accepts."""
    for name, value in sorted({**GRAFANA_VARS, **(values or {})}.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unsubstituted Grafana variable in {expr!r}"
    return expr


def dashboard_targets(dashboard: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(panel, target) for every query of every panel, rows' nested panels included."""
    out = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((p, t))
            walk(p.get("panels", []))

    walk(dashboard.get("panels", []))
    return out


def rule_exprs() -> list[tuple[str, str]]:
    """(alert or record name, expr) of every rule in docker/prometheus/rules.yml."""
    out = []
    for group in load_yaml(RULES_FILE)["groups"]:
        for rule in group["rules"]:
            out.append((rule.get("alert") or rule.get("record"), rule["expr"]))
    return out


_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "and",
    "or",
    "unless",
    "inf",
    "nan",
    "atan2",
    "start",
    "end",
    # aggregation operators, which may be followed by a grouping clause instead of "("
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
}


def metric_names_in(expr: str) -> set[str]:
    """Metric names an expression selects: bare identifiers that are not functions, aggregations,
    keywords, label names in matchers or grouping clauses, or parts of string/duration literals."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # string literals
    s = re.sub(r"\{[^}]*\}", "", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", "", s)  # range / subquery durations
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", s)
    s = re.sub(r"\boffset\s+-?[0-9a-z]+", "", s)
    names = set()
    for m in re.finditer(r"(?<![\w.])([A-Za-z_:][A-Za-z0-9_:]*)\s*(\()?", s):
        ident, call = m.group(1), m.group(2)
        if call or ident.lower() in _KEYWORDS:
            continue
        names.add(ident)
    return names


def _series_names(family: str, mtype: str) -> set[str]:
    if mtype == "counter":
        return {f"{family}_total", f"{family}_created"}
    if mtype == "histogram":
        return {f"{family}_bucket", f"{family}_sum", f"{family}_count", f"{family}_created"}
    if mtype == "summary":
        return {family, f"{family}_sum", f"{family}_count", f"{family}_created"}
    if mtype == "info":
        return {f"{family}_info"}
    return {family}


def exported_series_names() -> tuple[set[str], str]:
    """Every series name the service can export, and where the list came from.

    From app/metrics.py's registry when it imports (the source of truth); otherwise from the metric list
    in docs/ARCHITECTURE.md (the contract app/metrics.py is written against)."""
    try:
        import app.metrics as metrics  # noqa: PLC0415
    except ImportError:
        metrics = None
    if metrics is not None:
        names: set[str] = set()
        registry = metrics.REGISTRY
        for family in registry.collect():
            if family.name.startswith("s2amnet_"):
                names |= _series_names(family.name, family.type)
        if names:
            return names, "app/metrics.py"
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    section = text.split("## app/metrics.py", 1)[1].split("\n## ", 1)[0]
    listing = re.sub(r"\{[^}]*\}|\([^)]*\)", "", section.split("\n", 1)[1])
    names = set()
    for raw in re.findall(r"[a-z_]+", listing):
        name = "s2amnet_" + raw
        if name.endswith("_total"):
            names |= _series_names(name[: -len("_total")], "counter")
        elif name.endswith(("_seconds", "_size")) and not name.endswith(
            ("load_seconds", "timestamp_seconds")
        ):
            names |= _series_names(name, "histogram")
        else:
            names.add(name)
    return names, "docs/ARCHITECTURE.md"


def settings_env_names() -> set[str]:
    """S2AMNET_* variables the code reads: the Settings fields plus names the sources spell out."""
    names = set()
    try:
        from app.settings import Settings  # noqa: PLC0415

        names |= {f"S2AMNET_{f.upper()}" for f in Settings.model_fields}
    except ImportError:
        pass
    for path in (ROOT / "app").rglob("*.py"):
        names |= set(re.findall(r"S2AMNET_[A-Z0-9_]+", path.read_text(encoding="utf-8")))
    return names
