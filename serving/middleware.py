"""The ingress's two ASGI middlewares, both of which answer before the app reads a body.

:class:`ApiKeyMiddleware` — optional API-key auth: ``Authorization: Bearer <key>`` on everything but health and
metrics. Keys come from ``EARWITNESS_API_KEYS`` (comma-separated) and/or the file ``EARWITNESS_API_KEYS_FILE``
(one key a line, ``#`` comments). With no key configured, auth is off. Keys are compared in constant
time (:func:`hmac.compare_digest` over SHA-256 digests, so neither a key's content nor its length
leaks through timing), every configured key is checked on every request, and no key or presented
token is ever logged.

:class:`BodyLimitMiddleware` — request bodies: oversized ones refused before they are buffered (by
Content-Length, else while streaming), slow ones cut off (``body_timeout_s`` between two reads).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from pathlib import Path

from serving.errors import ApiError

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_CHALLENGE = 'Bearer realm="earwitness"'
_JSON_OVERHEAD = 64 * 1024


def load_keys(api_keys: str | None, api_keys_file: str | None) -> list[bytes]:
    """Digests of the configured keys; an empty list means auth is off."""
    keys: list[str] = []
    if api_keys:
        keys += [k.strip() for k in api_keys.split(",")]
    if api_keys_file:
        for line in Path(api_keys_file).read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                keys.append(line)
    return [_digest(k) for k in keys if k]


def keys_from_settings(settings) -> list[bytes]:
    secret = settings.api_keys.get_secret_value() if settings.api_keys is not None else None
    return load_keys(secret, settings.api_keys_file)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def check(token: str | None, digests: list[bytes]) -> bool:
    """Whether ``token`` is one of the keys; constant time in the token and over all keys."""
    presented = _digest(token or "")
    found = False
    for digest in digests:
        found |= hmac.compare_digest(presented, digest)
    return found and bool(token)


def _bearer(headers: dict[bytes, bytes]) -> tuple[bool, str | None]:
    """(whether an Authorization header was sent, the bearer token if well-formed)."""
    raw = headers.get(b"authorization")
    if raw is None:
        return False, None
    scheme, _, token = raw.decode("latin-1").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return True, None
    return True, token.strip()


def _path_within(scope) -> str:
    """The request path below the application's route prefix (Serve passes the prefix as root_path)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    return path


class ApiKeyMiddleware:
    """Pure ASGI: 401 before the body is read when a configured key is not presented."""

    def __init__(self, app, digests: list[bytes]):
        self.app = app
        self.digests = digests

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or not self.digests or _path_within(scope) in OPEN_PATHS:
            return await self.app(scope, receive, send)
        sent, token = _bearer(dict(scope.get("headers") or []))
        if token is not None and check(token, self.digests):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":  # none served today; never an unauthenticated one
            return await send({"type": "websocket.close", "code": 1008})
        if not sent:
            error, challenge = ApiError(401, "unauthorized", "this service needs an API key: 'Authorization: Bearer <key>'"), _CHALLENGE
        else:
            error = ApiError(401, "unauthorized", "the API key is not valid")
            challenge = f'{_CHALLENGE}, error="invalid_token"'
        await _send_error(send, error, (b"www-authenticate", challenge.encode()))


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
            return await _send_error(send, too_large(limit), (b"connection", b"close"))
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


async def _send_error(send, error: ApiError, header: tuple[bytes, bytes]) -> None:
    """``error`` as a JSON response, sent before the app runs; ``header`` follows the content headers."""
    body = json.dumps(error.body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), header],
        }
    )
    await send({"type": "http.response.body", "body": body})
