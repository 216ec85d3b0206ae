"""Request ids, the header hygiene Serve's HTTP proxy needs before it reads a request, and a header timeout.

Serve's proxy decodes ``X-Request-Id`` (and its routing headers) as UTF-8 before any application code
runs, so one non-ASCII byte there was a plain-text 500 on every path. :func:`middlewares` is the proxy's
callback (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``, set by :func:`proxy_env`): a pure ASGI
middleware in front of the proxy and of each direct-ingress server that drops a request id that is not
a plain token (Serve then makes a fresh one) and any routing header that is not ASCII.

uvicorn, which Serve runs without a way to configure it, has no timeout for a request's headers: a client
that sends them a byte at a time holds its connection for ever. The callback, run in each process that
serves HTTP before its server starts, also gives uvicorn's protocols one (:func:`install_header_timeout`):
``header_timeout_s`` (``EARWITNESS_HEADER_TIMEOUT_S``) from a connection's start, or from the first byte of
its next request, until that request's headers are complete; past it an idle connection is closed. A
request whose headers arrived is never cut by it (a slow body gets the app's 408 ``body_timeout``).

Serve's proxy lets some failures end a request without the API's answer: when a request's ingress replica dies
under it (its node lost), the proxy returns without a response and uvicorn sends a bare text ``500 Internal
Server Error``; a few refusals of its own are plain text too. :class:`ProxyErrorsAsJson` sends the API's JSON error instead, with the
request's id, so a client can tell it apart, retry it and quote it (tests/test_multinode.py).
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from collections.abc import Mapping

# What a request id may look like to be echoed: a token, bounded, nothing a log or a header can be hurt by.
REQUEST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_REQUEST_ID_BYTES = re.compile(rb"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
CALLBACK = "serving.proxy:middlewares"
log = logging.getLogger("earwitness.proxy")
HEADER_TIMEOUT_ENV = "EARWITNESS_HEADER_TIMEOUT_S"
DEFAULT_HEADER_TIMEOUT_S = 10.0


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


#: the API's code for a 5xx that Serve's proxy sent without a body of the API's own
PROXY_ERROR_CODES = {500: "replica_failed", 502: "replica_failed", 503: "unavailable", 504: "timeout"}


class ProxyErrorsAsJson:
    """Pure ASGI: a 5xx whose body is not JSON (Serve's proxy's own) is sent as the API's JSON error instead."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held: dict | None = None
        started = False

        async def converting_send(message):
            nonlocal held, started
            started = started or message["type"] == "http.response.start"
            if message["type"] == "http.response.start" and message["status"] >= 500 and not _is_json(message.get("headers", [])):
                held = message  # wait for the end of its plain-text body, then send ours
                return
            if held is None or message["type"] != "http.response.body":
                return await send(message)
            if message.get("more_body"):
                return
            await _send_json_error(send, held, _request_id_of(scope, held))

        try:
            await self.app(scope, receive, converting_send)
        except Exception as exc:  # noqa: BLE001 - uvicorn would answer it in plain text
            if started:
                raise  # too late for a status: the connection ends with the partial response
            failure = type(exc).__name__
        else:
            if started:
                return
            failure = "no response"  # Serve's proxy ends a request whose replica died (a 500 for it) without one
        rid = _request_id_of(scope, {})
        log.warning("request %s failed in Serve's proxy: %s", rid, failure)
        await _send_json_error(send, {"type": "http.response.start", "status": 500, "headers": []}, rid)


def _is_json(headers) -> bool:
    return any(k.lower() == b"content-type" and b"json" in v.lower() for k, v in headers)


def _request_id_of(scope, start: dict) -> str:
    """The id Serve gave the request (its response header), else the client's token (which Serve takes as its id)."""
    for key, value in start.get("headers", []):
        if key.lower() == b"x-request-id":
            return value.decode("latin-1")
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
    return request_id(headers)


async def _send_json_error(send, start: dict, rid: str) -> None:
    status = start["status"]
    code = PROXY_ERROR_CODES.get(status, "proxy_error")
    message = "the request failed before it was answered (its replica was lost); retry it, quoting the request id if it persists"
    body = json.dumps({"error": {"code": code, "message": message, "type": "server_error", "param": None, "request_id": rid}}).encode()
    kept = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-type", b"content-length")]
    headers = kept + [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({**start, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def middlewares() -> list:
    """Serve's HTTP proxy callback: the middlewares it wraps its ASGI app in (and uvicorn's header timeout)."""
    from starlette.middleware import Middleware

    install_header_timeout(float(os.environ.get(HEADER_TIMEOUT_ENV, DEFAULT_HEADER_TIMEOUT_S)))
    return [Middleware(ProxyErrorsAsJson), Middleware(HeaderHygieneMiddleware)]


def proxy_env(header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S) -> dict[str, str]:
    """The variables a Ray node needs for the proxy callback (read by Serve's proxy and replicas when they start)."""
    return {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": CALLBACK, HEADER_TIMEOUT_ENV: f"{header_timeout_s:g}"}


def install_header_timeout(timeout_s: float) -> None:
    """Give uvicorn's HTTP protocols (httptools and h11) a deadline for each request's headers, in this process."""
    from uvicorn.protocols.http.h11_impl import H11Protocol
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    for cls in (HttpToolsProtocol, H11Protocol):
        if getattr(cls, "_earwitness_header_timeout", None) is None:
            _patch(cls)
        cls._earwitness_header_timeout = timeout_s


def _waiting_for_headers(protocol) -> bool:
    cycle = getattr(protocol, "cycle", None)
    return cycle is None or cycle.response_complete


def _arm(protocol) -> None:
    if getattr(protocol, "_earwitness_deadline", None) is None:
        protocol._earwitness_deadline = protocol.loop.call_later(protocol._earwitness_header_timeout, _expire, protocol)


def _disarm(protocol) -> None:
    deadline = getattr(protocol, "_earwitness_deadline", None)
    if deadline is not None:
        deadline.cancel()
        protocol._earwitness_deadline = None


def _expire(protocol) -> None:
    protocol._earwitness_deadline = None
    if _waiting_for_headers(protocol) and not protocol.transport.is_closing():
        protocol.transport.close()


def _patch(cls) -> None:
    made, received, lost = cls.connection_made, cls.data_received, cls.connection_lost

    def connection_made(self, transport) -> None:
        made(self, transport)
        _arm(self)

    def data_received(self, data: bytes) -> None:
        if _waiting_for_headers(self):
            _arm(self)  # the first byte of the next request starts its deadline
        received(self, data)
        if not _waiting_for_headers(self):
            _disarm(self)

    def connection_lost(self, exc) -> None:
        _disarm(self)
        lost(self, exc)

    cls.connection_made, cls.data_received, cls.connection_lost = connection_made, data_received, connection_lost
