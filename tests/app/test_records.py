"""Inspection records: every answered result stored once (SQLite and PostgreSQL), its image per the setting, the
retention, store outages that lose no answer, and the read API (by id, filtered pages with a cursor, CSV and
JSON Lines export, API keys) through real server processes. No mocks: a real SQLite file, a real PostgreSQL
server (support/postgres.py), real HTTP."""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import json
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from support.harness import API_KEY, MAIN_SERVER_ENV, free_port, running_server
from support.images import jpeg, png
from support.metrics import metric, metric_delta
from support.postgres import PostgresServer

from app import metrics
from app.line.records import Cursor, Filters, RecordOutlet, RecordStore
from app.line.records.images import sniff
from app.line.records.query import CSV_COLUMNS
from app.line.records.schema import LATEST, records, schema_version
from app.line.records.store import Pending, columns, store_url

RECIPES = MAIN_SERVER_ENV["S2AMNET_RECIPES"]  # strict: any detection fails the part; lenient: every part passes


# ------------------------------------------------------------------------------------------------ helpers
def a_result(i: int, verdict: str = "pass", **extra: Any) -> dict[str, Any]:
    """An InspectionResult as the API answers it."""
    defects = [{"label": "scratch", "class_id": 0, "score": 0.9, "box": {"x1": 1, "y1": 2, "x2": 3, "y2": 4},
                "area": 4.0, "mask": {"size": [8, 8], "counts": "a1b2"}}] if verdict == "fail" else []
    return {"result_id": str(uuid.uuid4()), "request_id": f"req-{i}", "model": {"name": "det", "version": "3"},
            "task": "detect", "image": {"width": 8, "height": 8}, "verdict": verdict, "decided_by": "model",
            "recipe": {"id": "R-1", "version": "5"}, "defects": defects,
            "timing_ms": {"queue": 1.0, "inference": 2.0, "total": 3.5}, "station_id": "ST-1",
            "part_id": f"P-{i}", "meas_id": f"M-{i}", "recipe_id": "R-1", **extra}


def scrape() -> str:
    return metrics.render()[0].decode()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def record_all(outlet: RecordOutlet, items: list[tuple[dict[str, Any], bytes | None]]) -> None:
    """Start the outlet, offer ``items``, stop it (which records what is queued)."""

    async def go() -> None:
        await outlet.start()
        for result, image in items:
            outlet.offer(result, image)
        await outlet.stop(30)

    run(go())


def insert_at(store: RecordStore, when: datetime, result: dict[str, Any], image: bytes | None = None) -> None:
    """One record stamped ``when`` (retention tests place records in the past)."""
    stored = store.images.write(result["result_id"], when, image) if image is not None else None
    store.insert([columns(Pending(result, None, when), stored)])


def count(store: RecordStore, where: Any = None) -> int:
    query = sa.select(sa.func.count()).select_from(records)
    with store.engine().connect() as conn:
        return int(conn.execute(query if where is None else query.where(where)).scalar())


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str | None:
    """The store's URL: unset (SQLite in the records folder), or a fresh PostgreSQL database."""
    return None if request.param == "sqlite" else request.getfixturevalue("pg").create_database()


# ------------------------------------------------------------------------------------------------ the store
def test_store_urls():
    assert str(store_url(None, Path("/data/rec"))) == "sqlite:////data/rec/records.sqlite3"
    assert store_url("postgresql://u:p@db:5432/records", Path(".")).drivername == "postgresql+psycopg"
    assert store_url("postgres://u@db/records", Path(".")).drivername == "postgresql+psycopg"
    assert store_url("postgresql+psycopg://u@db/r", Path(".")).render_as_string() == "postgresql+psycopg://u@db/r"
    assert str(store_url("sqlite:///elsewhere.sqlite3", Path("."))) == "sqlite:///elsewhere.sqlite3"
    for bad in ("mysql://u@db/r", "postgresql+psycopg2://u@db/r"):
        with pytest.raises(ValueError, match="unsupported database"):
            store_url(bad, Path("."))


def test_content_type_is_sniffed_from_magic_bytes():
    assert sniff(png()) == "image/png"
    assert sniff(jpeg()) == "image/jpeg"
    assert sniff(b"BM" + bytes(40)) == "image/bmp"
    assert sniff(b"II*\x00" + bytes(8)) == sniff(b"MM\x00*" + bytes(8)) == "image/tiff"
    assert sniff(b"RIFF\x10\x00\x00\x00WEBPVP8 ") == "image/webp"
    assert sniff(b"GIF89a") == sniff(b"") == "application/octet-stream"


