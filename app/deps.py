"""Request-level helpers of the routes: API-key auth and parsing an inspection request body.

A body is one of
- `multipart/form-data`: one or several `file` parts, plus option / MES fields as form fields;
- `application/json`: `{"image": b64}` or `{"images": [b64, ...]}` plus option / MES fields;
- a raw image (`image/*` or `application/octet-stream`): exactly one image.
Options and MES fields may also come as query parameters; a field given in the body overrides the query.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from python_multipart.multipart import parse_options_header
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.codec import decode_base64
from app.errors import Problem, invalid, too_large, unauthorized, unsupported_media
from app.schemas import MES_FIELDS, OPTION_FIELDS, InspectOptions, JsonInspectRequest
from app.state import service_state

FIELDS = set(OPTION_FIELDS) | set(MES_FIELDS)

api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="An API key of S2AMNET_API_KEYS."
)
bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <API key>`.")


async def require_api_key(
    request: Request,
    x_api_key: Annotated[str | None, Security(api_key_header)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
) -> str | None:
    """When API keys are configured, the request must carry one (X-API-Key or Authorization: Bearer), and
    every key it carries must be valid: an Authorization header that is not `Bearer <key>`, or a second key
    that is wrong (also in a header sent twice), is refused rather than ignored. The two parameters declare
    the schemes in the OpenAPI document; the keys are read from every value of the headers."""
    keys = service_state(request.app).settings.api_keys
    if not keys:
        return None
    given = [k for k in request.headers.getlist("x-api-key") if k]  # a header sent twice: each value counts
    for value in request.headers.getlist("authorization"):
        scheme, _, key = value.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise unauthorized("unreadable Authorization header: send it as 'Authorization: Bearer <key>'")
        given.append(key.strip())
    if not given:
        raise unauthorized("missing API key: send it as 'X-API-Key: <key>' or 'Authorization: Bearer <key>'")
    for one in given:
        one_b = one.encode("utf-8", "replace")
        ok = False
        for key in keys:  # compare against every key, in constant time per key
            ok |= hmac.compare_digest(one_b, key.encode("utf-8", "replace"))
        if not ok:
            raise unauthorized("invalid API key")
    request.state.principal = given[0]
    return given[0]


@dataclass
class ParsedRequest:
    images: list[bytes]
    options: InspectOptions
    single: bool  # answer with one object (one image sent as `file`/`image`/raw body) or a list


def _pydantic_errors(exc: ValidationError, prefix: str) -> list[dict[str, Any]]:
    return [
        {"loc": [prefix, *[str(p) for p in e["loc"]]], "msg": e["msg"], "type": e["type"]}
        for e in exc.errors(include_url=False)
    ]


def _validation_problem(exc: ValidationError, prefix: str) -> Problem:
    errors = _pydantic_errors(exc, prefix)
    detail = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors)
    return invalid(detail, errors)


def merge_options(query: dict[str, str], body_fields: dict[str, Any], where: str) -> InspectOptions:
    """The request's options: the query's (checked on their own, so that an error names the query),
    overridden by the body's fields (``where`` names the body in errors). Unknown query parameters are
    ignored."""
    given: dict[str, Any] = {k: v for k, v in query.items() if k in FIELDS}
    try:
        options = InspectOptions.model_validate(given)
    except ValidationError as exc:
        raise _validation_problem(exc, "query") from None
    body = {k: v for k, v in body_fields.items() if k in FIELDS and v is not None}
    if not body:
        return options
    try:
        return InspectOptions.model_validate({**given, **body})
    except ValidationError as exc:
        raise _validation_problem(exc, where) from None


def _check_count(n: int, max_images: int) -> None:
    if n == 0:
        raise invalid("no image in the request: send a `file` part, or `image`/`images` in JSON")
    if n > max_images:
        raise too_large("too_many_images", f"{n} images in one request; the limit is {max_images}")


async def parse_inspect_body(request: Request, body: bytes, max_images: int) -> ParsedRequest:
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";")[0].strip().lower()
    query = dict(request.query_params)

    if media == "multipart/form-data":
        boundary = parse_options_header(content_type)[1].get(b"boundary")
        if boundary and body.rfind(b"--" + boundary + b"--") < 0:
            # the parser takes what came before the cut as the whole form: say what happened instead
            raise Problem(400, "bad_request", "malformed multipart body: no closing boundary (truncated upload?)")
        try:
            form = await request.form(max_files=max_images + 1, max_fields=64)
        except StarletteHTTPException as exc:
            if "Too many files" in str(exc.detail):
                raise too_large("too_many_images", f"more than {max_images} images in one request") from None
            raise Problem(400, "bad_request", f"malformed multipart body: {exc.detail}") from None
        except Exception as exc:  # a multipart parser error
            raise Problem(400, "bad_request", f"malformed multipart body: {type(exc).__name__}") from None
        try:
            images: list[bytes] = []
            fields: dict[str, Any] = {}
            for name, value in form.multi_items():
                if name == "file":
                    if not isinstance(value, UploadFile):
                        raise invalid(
                            "`file` must be a file part (filename=...), not a text field",
                            [{"loc": ["body", "file"], "msg": "expected a file", "type": "type_error"}],
                        )
                    images.append(await value.read())
                elif name in FIELDS:
                    if isinstance(value, UploadFile):
                        raise invalid(
                            f"`{name}` must be a text field",
                            [{"loc": ["body", name], "msg": "expected text", "type": "type_error"}],
                        )
                    fields[name] = value
                else:
                    raise invalid(
                        f"unknown form field `{name}`",
                        [{"loc": ["body", name], "msg": "unknown field", "type": "extra_forbidden"}],
                    )
        finally:
            await form.close()
        _check_count(len(images), max_images)
        return ParsedRequest(images, merge_options(query, fields, "body"), single=len(images) == 1)

    if media == "application/json" or media.endswith("+json"):
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
            raise invalid(
                f"malformed JSON body: {exc}",
                [{"loc": ["body"], "msg": "malformed JSON", "type": "json_invalid"}],
            ) from None
        try:
            req = JsonInspectRequest.model_validate(data)
        except ValidationError as exc:
            raise _validation_problem(exc, "body") from None
        if (req.image is None) == (req.images is None):
            raise invalid(
                "send exactly one of `image` (one base64 image) or `images` (a list)",
                [{"loc": ["body", "image"], "msg": "exactly one of image/images", "type": "value_error"}],
            )
        raw = [req.image] if req.image is not None else list(req.images or [])
        _check_count(len(raw), max_images)
        images = [decode_base64(text, i) for i, text in enumerate(raw)]
        fields = req.model_dump(exclude={"image", "images"}, exclude_unset=True)
        return ParsedRequest(images, merge_options(query, fields, "body"), single=req.image is not None)

    if media.startswith("image/") or media == "application/octet-stream":
        _check_count(1 if body else 0, max_images)
        return ParsedRequest([body], merge_options(query, {}, "query"), single=True)

    raise unsupported_media(
        f"unsupported Content-Type {media or '(none)'!r}: use multipart/form-data, application/json, "
        "or a raw image/* body"
    )
