"""Request bodies: oversized ones refused before they are buffered (by Content-Length, else while
streaming), and JSON ones read as an object or a named 4xx."""

from __future__ import annotations

import json
from serving.errors import ApiError

_JSON_OVERHEAD = 64 * 1024


def body_limit(content_type: str, max_upload_bytes: int) -> int:
    """Bytes a body may hold: the audio limit, plus base64 growth for JSON and room for form fields."""
    if content_type.startswith("application/json"):
        return (max_upload_bytes * 4) // 3 + _JSON_OVERHEAD
    return max_upload_bytes + _JSON_OVERHEAD


def too_large(limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"the request body exceeds {limit} bytes")


class BodyLimitMiddleware:
    """Pure ASGI: a 413 as soon as a declared or streamed body passes the limit."""

    def __init__(self, app, max_upload_bytes: int):
        self.app = app
        self.max_upload_bytes = max_upload_bytes

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
            message = await receive()
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
    if not isinstance(body, dict):
        raise ApiError(422, "invalid_request", "the JSON body must be an object")
    return body
