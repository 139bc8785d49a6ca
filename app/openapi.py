"""The API's OpenAPI document: every error answer is RFC 9457 problem+json, 503s carry Retry-After."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app.errors import PROBLEM_JSON
from app.schemas import ProblemDetails


def problem_doc(description: str) -> dict[str, Any]:
    """An error answer in a route's ``responses``: RFC 9457 problem details, with what it means there."""
    return {"model": ProblemDetails, "description": description}


def custom_openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        problem_ref = {"$ref": "#/components/schemas/ProblemDetails"}
        for path_item in schema.get("paths", {}).values():
            for op in path_item.values():
                for status, response in op.get("responses", {}).items():
                    if not str(status).isdigit() or int(status) < 400:
                        continue
                    content = response.setdefault("content", {})
                    content.pop("application/json", None)
                    content[PROBLEM_JSON] = {"schema": problem_ref}
                    if int(status) == 503:
                        response["headers"] = {
                            "Retry-After": {
                                "description": "Seconds to wait before retrying.",
                                "schema": {"type": "integer"},
                            }
                        }
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        if "ProblemDetails" not in components:
            components["ProblemDetails"] = ProblemDetails.model_json_schema()
        app.openapi_schema = schema
        return schema

    return openapi
