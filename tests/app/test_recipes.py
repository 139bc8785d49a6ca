"""app.recipes: recipe files (validated as a whole), the rule they give a request, reloads without a restart."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from support.harness import Server, running_server
from support.images import png
from support.metrics import metric
from support.problems import assert_problem

from app import recipes as rc
from app.errors import Problem

GOOD = """
recipes:
  A7:
    version: "3"
    on_timeout: fail
    models:
      det:
        min_score: 0.4
        classes:
          scratch: {min_score: 0.1, min_area: 20}
  B2:
    version: "1"
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def files(data: bytes) -> dict:
    return {"file": ("part.png", data, "image/png")}


def test_a_recipe_replaces_only_what_it_names_of_the_models_rule(tmp_path, det):
    book = rc.RecipeBook(write(tmp_path / "r.yaml", GOOD), {"det": det})
    book.load()
    d = book.decide("A7", det)
    assert d.recipe == {"id": "A7", "version": "3"} and d.on_timeout == "fail"
    assert d.rule == {**det.verdict_rule, "min_score": 0.4, "classes": {"scratch": {"min_score": 0.1, "min_area": 20}}}
    # a recipe that names no rule for the model: the model's own rule, stamped with the recipe
    d = book.decide("B2", det, on_timeout="error")
    assert (d.rule, d.recipe, d.on_timeout) == (None, {"id": "B2", "version": "1"}, "error")
    # no recipe: the model's own rule, the request's on_timeout (default error)
    assert book.decide(None, det) == rc.Decision()
    with pytest.raises(Problem) as err:
        book.decide("nope", det)
    assert err.value.status == 422 and "A7, B2" in err.value.detail


def test_the_same_recipe_in_json(tmp_path, det):
    import yaml

    path = write(tmp_path / "r.json", json.dumps(yaml.safe_load(GOOD)))
    assert set(rc.read_recipes(path, {"det": det})) == {"A7", "B2"}


@pytest.mark.parametrize(("text", "says"), [
    ("recipes: {A: {version: '1'}", "not valid YAML"),
    ("recipes: {A: {models: {}}}", "recipes.A.version"),
    ("recipes: {A: {version: '1', models: {det: {min_score: 1.5}}}}", "min_score"),
    ("recipes: {A: {version: '1', models: {det: {min_scor: 0.5}}}}", "min_scor"),
    ("recipes: {A: {version: '1', models: {det: {classes: {scratchez: {min_score: 0.2}}}}}}", "'scratchez'"),
    ("recipes: {A: {version: '1', on_timeout: maybe}}", "on_timeout"),
    ("- just a list", "recipes"),
])
def test_a_bad_file_is_refused_with_the_reason(tmp_path, det, text, says):
    with pytest.raises(rc.RecipeError, match=says):
        rc.read_recipes(write(tmp_path / "r.yaml", text), {"det": det})


def test_a_model_this_process_does_not_serve_is_not_checked_here(tmp_path, det):
    text = "recipes: {A: {version: '1', models: {other: {classes: {anything: {min_score: 0.2}}}}}}"
    assert set(rc.read_recipes(write(tmp_path / "r.yaml", text), {"det": det})) == {"A"}


def test_a_reload_replaces_the_recipes_whole_or_not_at_all(tmp_path, det):
    path = write(tmp_path / "r.yaml", GOOD)
    book = rc.RecipeBook(path, {"det": det})
    book.load()
    before = metric_value("invalid")
    write(path, GOOD.replace('version: "3"', 'version: "4"').replace("scratch:", "scratchez:"))
    assert book.reload() is False  # one bad class name: nothing of the new file applies
    assert book.decide("A7", det).recipe == {"id": "A7", "version": "3"}
    assert metric_value("invalid") == before + 1
    write(path, GOOD.replace('version: "3"', 'version: "4"'))
    assert book.reload() is True and book.decide("A7", det).recipe["version"] == "4"


def metric_value(outcome: str) -> float:
    from app.metrics import render

    return metric(render()[0].decode(), "s2amnet_recipe_reloads_total", outcome=outcome)


def test_the_watcher_reloads_a_changed_file(tmp_path, det, monkeypatch):
    monkeypatch.setattr(rc, "POLL_S", 0.05)
    path = write(tmp_path / "r.yaml", GOOD)

    async def scenario() -> str:
        book = rc.RecipeBook(path, {"det": det})
        book.load()
        await book.watch()
        try:
            write(path, GOOD.replace('version: "3"', 'version: "33"'))
            for _ in range(100):
                await asyncio.sleep(0.05)
                if book.recipes["A7"].version == "33":
                    break
            return book.recipes["A7"].version
        finally:
            await book.close()

    assert asyncio.run(scenario()) == "33"