def test_every_offered_result_is_recorded_exactly_once(url, tmp_path):
    """120 results through the writer thread: each stored once with its columns and whole JSON, found by id
    and by part_id, listed newest first page by page; a batch written again stores nothing twice."""
    outlet = RecordOutlet(RecordStore(url, tmp_path), record_images="none")
    results = [a_result(i, "fail" if i % 3 == 0 else "pass") for i in range(120)]
    record_all(outlet, [(r, None) for r in results])
    store = outlet.store
    assert outlet.health() == {"ok": True, "store": store.kind, "queued": 0, "written": 120, "dropped": 0,
                               "last_error": None}
    assert count(store) == 120
    for r in results[::7]:
        row = store.get(r["result_id"])
        assert row.result == r and (row.part_id, row.meas_id, row.station_id) == (r["part_id"], r["meas_id"], "ST-1")
        assert (row.model, row.model_version, row.recipe_id, row.recipe_version) == ("det", "3", "R-1", "5")
        assert (row.verdict, row.decided_by, row.defect_count) == (r["verdict"], "model", len(r["defects"]))
        rows, after = store.page(Filters(part_id=r["part_id"]), 10)
        assert [x.result_id for x in rows] == [r["result_id"]] and after is None
    seen, cursor = [], None
    while True:
        rows, cursor = store.page(Filters(), 25, cursor)
        seen += rows
        if cursor is None:
            break
    assert sorted(x.result_id for x in seen) == sorted(r["result_id"] for r in results)
    assert [x.recorded_at for x in seen] == sorted((x.recorded_at for x in seen), reverse=True)
    assert len(store.page(Filters(verdict="fail"), 1000)[0]) == 40
    store.insert([columns(Pending(r, None, datetime.now(UTC)), None) for r in results[:50]])  # a retried batch
    assert count(store) == 120
    store.close()


def test_parts_one_at_a_time_share_transactions_and_a_stop_does_not_wait_for_the_linger(tmp_path):
    """A line sending one part every 50 ms: the writer waits `linger_s` for company, so 6 results take far
    fewer than 6 transactions (each costs CPU the forwards need); at shutdown it writes at once."""
    outlet = RecordOutlet(RecordStore(None, tmp_path), record_images="none")
    store = outlet.store
    transactions: list[int] = []
    insert = store.insert

    def counted(rows):
        transactions.append(len(rows))
        insert(rows)

    store.insert = counted

    async def go() -> float:
        await outlet.start()
        for i in range(6):
            outlet.offer(a_result(i, "pass"), None)
            await asyncio.sleep(0.05)
        outlet.offer(a_result(6, "pass"), None)
        t0 = time.monotonic()
        await outlet.stop(30)
        return time.monotonic() - t0

    stopped_in = run(go())
    assert sum(transactions) == 7 and count(store) == 7
    assert len(transactions) <= 3, transactions  # without the linger: 7, one per part
    assert stopped_in < outlet.linger_s, stopped_in  # the last result was written at once, not after the linger
    store.close()


def test_filters_and_cursor(url, tmp_path):
    store = RecordStore(url, tmp_path)
    t0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    for i in range(10):
        insert_at(store, t0 + timedelta(minutes=i), a_result(i, "fail" if i < 4 else "pass",
                                                            station_id="ST-A" if i % 2 else "ST-B"))
    same_time = [a_result(100 + k) for k in range(3)]  # ties on recorded_at are ordered by result_id
    for r in same_time:
        insert_at(store, t0 + timedelta(minutes=30), r)
    first, cursor = store.page(Filters(), 2)
    assert len(first) == 2 and cursor is not None
    second, _ = store.page(Filters(), 2, Cursor.decode(cursor.encode()))
    assert {x.result_id for x in first + second[:1]} == {r["result_id"] for r in same_time}
    window = Filters(since=t0 + timedelta(minutes=2), until=t0 + timedelta(minutes=6))
    assert [x.part_id for x in store.page(window, 100)[0]] == ["P-5", "P-4", "P-3", "P-2"]
    assert {x.part_id for x in store.page(Filters(verdict="fail", station_id="ST-A"), 100)[0]} == {"P-1", "P-3"}
    assert len(store.page(Filters(model="det", recipe_id="R-1"), 100)[0]) == 13
    assert store.page(Filters(model="other"), 100) == ([], None)
    store.close()


