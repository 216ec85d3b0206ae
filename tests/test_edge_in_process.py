"""The HTTP edge in process, over model clients with faults the real model cannot be made to have: a bug
(an unexpected exception) and a model that is still loading.

A 500 is a bug report: a JSON ``internal_error`` with the request id, logged with where it was raised (never
the request's text) and counted by endpoint. /readyz answers a probe quickly while the model warms up.
"""

from __future__ import annotations

import asyncio
import logging
import time

from fastapi.testclient import TestClient

from serving.config import Settings
from serving.ingress import Service, create_app
from tests.helpers import encode, tone

SECRET_QUESTION = "Is the launch code 7-7-alpha audible?"


class BrokenModel:
    """A model client whose every answer fails with a bug that quotes the question."""

    def info(self):
        return _done({"model": "broken", "family": "qwen2-audio", "sample_rate": 16_000, "max_audio_s": 10.0})

    def complete(self, prompt, model_id):
        async def fail():
            raise TypeError(f"cannot handle {prompt.question!r}")

        return asyncio.ensure_future(fail())

    def close(self):
        pass


def _done(value):
    future = asyncio.get_event_loop().create_future()
    future.set_result(value)
    return future


def test_an_unexpected_exception_is_a_counted_json_500_with_the_request_id(caplog):
    service = Service(BrokenModel(), Settings(_env_file=None, verifier=None, guard_policy="off"))
    with TestClient(create_app(service), raise_server_exceptions=False) as client, caplog.at_level(logging.ERROR, "earwitness.http"):
        r = client.post("/v1/audio/qa", files={"file": ("a.wav", encode(tone(1.0, 16_000, 1), 16_000, "wav"))},
                        data={"question": SECRET_QUESTION}, headers={"X-Request-Id": "req-42"})
        metrics = client.get("/metrics").text
    assert r.status_code == 500
    error = r.json()["error"]
    assert (error["code"], error["type"], error["request_id"]) == ("internal_error", "server_error", "req-42")
    assert 'earwitness_internal_errors_total{endpoint="/v1/audio/qa"} 1.0' in metrics
    logged = "\n".join(rec.getMessage() for rec in caplog.records)
    assert "req-42" in logged and "TypeError" in logged and "test_edge_in_process.py" in logged  # where it was raised
    assert "launch code" not in logged and "launch code" not in r.text


class LoadingModel(BrokenModel):
    """A model client whose replica is still loading: its calls never answer."""

    def info(self):
        return asyncio.get_event_loop().create_future()


def test_readyz_answers_503_quickly_while_the_model_warms_up():
    service = Service(LoadingModel(), Settings(_env_file=None, verifier=None))
    with TestClient(create_app(service)) as client:
        times = []
        for _ in range(5):
            start = time.monotonic()
            r = client.get("/readyz")
            times.append(time.monotonic() - start)
            assert (r.status_code, r.json()["detail"]) == (503, "warming_up")
        assert max(times) <= 0.5, f"the README promises a 503 within 0.5 s during warm-up: {times}"
        assert client.get("/healthz").status_code == 200


def test_field_errors_name_the_field_at_fault():
    """Every 4xx about one field says which in ``param`` (the README's error shape), on every door."""
    import base64

    service = Service(BrokenModel(), Settings(_env_file=None, verifier=None, guard_policy="off", max_tokens_limit=64))
    wav = encode(tone(1.0, 16_000, 1), 16_000, "wav")
    audio = base64.b64encode(wav).decode()
    cases = [
        ("multipart", {"question": "   "}, "empty_question", "question"),
        ("multipart", {"question": "Is there a dog?", "max_tokens": "999"}, "max_tokens_too_large", "max_tokens"),
        ("multipart", {"question": "x" * 5000}, "question_too_long", "question"),
        ("multipart", {}, "invalid_request", "question"),
        ("multipart", {"question": "Is there a dog?", "max_tokens": "zero"}, "invalid_request", "max_tokens"),
        ("json", {"audio": "", "question": "Is there a dog?"}, "missing_audio", "audio"),
        ("json", {"audio": "!!!", "question": "Is there a dog?"}, "invalid_base64", "audio"),
        ("json", {"audio": audio, "question": "Is there a dog?", "guard": "sometimes"}, "invalid_request", "guard"),
    ]
    with TestClient(create_app(service), raise_server_exceptions=False) as client:
        for shape, fields, code, param in cases:
            if shape == "multipart":
                r = client.post("/v1/audio/qa", files={"file": ("a.wav", wav)}, data=fields)
            else:
                r = client.post("/v1/audio/qa", json=fields)
            assert 400 <= r.status_code < 500, (fields, r.status_code, r.text)
            error = r.json()["error"]
            assert (error["code"], error["param"]) == (code, param), (fields, error)
        r = client.post("/v1/audio/qa", data={"question": "Is there a dog?"}, files={"other": ("a.txt", b"x")})
        assert (r.json()["error"]["code"], r.json()["error"]["param"]) == ("missing_audio", "file")
        r = client.post("/v1/audio/verify", files={"file": ("a.wav", wav)}, data={"events": ""})
        assert (r.status_code, r.json()["error"]["param"]) == (422, "events"), r.text