# ---------------------------------------------------------------------------------------------- over HTTP
# The shared server runs tests/support/recipes.yaml: `strict` fails on any detection, `lenient` on none.


def test_a_recipe_decides_the_verdict_and_is_stamped_on_the_result(client: httpx.Client):
    data = png(64, 64, seed=3)
    own = client.post("/detect", files=files(data), params={"conf": 0.0}).json()
    assert own["recipe"] is None and own["defects"], "the tiny detector reports boxes at conf 0"
    strict = client.post("/detect", files=files(data), params={"recipe_id": "strict"}).json()
    lenient = client.post("/detect", files=files(data), params={"recipe_id": "lenient", "conf": 0.0}).json()
    assert (strict["verdict"], strict["recipe"], strict["recipe_id"]) == ("fail", {"id": "strict", "version": "7"},
                                                                          "strict")
    assert strict["defects"], "a fail shows the defects that caused it, even under the request's conf"
    assert (lenient["verdict"], lenient["recipe"]) == ("pass", {"id": "lenient", "version": "2026-12-01"})
    assert [d["score"] for d in lenient["defects"]] == [d["score"] for d in own["defects"]]
    named_nothing = client.post("/detect", files=files(data), params={"recipe_id": "R-3"}).json()
    assert named_nothing["verdict"] == client.post("/detect", files=files(data)).json()["verdict"]
    assert named_nothing["recipe"] == {"id": "R-3", "version": "1"}


def test_a_recipe_applies_to_segmentation_too(client: httpx.Client):
    data = png(64, 64, seed=4)
    assert client.post("/segment", files=files(data), params={"recipe_id": "strict"}).json()["verdict"] == "fail"
    assert client.post("/segment", files=files(data), params={"recipe_id": "lenient"}).json()["verdict"] == "pass"


def test_an_unknown_recipe_is_a_422(client: httpx.Client):
    body = assert_problem(client.post("/detect", files=files(png(40, 40)), params={"recipe_id": "R-404"}), 422,
                          "unknown_recipe")
    assert "R-404" in body["detail"] and "strict" in body["detail"]


def test_a_recipe_is_reloaded_without_a_restart(tmp_path, weights_dir):
    """The file edited while the server runs (picked up by the watcher), then rewritten to the same size and
    modification time (only SIGHUP can tell): each new version decides the next request; a bad file is ignored."""
    path = write(tmp_path / "recipes.yaml", "recipes: {line: {version: '1', models: {det: {min_score: 1.0}}}}\n")
    data = png(64, 64, seed=3)
    with running_server("embedded", weights_dir, S2AMNET_MODELS="det", S2AMNET_RECIPES=str(path)) as server:
        def answer() -> dict:
            r = httpx.post(server.url + "/detect", files=files(data), params={"recipe_id": "line"}, timeout=30)
            assert r.status_code == 200, r.text
            return r.json()

        assert (answer()["verdict"], answer()["recipe"]["version"]) == ("pass", "1")
        write(path, "recipes: {line: {version: '2', models: {det: {min_score: 0.0}}}}\n")
        wait_for(lambda: answer()["recipe"]["version"] == "2", server)
        assert answer()["verdict"] == "fail"

        stamp = path.stat()
        write(path, "recipes: {line: {version: '3', models: {det: {min_score: 1.0}}}}\n")
        os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # invisible to the watcher
        time.sleep(3 * rc.POLL_S)
        assert answer()["recipe"]["version"] == "2"
        server.send(signal.SIGHUP)
        wait_for(lambda: answer()["recipe"]["version"] == "3", server)
        assert answer()["verdict"] == "pass"

        write(path, "recipes: {line: {version: '4', models: {det: {min_score: 7}}}}\n")  # invalid: ignored
        wait_for(lambda: metric(server.metrics(), "s2amnet_recipe_reloads_total", outcome="invalid") >= 1, server)
        assert (answer()["verdict"], answer()["recipe"]["version"]) == ("pass", "3")


def wait_for(check, server: Server, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, server.log()[-3000:]
        time.sleep(0.2)


def test_a_bad_recipe_file_stops_start_up_with_the_reason(tmp_path, weights_dir):
    from support.harness import start_server

    path = write(tmp_path / "recipes.yaml", "recipes: {line: {version: '1', models: {det: {min_score: 2}}}}\n")
    server = start_server("embedded", weights_dir, wait_ready=False, S2AMNET_MODELS="det",
                          S2AMNET_RECIPES=str(path))
    try:
        deadline = time.monotonic() + 60
        while server.alive() and time.monotonic() < deadline:
            time.sleep(0.3)
        assert not server.alive(), "a bad recipe file must stop start-up"
        assert "min_score" in server.log()
    finally:
        server.stop()