def test_concurrent_starts_migrate_once(url, tmp_path):
    """Eight replicas opening the same empty database at once: every one starts, each migration applied once."""
    stores = [RecordStore(url, tmp_path) for _ in range(8)]
    barrier = threading.Barrier(len(stores))
    errors: list[BaseException] = []

    def open_one(store: RecordStore) -> None:
        barrier.wait()
        try:
            store.engine()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_one, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    with stores[0].engine().connect() as conn:
        assert [v for (v,) in conn.execute(sa.select(schema_version.c.version))] == list(range(1, LATEST + 1))
    for s in stores:
        s.close()


# ------------------------------------------------------------------------------------------------ images
@pytest.mark.parametrize(("mode", "sample", "kept"), [
    ("fail", 0.0, {"fail"}), ("fail", 1.0, {"fail", "pass"}), ("all", 0.0, {"fail", "pass"}), ("none", 0.0, set()),
])
def test_images_are_kept_per_the_setting(tmp_path, mode, sample, kept):
    outlet = RecordOutlet(RecordStore(None, tmp_path), record_images=mode, pass_sample=sample)
    assert outlet.wants_image() is (mode != "none")
    images = {"fail": png(seed=1), "pass": jpeg(seed=2)}
    results = [a_result(i, verdict) for i, verdict in enumerate(["fail", "pass"] * 3)]
    record_all(outlet, [(r, images[r["verdict"]]) for r in results])
    for r in results:
        found = outlet.store.image(r["result_id"])
        if r["verdict"] in kept:
            assert found == (images[r["verdict"]], "image/png" if r["verdict"] == "fail" else "image/jpeg")
        else:
            assert found is None and outlet.store.get(r["result_id"]).image_path is None
    files = [p for p in (tmp_path / "images").rglob("*") if p.is_file()]
    assert len(files) == 3 * len(kept)


def test_an_image_that_cannot_be_written_is_counted_and_the_record_kept(tmp_path):
    (tmp_path / "images").write_bytes(b"a file where the images folder should be")
    before = scrape()
    outlet = RecordOutlet(RecordStore(None, tmp_path), record_images="all")
    result = a_result(1, "fail")
    record_all(outlet, [(result, png())])
    delta = metric_delta(before, scrape)
    assert delta("s2amnet_records_dropped_total", reason="image_error") == 1
    row = outlet.store.get(result["result_id"])
    assert row.result == result and row.image_path is None
    assert outlet.health()["written"] == 1 and outlet.health()["last_error"].startswith("image:")


# ------------------------------------------------------------------------------------------------ retention
def test_retention_by_age_removes_the_oldest_records_and_their_images(url, tmp_path):
    store = RecordStore(url, tmp_path)
    outlet = RecordOutlet(store, retention_days=30)
    now = datetime.now(UTC)
    ages = [90, 60, 31, 29, 1]  # days
    results = [a_result(i, "fail") for i in range(len(ages))]
    for age, r in zip(ages, results, strict=True):
        insert_at(store, now - timedelta(days=age), r, png(seed=age))
    paths = [store.images.resolve(store.get(r["result_id"]).image_path) for r in results]
    assert all(p.is_file() for p in paths)
    assert outlet.run_retention(now) == (3, 0)
    assert [store.get(r["result_id"]) is not None for r in results] == [False, False, False, True, True]
    assert [p.is_file() for p in paths] == [False, False, False, True, True]
    assert outlet.run_retention(now) == (0, 0)
    store.close()


def test_disk_budget_removes_the_oldest_images_first(url, tmp_path):
    store = RecordStore(url, tmp_path)
    image = png(w=64, h=64, seed=5)
    outlet = RecordOutlet(store, max_image_mb=3.5 * len(image) / (1024 * 1024))  # room for 3 images
    now = datetime.now(UTC)
    results = [a_result(i, "fail") for i in range(6)]
    for k, r in enumerate(results):
        insert_at(store, now - timedelta(hours=6 - k), r, image)
    assert store.image_total() == 6 * len(image)
    assert outlet.run_retention(now) == (0, 3)
    kept = [store.get(r["result_id"]).image_path is not None for r in results]
    assert kept == [False, False, False, True, True, True]
    assert count(store) == 6  # the records stay, without their image
    assert store.image_total() == 3 * len(image)
    assert len([p for p in (tmp_path / "images").rglob("*") if p.is_file()]) == 3
    store.close()