def test_docs_render_without_internet():
    """/docs references no other host: Swagger UI's script and stylesheet come from this app, under a route prefix too."""
    import re

    service = Service(BrokenModel(), Settings(_env_file=None, verifier=None))
    app = create_app(service)
    for root in ("", "/variant"):
        with TestClient(app, root_path=root) as client:
            page = client.get("/docs")
            assert page.status_code == 200 and "swagger-ui" in page.text
            urls = re.findall(r"""(?:src|href|url)\s*[:=]\s*['"]([^'"]+)['"]""", page.text)
            assert urls and not [u for u in urls if "://" in u], urls  # nothing from a CDN
            assets = [u for u in urls if "docs-assets" in u]
            assert len(assets) >= 2 and all(u.startswith(f"{root}/docs-assets/") for u in assets), assets
            for url in assets:
                r = client.get(url)
                assert r.status_code == 200 and len(r.content) > 500, url
            assert client.get(f"{root}/openapi.json").json()["info"]["title"] == "Earwitness"


def test_every_error_body_carries_the_request_id():
    service = Service(BrokenModel(), Settings(_env_file=None, verifier=None, guard_policy="off"))
    with TestClient(create_app(service)) as client:
        r = client.post("/v1/audio/qa", files={"file": ("a.wav", b"")}, data={"question": "Is it raining?"}, headers={"X-Request-Id": "req-7"})
    assert r.status_code == 400 and r.json()["error"]["request_id"] == "req-7"


def test_the_proxys_plain_text_5xx_becomes_the_apis_json_error():
    """Serve's proxy answers a request whose ingress replica died under it with a bare text 500 (a node crash,
    tests/test_multinode.py); its callback middleware sends the API's JSON error with the request's id instead."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Mount, Route

    from serving.proxy import ProxyErrorsAsJson

    routes = [
        Route("/died", lambda _: PlainTextResponse("Internal Server Error", 500, headers={"x-request-id": "serve-id-1"})),
        Route("/busy", lambda _: PlainTextResponse("Service Unavailable", 503)),
        Route("/api", lambda _: JSONResponse({"error": {"code": "model_unavailable"}}, 503)),
        Route("/text", lambda _: PlainTextResponse("fine")),
        Route("/raises", _replica_died),
        Mount("/silent", app=_no_response),
    ]
    with TestClient(Starlette(routes=routes, middleware=[Middleware(ProxyErrorsAsJson)])) as client:
        died = client.get("/died")
        assert died.status_code == 500 and died.headers["x-request-id"] == "serve-id-1"
        assert died.json()["error"] | {"message": ""} == {"code": "replica_failed", "message": "", "type": "server_error", "param": None,
                                                            "request_id": "serve-id-1"}
        busy = client.get("/busy", headers={"X-Request-Id": "client-9"})
        assert (busy.status_code, busy.json()["error"]["code"], busy.json()["error"]["request_id"]) == (503, "unavailable", "client-9")
        assert int(busy.headers["content-length"]) == len(busy.content)
        assert client.get("/api").json() == {"error": {"code": "model_unavailable"}}  # the API's own errors pass unchanged
        assert client.get("/text").text == "fine"
        raised = client.get("/raises", headers={"X-Request-Id": "client-10"})  # uvicorn would send text
        assert (raised.status_code, raised.json()["error"]["code"], raised.json()["error"]["request_id"]) == (500, "replica_failed", "client-10")
        silent = client.get("/silent", headers={"X-Request-Id": "client-11"})  # Serve's proxy when the replica died
        assert (silent.status_code, silent.json()["error"]["code"], silent.json()["error"]["request_id"]) == (500, "replica_failed", "client-11")


async def _no_response(scope, receive, send):
    """An ASGI app that returns without a response, as Serve's proxy does for a request whose replica died."""


async def _replica_died(_):
    from ray.exceptions import ActorDiedError

    raise ActorDiedError()
