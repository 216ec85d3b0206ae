"""Request ids, and the header hygiene Serve's HTTP proxy needs before it reads a request.

Serve's proxy decodes ``X-Request-Id`` (and its routing headers) as UTF-8 before any application code
runs, so one non-ASCII byte there was a plain-text 500 on every path. :func:`middlewares` is the proxy's
callback (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``, set by :func:`proxy_env`): a pure ASGI
middleware in front of the proxy and of each direct-ingress server that drops a request id that is not
a plain token (Serve then makes a fresh one) and any routing header that is not ASCII.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping

# What a request id may look like to be echoed: a token, bounded, nothing a log or a header can be hurt by.
REQUEST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_REQUEST_ID_BYTES = re.compile(rb"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
CALLBACK = "serving.proxy:middlewares"


def request_id(headers: Mapping[str, str]) -> str:
    """The client's ``X-Request-Id`` when it is a plain token, else a fresh one."""
    given = headers.get("x-request-id") or ""
    return given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def _keep(name: bytes, value: bytes) -> bool:
    """Whether Serve's proxy can read this header: a token request id; its routing headers in ASCII."""
    from ray.serve._private.http_util import _matches_session_id_header

    key = name.decode("latin-1").lower()
    if key == "x-request-id":
        return bool(_REQUEST_ID_BYTES.fullmatch(value))
    if key.replace("-", "_") == "serve_multiplexed_model_id" or _matches_session_id_header(key):
        return value.isascii()
    return True


class HeaderHygieneMiddleware:
    """Pure ASGI: headers Serve's proxy would fail to decode are dropped before it reads them."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            headers = scope.get("headers") or []
            kept = [(k, v) for k, v in headers if _keep(k, v)]
            if len(kept) != len(headers):
                scope = {**scope, "headers": kept}
        await self.app(scope, receive, send)


def middlewares() -> list:
    """Serve's HTTP proxy callback: the middlewares it wraps its ASGI app in."""
    from starlette.middleware import Middleware

    return [Middleware(HeaderHygieneMiddleware)]


def proxy_env() -> dict[str, str]:
    """The variables a Ray node needs for the proxy callback (read by Serve's proxy and replicas when they start)."""
    return {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": CALLBACK}