# ------------------------------------------------------------------------------------------------ losses
def test_a_full_queue_drops_and_counts(tmp_path):
    outlet = RecordOutlet(RecordStore(None, tmp_path), queue_size=2)  # not started: nothing drains the queue
    before = scrape()
    for i in range(5):
        outlet.offer(a_result(i), None)
    assert outlet.health()["queued"] == 2 and outlet.health()["dropped"] == 3
    delta = metric_delta(before, scrape)
    assert delta("s2amnet_records_dropped_total", reason="queue_full") == 3


def test_an_unreachable_store_is_retried_then_counted(tmp_path):
    """A PostgreSQL that is down: each batch is tried a few times, then dropped and counted; health says so."""
    down = f"postgresql://postgres@127.0.0.1:{free_port()}/records"  # nothing listens there
    outlet = RecordOutlet(RecordStore(down, tmp_path), record_images="all")
    outlet.retry_delays_s = (0.05, 0.05)
    before = scrape()
    results = [a_result(i, "fail") for i in range(4)]

    async def go() -> None:
        await outlet.start()  # the retention at start finds the store down, before any result
        await asyncio.to_thread(wait_for, lambda: outlet.health()["ok"] is False, 30, "health says the store is down")
        for r in results:
            outlet.offer(r, png())
        await outlet.stop(30)

    run(go())
    health = outlet.health()
    assert (health["ok"], health["written"], health["dropped"]) == (False, 0, 4)
    assert "OperationalError" in health["last_error"]
    delta = metric_delta(before, scrape)
    assert delta("s2amnet_records_dropped_total", reason="store_error") == 4
    assert metric(scrape(), "s2amnet_record_store_up", store="postgresql") == 0
    assert not [p for p in (tmp_path / "images").rglob("*") if p.is_file()]  # no image without its record


# ------------------------------------------------------------------------------------------------ the read API
N_PARTS = 200


def records_health(client: httpx.Client) -> dict[str, Any]:
    return client.get("/readyz").json()["integrations"]["records"]


def wait_for(check: Any, timeout: float = 30.0, what: str = "") -> None:
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"not after {timeout} s: {what}")
        time.sleep(0.05)


def inspect(client: httpx.Client, i: int, recipe: str | None) -> httpx.Response:
    data = {"part_id": f"P-{i:04d}", "station_id": f"ST-{i % 3}", **({"recipe_id": recipe} if recipe else {})}
    return client.post("/detect", files={"file": (f"{i}.png", png(seed=i), "image/png")}, data=data)


def all_pages(client: httpx.Client, limit: int, **filters: str) -> list[dict[str, Any]]:
    out, cursor = [], None
    while True:
        page = client.get("/results", params={**filters, "limit": limit, **({"cursor": cursor} if cursor else {})})
        assert page.status_code == 200, page.text
        out += page.json()["results"]
        cursor = page.json()["next_cursor"]
        if cursor is None:
            return out


@pytest.fixture(scope="module")
def recorded(weights_dir: Path) -> Iterator[tuple[httpx.Client, dict[str, dict[str, Any]]]]:
    """A real server recording into SQLite (images of failed parts), and its answers to N_PARTS requests with
    distinct part_ids (one in four decided by the 'strict' recipe: failed, with defects)."""
    with running_server("embedded", weights_dir, S2AMNET_API_KEYS=API_KEY, S2AMNET_RECIPES=RECIPES,
                        S2AMNET_MODELS="det", S2AMNET_MAX_DELAY_MS="2") as server, \
            httpx.Client(base_url=server.url, headers={"X-API-Key": API_KEY}, timeout=60) as client:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda i: inspect(client, i, "strict" if i % 4 == 0 else "lenient"),
                                    range(N_PARTS)))
        assert [a.status_code for a in answers] == [200] * N_PARTS
        wait_for(lambda: records_health(client)["written"] == N_PARTS, what="every answer recorded")
        yield client, {a.json()["part_id"]: a.json() for a in answers}


