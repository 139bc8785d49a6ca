"""End to end: the real service in Redis mode (redis-server + `s2amnet serve` + one `s2amnet worker`),
scraped by a real `prometheus` whose config is derived from docker/prometheus/prometheus.yml (same jobs
and rule file, static targets on the test's ports, 1 s intervals). After real traffic -- successes on
/classify, /detect and /segment, a 401, a 4xx bad image, a 504 deadline, a job that expires in the queue,
one whose request went away, and a job dead-lettered after being taken over from a "crashed" consumer
(redelivery) -- every PromQL expression of the Grafana dashboard and of the alert rules is run through
Prometheus' HTTP API:

- each one parses and evaluates (status "success");
- each dashboard panel returns data: every target is non-empty and has finite values over the test's
  time range, queried the way Grafana does (range queries, $__rate_interval = 4 x scrape interval);
  counter rates on their own (no ratio/quantile) must even be > 0, so every counter moved;
- every metric a dashboard or rule expression names is among the series Prometheus scraped from the
  service (a dashboard that references a metric the service does not export fails here), and every
  metric family app/metrics.py defines was scraped;
- the rules file was loaded with every rule healthy, the dead-letter alert fires and the "no workers"
  alert does not; every scrape target of the shipped jobs is up.

Processes are real and cleaned up by the fixtures' finalizers. Skips when `prometheus` is missing,
except under CI=true, where that fails (tests/deploy/helpers.missing)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from support.harness import GROUP, JOBS, MAIN_SERVER_ENV, Stack, free_port, redis_stack
from support.images import png
from support.weights import SMALLEST_INPUT_SIZE, make_weights

from .helpers import (
    PROMETHEUS_CONFIG,
    RULES_FILE,
    dashboard_targets,
    dashboards,
    exported_series_names,
    find_tool,
    grafana_expr_to_promql,
    load_yaml,
    metric_names_in,
    rule_exprs,
)
from .prometheus_server import Prometheus, derive_config, finite, sample_values

INPUT_SIZE = SMALLEST_INPUT_SIZE

API_KEY = "e2e-monitoring-key"
SCRAPE_S = 1.0
RATE_INTERVAL = f"{int(4 * SCRAPE_S)}s"  # Grafana: max($__interval + scrape, 4 x scrape), scrape = 1 s
VISIBILITY_S = 2.0
MAX_DELIVERIES = 3
WAVES = 3  # traffic waves, > 1 scrape apart: every labelled counter increases after its first sample

# Dashboard targets allowed to be empty or all-NaN, with the reason. Empty on purpose: every panel must
# show data; an entry here must name a target that exists (checked).
EXEMPT: dict[str, str] = {}

PROCESS_ENV = {
    "S2AMNET_API_KEYS": API_KEY,
    "S2AMNET_MAX_DELAY_MS": "20",
    "OMP_NUM_THREADS": "1",  # 2 shared cores: one thread per torch process (S2AMNET_TORCH_THREADS=1 too)
    "MKL_NUM_THREADS": "1",
    "S2AMNET_RECIPES": MAIN_SERVER_ENV["S2AMNET_RECIPES"],
}


def line_env(tmp: Path) -> dict[str, str]:
    """The line-integration panels get data of every kind: records written, and every image dropped (its
    folder is a file); the OPC UA server publishes; the MQTT broker is unreachable with an outbox of one, so
    results are dropped and the outbox stays full."""
    records = tmp / "records"
    records.mkdir()
    (records / "images").write_text("not a folder")
    return {"S2AMNET_RECORDS_DIR": str(records), "S2AMNET_RECORD_IMAGES": "all",
            "S2AMNET_OPCUA_ENDPOINT": f"opc.tcp://127.0.0.1:{free_port()}/s2amnet/",
            "S2AMNET_MQTT_URL": f"mqtt://127.0.0.1:{free_port()}", "S2AMNET_MQTT_OUTBOX": "1"}


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    return find_tool("prometheus", "apt-get install prometheus (make test: system-deps)")


@pytest.fixture(scope="module")
def stack(prometheus_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """redis-server + API (Redis mode, classify/detect/segment models) + one worker."""
    weights = make_weights(tmp_path_factory.mktemp("monitoring-weights"), input_size=INPUT_SIZE)
    with redis_stack(
        tmp_path_factory.mktemp("monitoring"),
        weights,
        workers=1,
        visibility_s=VISIBILITY_S,
        max_deliveries=MAX_DELIVERIES,
        **PROCESS_ENV,
        **line_env(tmp_path_factory.mktemp("line")),
    ) as s:
        yield s


@pytest.fixture(scope="module")
def prom(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    port = free_port()
    worker_addr = re.sub(r"^http://|/metrics$", "", stack.workers[0].url)
    config = derive_config(
        {
            "s2amnet-api": [stack.api.url.removeprefix("http://")],
            "s2amnet-worker": [worker_addr],
            "prometheus": [f"127.0.0.1:{port}"],
        },
        interval_s=SCRAPE_S,
    )
    server = Prometheus(tmp_path_factory.mktemp("prometheus"), port, config)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def observed(stack: Stack, prom: Prometheus) -> dict[str, Any]:
    """Run the traffic once, wait until Prometheus has it; the time range the queries look at."""
    start = time.time()
    wait_until(lambda: scraped_targets(prom) >= 3, 30, "every target scraped once", prom, stack)
    with redis.Redis(host="127.0.0.1", port=stack.redis.port, socket_timeout=10) as r:
        for i in range(WAVES):
            t0 = time.monotonic()
            traffic_wave(stack.api.url, r, i)
            time.sleep(max(0.0, 1.5 * SCRAPE_S - (time.monotonic() - t0)))
    traffic_end = time.time()
    # every target scraped after the last request; then rules evaluated on that data
    wait_until(
        lambda: (prom.value("min(timestamp(up))") or 0) > traffic_end + 0.1,
        30,
        "a scrape after the traffic",
        prom,
        stack,
    )
    wait_until(lambda: rules_evaluated_after(prom, traffic_end + 0.1), 30, "rule evaluation", prom, stack)
    return {"start": start, "end": time.time()}


# ------------------------------------------------------------------------------------------- traffic
def traffic_wave(api: str, r: redis.Redis, i: int) -> None:
    """Successes on every endpoint (one image, and three in one request: a batch), a 401, a 4xx for a
    broken image, a 504 deadline; a queued job that expires before a worker gets it; one whose request
    went away (cancelled); a job whose consumer "crashed" after the maximum deliveries (taken over =
    redelivered, then dead-lettered)."""

    def files(n: int, seed: int) -> list[tuple[str, tuple[str, bytes, str]]]:
        return [("file", (f"{seed + k}.png", png(48, 40, seed + k), "image/png")) for k in range(n)]

    with httpx.Client(base_url=api, headers={"X-API-Key": API_KEY}, timeout=60) as c:
        for task in ("classify", "detect", "segment"):
            for n in (1, 3):
                res = c.post(f"/{task}", files=files(n, 10 * i + n))
                assert res.status_code == 200, res.text
        res = httpx.post(api + "/classify", files=files(1, 0), timeout=60)  # no API key
        assert res.status_code == 401, res.text
        res = c.post("/detect", files=[("file", ("broken.png", b"not an image at all", "image/png"))])
        assert 400 <= res.status_code < 500 and res.status_code != 401, res.text
        res = c.post("/segment", files=files(1, 1), headers={"X-Request-Timeout": "0.001"})
        assert res.status_code == 504, res.text
        res = c.post("/segment?on_timeout=fail", files=files(1, 2), headers={"X-Request-Timeout": "0.001"})
        assert res.status_code == 200 and res.json()["decided_by"] == "timeout", res.text  # fail-safe answer

    model = "cls"
    expired = inject_job(r, model, f"s2amnet:replies:monitoring-expired-{i}", deadline=time.time() - 1)
    # answered first: the "crashed" consumer's read below must find no other undelivered job than its own
    assert wait_reply(r, expired)["status"] == "expired"
    # a job whose request went away (the API's cancel mark): acked uncomputed, counted as cancelled
    inject_job(r, model, f"s2amnet:replies:monitoring-cancelled-{i}", deadline=time.time() + 30, cancelled=True)
    end = time.monotonic() + 15
    while r.xlen(JOBS.format(model)) and time.monotonic() < end:  # a worker acks and deletes what it took
        time.sleep(0.05)
    assert r.xlen(JOBS.format(model)) == 0
    crashed = inject_job(r, model, f"s2amnet:replies:monitoring-crash-{i}", deadline=time.time() + 30, crashed=True)
    reply = wait_reply(r, crashed, timeout=VISIBILITY_S + 15)
    assert reply["status"] == "dead" and "delivered" in reply["detail"], reply


def inject_job(r: redis.Redis, model: str, reply_to: str, *, deadline: float, crashed: bool = False,
               cancelled: bool = False) -> str:
    """Put a job on the model's stream as the API would. `crashed`: a consumer took it and died holding
    it after MAX_DELIVERIES deliveries (as in tests/e2e/test_redis_protocol.py), idle long enough for the
    live worker to take it over at once. `cancelled`: its request went away (the API's cancel mark is set
    with it, atomically, so no worker reads the job first)."""
    from app.dispatch.base import Job
    from app.queue.jobs import encode_job

    array = np.random.default_rng(0).integers(0, 256, (3, INPUT_SIZE, INPUT_SIZE), dtype=np.uint8)
    job = Job(
        model=model, array=array, meta={"orig_w": INPUT_SIZE, "orig_h": INPUT_SIZE}, options={}, deadline=deadline
    )
    stream = JOBS.format(model)
    if cancelled:
        from app.queue.constants import cancel_key

        with r.pipeline(transaction=True) as pipe:
            pipe.set(cancel_key(job.job_id), 1, px=60_000)
            pipe.xadd(stream, encode_job(job, reply_to))
            pipe.execute()
        return reply_to
    if not crashed:
        r.xadd(stream, encode_job(job, reply_to))
        return reply_to
    with r.pipeline(transaction=True) as pipe:  # atomic: the live worker cannot read it first
        pipe.xadd(stream, encode_job(job, reply_to))
        pipe.xreadgroup(GROUP, "crashed-worker", {stream: ">"}, count=1)
        added, read = pipe.execute()
    entry_id = read[0][1][0][0]
    assert entry_id == added, "the crashed consumer read another job than the one injected"
    r.xclaim(stream, GROUP, "crashed-worker", 0, [entry_id], idle=int(VISIBILITY_S * 10_000), retrycount=MAX_DELIVERIES)
    return reply_to


def wait_reply(r: redis.Redis, stream: str, timeout: float = 15.0) -> dict[str, str]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for _, entries in r.xread({stream: "0-0"}, count=1, block=200) or []:
            for _, fields in entries:
                return {k.decode(): v.decode() for k, v in fields.items()}
    raise AssertionError(f"no reply on {stream} within {timeout} s")


# ------------------------------------------------------------------------------------------- waiting
def wait_until(cond, timeout: float, what: str, prom: Prometheus, stack: Stack) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.2)
    targets = prom.api("targets")["data"]["activeTargets"]
    raise AssertionError(
        f"timed out waiting for {what}; targets: "
        f"{[(t['scrapeUrl'], t['health'], t['lastError']) for t in targets]}\n"
        f"prometheus log:\n{prom.log()[-2000:]}\n{stack.logs()}"
    )


def scraped_targets(prom: Prometheus) -> int:
    return int(prom.value("count(up == 1)") or 0)


def parse_time(text: str) -> float:
    """RFC 3339 with nanoseconds (Go's time.Time in JSON) -> epoch seconds."""
    from datetime import datetime

    m = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$", text)
    assert m, text
    tz = "+00:00" if m.group(3) == "Z" else m.group(3)
    return datetime.fromisoformat(m.group(1) + tz).timestamp() + float(m.group(2) or 0)


def rules_evaluated_after(prom: Prometheus, t: float) -> bool:
    groups = prom.api("rules")["data"]["groups"]
    return bool(groups) and all(parse_time(g["lastEvaluation"]) > t for g in groups)


# ------------------------------------------------------------------------------------------- queries
def dashboard_queries(observed: dict[str, Any]) -> list[tuple[str, dict, dict, str]]:
    """(where, panel, target, PromQL) of every dashboard target, Grafana variables substituted."""
    values = {
        "$__rate_interval": RATE_INTERVAL,
        "$__interval": f"{int(SCRAPE_S)}s",
        "$__range": f"{int(observed['end'] - observed['start']) + 1}s",
        "$model": ".*",  # the variable's "All" (allValue), as the dashboard opens
    }
    out = []
    for path, dashboard in dashboards():
        for panel, target in dashboard_targets(dashboard):
            where = f"{path.name}: {panel['title']} [{target['refId']}]"
            out.append((where, panel, target, grafana_expr_to_promql(target["expr"], values)))
    return out


def run_target(prom: Prometheus, observed: dict[str, Any], target: dict, expr: str) -> dict[str, Any]:
    """As Grafana runs it: an instant query for instant targets, else a range query over the test."""
    if target.get("instant"):
        return prom.query(expr, at=observed["end"])
    return prom.query_range(expr, observed["start"], observed["end"], SCRAPE_S)


def is_plain_counter_rate(expr: str) -> bool:
    """A rate/increase of counters, aggregated, with no ratio, quantile or fallback: must be > 0."""
    return bool(re.search(r"\b(rate|increase)\(", expr)) and not re.search(
        r"/|histogram_quantile|\bor\b|_bucket|_sum\b|_count\b", expr
    )


# ------------------------------------------------------------------------------------------- tests
def test_targets_of_every_shipped_job_are_up(prom: Prometheus, observed: dict[str, Any]):
    targets = prom.api("targets")["data"]["activeTargets"]
    shipped = {job["job_name"] for job in load_yaml(PROMETHEUS_CONFIG)["scrape_configs"]}
    assert {t["labels"]["job"] for t in targets} == shipped
    down = [(t["scrapeUrl"], t["health"], t["lastError"]) for t in targets if t["health"] != "up"]
    assert not down, down
    # scraped a few times during the test
    counts = prom.query(f"count_over_time(up[{int(observed['end'] - observed['start'])}s])")
    assert all(float(s["value"][1]) >= 3 for s in counts["data"]["result"]), counts


def test_rules_loaded_healthy_and_alerting(prom: Prometheus, observed: dict[str, Any]):
    groups = prom.api("rules")["data"]["groups"]
    shipped = load_yaml(RULES_FILE)["groups"]
    assert [g["name"] for g in groups] == [g["name"] for g in shipped]
    assert {g["file"] for g in groups} == {str(RULES_FILE.resolve())}
    loaded = {r["name"]: r for g in groups for r in g["rules"]}
    assert sorted(loaded) == sorted(name for name, _ in rule_exprs())
    bad = {n: (r["health"], r.get("lastError")) for n, r in loaded.items() if r["health"] != "ok"}
    assert not bad, f"rules with evaluation errors: {bad}"
    # the alerts this traffic must (not) trigger
    assert loaded["S2AMNetDeadLetters"]["state"] == "firing", loaded["S2AMNetDeadLetters"]
    assert {a["labels"]["model"] for a in loaded["S2AMNetDeadLetters"]["alerts"]} == {"cls"}
    for quiet in ("S2AMNetNoWorkersUp", "S2AMNetWorkerHeartbeatStale"):
        assert loaded[quiet]["state"] == "inactive", loaded[quiet]
    assert prom.value("count(max by (worker) (s2amnet_worker_up) == 1)") == 1


@pytest.mark.parametrize("name,expr", rule_exprs(), ids=[n for n, _ in rule_exprs()])
def test_rule_expression_evaluates(prom: Prometheus, observed: dict[str, Any], name: str, expr: str):
    body = prom.query(expr, at=observed["end"])
    assert body["status"] == "success", f"{name}: {body.get('error')}"


def test_every_dashboard_panel_has_data(prom: Prometheus, observed: dict[str, Any]):
    queries = dashboard_queries(observed)
    assert set(EXEMPT) <= {w for w, *_ in queries}, "stale EXEMPT entries"
    errors, empty, not_moving, panel_data = [], [], [], {}
    for where, panel, target, expr in queries:
        body = run_target(prom, observed, target, expr)
        if body["status"] != "success":
            errors.append(f"{where}: {body.get('errorType')}: {body.get('error')}\n    {expr}")
            continue
        values = finite(sample_values(body["data"]))
        panel_data.setdefault(panel["title"], []).extend(values)
        if not values and where not in EXEMPT:
            empty.append(f"{where}: {body['data']['resultType']} {body['data']['result'][:2]}\n    {expr}")
        elif is_plain_counter_rate(expr) and not any(v > 0 for v in values):
            not_moving.append(f"{where}: never > 0\n    {expr}")
    no_data = [title for title, values in panel_data.items() if not values]
    problems = [
        ("queries Prometheus refused", errors),
        ("targets without data", empty),
        ("counter rates that never moved", not_moving),
        ("panels without data", no_data),
    ]
    report = "\n".join(f"{what}:\n  " + "\n  ".join(items) for what, items in problems if items)
    assert not report, report


def test_every_referenced_metric_was_scraped(prom: Prometheus, observed: dict[str, Any]):
    """A dashboard or rule naming a metric the service does not export (typo, renamed, never set) fails."""
    scraped = set(prom.api("label/__name__/values")["data"])
    missing = {}
    for where, _, _, expr in dashboard_queries(observed):
        if metric_names_in(expr) - scraped:
            missing[where] = sorted(metric_names_in(expr) - scraped)
    for name, expr in rule_exprs():
        if metric_names_in(expr) - scraped:
            missing[f"rules.yml: {name}"] = sorted(metric_names_in(expr) - scraped)
    assert not missing, f"metrics not scraped from the service: {missing}"


def test_every_defined_metric_was_scraped(prom: Prometheus, observed: dict[str, Any]):
    """The traffic exercises every metric family of app/metrics.py (API's and worker's together)."""
    exported, source = exported_series_names()
    families = {re.sub(r"_(bucket|sum|count|total|created)$", "", n) for n in exported}
    scraped = {
        re.sub(r"_(bucket|sum|count|total|created)$", "", n)
        for n in prom.api("label/__name__/values")["data"]
        if not n.endswith("_created")
    }
    assert families <= scraped, f"defined in {source} but never scraped: {sorted(families - scraped)}"


def test_model_variable_lists_the_served_models(prom: Prometheus, observed: dict[str, Any]):
    """The dashboard's $model variable: label_values(s2amnet_model_info, model)."""
    for _, dashboard in dashboards():
        for var in dashboard["templating"]["list"]:
            m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["definition"])
            assert m, var["definition"]
            values = prom.api(f"label/{m.group(2)}/values", **{"match[]": m.group(1)})["data"]
            assert sorted(values) == ["cls", "det", "seg"], (var["name"], values)
