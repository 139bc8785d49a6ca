"""The inspection console: a static page at ``/`` that lets a person drop an image, pick a task and model,
and see what the model sees (boxes, masks, verdict, the raw JSON and the equivalent curl command).

The page (app/static/console/) calls the service's own API from the browser, with the API key the person
types in; serving it needs no key and touches no model. The three files are read once and kept in memory,
so ``/`` costs a dictionary lookup; nothing is fetched from outside (factory networks are offline).
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import Response

from app.errors import Problem

ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
}

router = APIRouter(include_in_schema=False)


@cache
def asset(name: str) -> bytes:
    """The bytes of one of the console's files (app/static/console/)."""
    return (files("app") / "static" / "console" / name).read_bytes()


def _answer(name: str) -> Response:
    # no-cache: the browser revalidates, so a new version of the service is never shown with an old page
    return Response(asset(name), media_type=ASSETS[name], headers={"Cache-Control": "no-cache"})


@router.get("/")
def index() -> Response:
    return _answer("index.html")


@router.get("/console/{name}")
def console_file(name: str) -> Response:
    if name not in ASSETS or name == "index.html":
        raise Problem(404, "not_found", f"no console file {name!r}")
    return _answer(name)