def test_every_answer_is_recorded_once_and_found_by_id_and_part(recorded):
    client, answers = recorded
    health = records_health(client)
    assert health == {"ok": True, "store": "sqlite", "queued": 0, "written": N_PARTS, "dropped": 0,
                      "last_error": None}
    text = client.get("/metrics").text
    assert metric(text, "s2amnet_records_written_total", store="sqlite") == N_PARTS
    assert metric(text, "s2amnet_record_store_up", store="sqlite") == 1
    for part_id, answer in answers.items():
        got = client.get(f"/results/{answer['result_id']}").json()
        recorded_at = got.pop("recorded_at")
        image_url = got.pop("image_url", None)
        assert got == answer
        assert datetime.fromisoformat(recorded_at).tzinfo is not None
        assert (image_url is not None) is (answer["verdict"] == "fail")
        by_part = client.get("/results", params={"part_id": part_id}).json()
        assert [r["result_id"] for r in by_part["results"]] == [answer["result_id"]]
        assert by_part["next_cursor"] is None
    listed = all_pages(client, 37)
    assert len(listed) == N_PARTS
    assert {r["result_id"] for r in listed} == {a["result_id"] for a in answers.values()}
    times = [datetime.fromisoformat(r["recorded_at"]) for r in listed]
    assert times == sorted(times, reverse=True)


def test_filters_of_the_listing(recorded):
    client, answers = recorded
    failed = {a["result_id"] for a in answers.values() if a["verdict"] == "fail"}
    assert failed and len(failed) <= N_PARTS // 4  # only strict parts can fail
    assert {r["result_id"] for r in all_pages(client, 100, verdict="fail")} == failed
    strict = {a["result_id"] for a in answers.values() if a["recipe"]["id"] == "strict"}
    assert {r["result_id"] for r in all_pages(client, 100, recipe_id="strict")} == strict
    st1 = {a["result_id"] for a in answers.values() if a["station_id"] == "ST-1"}
    assert {r["result_id"] for r in all_pages(client, 100, station_id="ST-1", model="det")} == st1
    assert client.get("/results", params={"model": "seg"}).json() == {"results": [], "next_cursor": None}
    listed = all_pages(client, 100)
    middle = datetime.fromisoformat(listed[N_PARTS // 2]["recorded_at"])
    newer = all_pages(client, 100, since=middle.isoformat())
    older = all_pages(client, 100, until=middle.isoformat())
    assert len(newer) + len(older) == N_PARTS and newer[-1]["recorded_at"] == middle.isoformat()


def test_images_of_failed_parts_are_kept_and_served(recorded):
    client, answers = recorded
    for part_id, answer in answers.items():
        image = client.get(f"/results/{answer['result_id']}/image")
        if answer["verdict"] == "fail":
            assert image.status_code == 200 and image.headers["content-type"] == "image/png"
            assert image.content == png(seed=int(part_id[2:]))
        else:
            assert image.status_code == 404 and image.headers["content-type"] == "application/problem+json"


def test_csv_and_jsonl_export(recorded):
    client, answers = recorded
    by_id = {a["result_id"]: a for a in answers.values()}
    with client.stream("GET", "/results/export", params={"format": "csv"}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(response.read().decode())))
    assert len(rows) == N_PARTS and list(rows[0]) == list(CSV_COLUMNS)
    for row in rows:
        a = by_id[row["result_id"]]
        assert (row["part_id"], row["station_id"], row["verdict"], row["model"], row["model_version"]) == \
            (a["part_id"], a["station_id"], a["verdict"], "det", a["model"]["version"])
        assert (row["recipe_id"], row["recipe_version"], row["decided_by"]) == \
            (a["recipe"]["id"], a["recipe"]["version"], "model")
        assert int(row["defect_count"]) == len(a["defects"])
        assert row["defect_labels"] == ";".join(d["label"] for d in a["defects"])
        assert (row["image"] == f"/results/{a['result_id']}/image") is (a["verdict"] == "fail")
    jsonl = client.get("/results/export", params={"format": "jsonl", "verdict": "fail"})
    assert jsonl.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in jsonl.text.splitlines()]
    assert {r["result_id"] for r in lines} == {i for i, a in by_id.items() if a["verdict"] == "fail"}
    for r in lines:
        assert {k: v for k, v in r.items() if k not in ("recorded_at", "image_url")} == by_id[r["result_id"]]


