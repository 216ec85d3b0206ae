"""Request bodies: oversized ones refused before they are buffered (by Content-Length, else while
streaming), slow ones cut off (``body_timeout_s`` between two reads), and JSON ones read as an object
of bounded depth holding only valid text, or a named 4xx."""

from __future__ import annotations

import asyncio
import json
import re

from serving.errors import ApiError

_JSON_OVERHEAD = 64 * 1024
# The deepest JSON body accepted: a chat request is 6 levels deep; Python's parser recurses per level.
MAX_JSON_DEPTH = 32
# A UTF-16 surrogate is no character: JSON's "\ud800" escape parses into one, and no tokenizer takes it.
_SURROGATE = re.compile("[\ud800-\udfff]")


def body_limit(content_type: str, max_upload_bytes: int) -> int:
    """Bytes a body may hold: the audio limit, plus base64 growth for JSON and room for form fields."""
    if content_type.startswith("application/json"):
        return (max_upload_bytes * 4) // 3 + _JSON_OVERHEAD
    return max_upload_bytes + _JSON_OVERHEAD


def too_large(limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"the request body exceeds {limit} bytes")


class BodyLimitMiddleware:
    """Pure ASGI: a 413 as soon as a declared or streamed body passes the limit."""

    def __init__(self, app, max_upload_bytes: int, body_timeout_s: float = 30.0):
        self.app = app
        self.max_upload_bytes = max_upload_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        limit = body_limit(headers.get(b"content-type", b"").decode("latin-1").lower(), self.max_upload_bytes)
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _send_error(send, too_large(limit))
        seen = 0

        async def limited_receive():
            nonlocal seen
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout_s)
            except asyncio.TimeoutError:
                raise ApiError(408, "body_timeout", f"the request body did not arrive within {self.body_timeout_s:g} s", {"Connection": "close"}) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise too_large(limit)
            return message

        await self.app(scope, limited_receive, send)


async def _send_error(send, error: ApiError) -> None:
    body = json.dumps(error.body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def json_object(request) -> dict:
    """The request's JSON body, which must be an object; 400 / 422 otherwise."""
    try:
        body = await request.json()
    except ValueError as exc:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from exc
    except RecursionError:
        raise _too_deep() from None
    if not isinstance(body, dict):
        raise ApiError(422, "invalid_request", "the JSON body must be an object")
    check_json(body)
    return body


def _too_deep() -> ApiError:
    return ApiError(400, "invalid_json", f"the JSON body is nested deeper than {MAX_JSON_DEPTH} levels")


def check_json(value: object) -> None:
    """400 ``invalid_json`` past :data:`MAX_JSON_DEPTH` levels; 422 ``invalid_text`` for a lone surrogate in
    any string or key (walked iteratively: a deep body cannot exhaust the stack here)."""
    stack: list[tuple[object, int, str]] = [(value, 1, "")]
    while stack:
        item, depth, path = stack.pop()
        if isinstance(item, str):
            check_text(item, path or None)
            continue
        if not isinstance(item, (dict, list)):
            continue
        if depth > MAX_JSON_DEPTH:
            raise _too_deep()
        pairs = item.items() if isinstance(item, dict) else enumerate(item)
        for key, child in pairs:
            where = f"{path}.{key}" if path else str(key)
            if isinstance(key, str):
                check_text(key, where)
            stack.append((child, depth + 1, where))


def check_text(text: str, param: str | None = None) -> str:
    """``text`` itself, or 422 ``invalid_text`` when it holds an unpaired UTF-16 surrogate (not a character)."""
    if _SURROGATE.search(text):
        raise ApiError(422, "invalid_text", f"{param or 'a string'} holds an unpaired UTF-16 surrogate, which is not text", param=param)
    return text