def test_the_read_api_needs_an_api_key_and_checks_its_query(recorded):
    client, answers = recorded
    some = next(iter(answers.values()))["result_id"]
    paths = ["/results", f"/results/{some}", f"/results/{some}/image", "/results/export"]
    for key in (None, "wrong-key"):
        headers = {"X-API-Key": key} if key else {}
        for path in paths:
            r = httpx.get(str(client.base_url) + path, headers=headers, timeout=30)
            assert r.status_code == 401 and r.headers["content-type"] == "application/problem+json", path
    bearer = httpx.get(f"{client.base_url}/results", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert bearer.status_code == 200
    for params in ({"verdict": "maybe"}, {"limit": 0}, {"limit": 1001}, {"since": "yesterday"}, {"until": "1.5e-148"},
                   {"since": "1765000000"}, {"station_id": "ST\x07"}, {"cursor": "x!"},
                   {"cursor": "WzEsMl0"},
                   {"cursor": base64.urlsafe_b64encode(b'["0001-01-01T00:00:00+01:00","x"]').decode()}):
        r = client.get("/results", params=params)
        assert r.status_code == 422 and r.json()["code"] == "invalid_request", params
    for params in ({"since": "0001-01-01T00:00:00+01:00"}, {"until": "9999-12-31T23:59:59-01:00"}):  # none in UTC
        for path in ("/results", "/results/export"):
            r = client.get(path, params=params)
            assert r.status_code == 422 and r.json()["code"] == "invalid_request", (path, params)
    assert client.get("/results/export", params={"format": "xml"}).status_code == 422
    for path in ("/results", "/results/export"):  # a repeated parameter is refused, not read as its last value
        r = client.get(path, params=[("model", "a"), ("model", "b"), ("verdict", "fail")])
        assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["query", "model"], path
    missing = client.get(f"/results/{uuid.uuid4()}")
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"


def test_records_off_answers_404(tmp_path):
    from app.main import create_app
    from app.settings import Settings

    app = create_app(Settings(records=False, weights_dir=tmp_path))

    async def get_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://s2amnet") as client:
            return [await client.get(p) for p in ("/results", "/results/a", "/results/a/image", "/results/export")]

    for r in run(get_all()):
        assert r.status_code == 404 and "records are disabled" in r.json()["detail"], r.url


def test_a_postgresql_outage_loses_no_answer_and_is_counted(weights_dir, pg):
    """PostgreSQL stopped mid-run: every answer is still 200, the results that could not be recorded are counted
    (records_dropped_total{reason="store_error"}, record_store_up 0, /readyz still ready); after the restart
    new results are recorded again."""
    url = pg.create_database()
    with running_server("embedded", weights_dir, S2AMNET_RECORDS_URL=url, S2AMNET_RECORD_IMAGES="all",
                        S2AMNET_MODELS="det") as server, httpx.Client(base_url=server.url, timeout=60) as client:
        def send(first: int, n: int) -> list[dict[str, Any]]:
            answers = [inspect(client, i, None) for i in range(first, first + n)]
            assert [a.status_code for a in answers] == [200] * n
            return [a.json() for a in answers]

        def dropped() -> float:
            return metric(client.get("/metrics").text, "s2amnet_records_dropped_total", reason="store_error")

        before = send(0, 10)
        wait_for(lambda: records_health(client)["written"] == 10, what="recorded before the outage")
        pg.stop()
        try:
            during = send(100, 20)
            wait_for(lambda: dropped() == 20, what="the results of the outage counted")
            health = records_health(client)
            assert (health["ok"], health["written"], health["dropped"]) == (False, 10, 20)
            assert metric(client.get("/metrics").text, "s2amnet_record_store_up", store="postgresql") == 0
        finally:
            pg.start()
        after = send(200, 10)
        wait_for(lambda: records_health(client)["written"] == 20, what="recorded after the restart")
        assert records_health(client)["ok"] is True
        assert metric(client.get("/metrics").text, "s2amnet_record_store_up", store="postgresql") == 1
        for answer in before + after:
            got = client.get(f"/results/{answer['result_id']}")
            assert got.status_code == 200 and got.json()["image_url"]
        for answer in during:
            assert client.get(f"/results/{answer['result_id']}").status_code == 404
        assert len(all_pages(client, 100)) == 20
