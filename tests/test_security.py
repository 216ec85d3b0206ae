"""Security: API-key auth, body limits enforced while reading, model-name validation, nothing private in logs."""

from __future__ import annotations

import asyncio
import base64
import hmac
import time
import uuid
from pathlib import Path

import httpx
import pytest

from serving import middleware as auth
from serving.config import Settings
from serving.middleware import BodyLimitMiddleware
from tests.helpers import encode, tone
from tests.test_ops_variants import variant_app

CLIP = encode(tone(1.0, 16_000, 1), 16_000, "wav")
KEYS = ("alpha-key-0c1f9e", "beta-key-77d2a4")


def _ask(base: str, headers: dict | None = None, question: str = "Is a dog barking?", **fields):
    return httpx.post(
        f"{base}/v1/audio/qa", files={"file": ("a.wav", CLIP)}, data={"question": question, **fields}, headers=headers, timeout=30
    )


# --- keys: configuration and comparison -------------------------------------------------------------


def test_keys_come_from_env_and_file(tmp_path, monkeypatch):
    keys_file = tmp_path / "keys"
    keys_file.write_text("# rotated 2026-11\nfile-key-1\n\n  file-key-2  # spare\n")
    monkeypatch.setenv("EARWITNESS_API_KEYS", "env-key-1, env-key-2,")
    monkeypatch.setenv("EARWITNESS_API_KEYS_FILE", str(keys_file))
    settings = Settings()
    assert "env-key-1" not in repr(settings)  # a SecretStr: never printed
    digests = auth.keys_from_settings(settings)
    assert len(digests) == 4
    for key in ("env-key-1", "env-key-2", "file-key-1", "file-key-2"):
        assert auth.check(key, digests)
    for wrong in ("", "env-key", "env-key-1 ", "# rotated 2026-11", "spare", "file-key-2  # spare"):
        assert not auth.check(wrong, digests)
    assert auth.keys_from_settings(Settings(_env_file=None, api_keys=None, api_keys_file=None)) == []


def test_comparison_is_constant_time_over_every_key(monkeypatch):
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: calls.append((len(a), len(b))) or real(a, b))
    digests = auth.load_keys("k1,k2,k3", None)
    assert auth.check("k1", digests)  # a match on the first key still compares against all of them
    assert calls == [(32, 32)] * 3  # fixed-length digests: a key's length doesn't leak either


# --- auth on a real Serve application ------------------------------------------------------------------


@pytest.fixture(scope="module")
def secure(server, tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("keys") / "api-keys"
    keys_file.write_text("\n".join(KEYS) + "\n")
    with variant_app(server, "secure", api_keys_file=str(keys_file)) as base:
        yield base


def test_requests_without_a_valid_key_get_401(secure):
    for headers, error in [
        (None, None),
        ({"Authorization": "Bearer wrong-key"}, "invalid_token"),
        ({"Authorization": f"Bearer {KEYS[0]}x"}, "invalid_token"),
        ({"Authorization": "Basic " + base64.b64encode(f"u:{KEYS[0]}".encode()).decode()}, "invalid_token"),
        ({"Authorization": "Bearer"}, "invalid_token"),
    ]:
        r = _ask(secure, headers)
        assert r.status_code == 401, (headers, r.text)
        assert r.json()["error"]["code"] == "unauthorized" and r.json()["error"]["message"]
        challenge = r.headers["www-authenticate"]
        assert challenge.startswith('Bearer realm="earwitness"')
        assert (f'error="{error}"' in challenge) == bool(error)
    assert httpx.get(f"{secure}/v1/models", timeout=10).status_code == 401


def test_either_key_is_accepted(secure):
    for key in KEYS:
        r = _ask(secure, {"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, r.text
        assert httpx.get(f"{secure}/v1/models", headers={"Authorization": f"bearer {key}"}, timeout=10).status_code == 200


def test_health_readiness_and_metrics_stay_open(secure):
    for path in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(f"{secure}{path}", timeout=10).status_code == 200, path
    assert 'code="401"' in httpx.get(f"{secure}/metrics", timeout=10).text  # refusals are counted


def test_an_unauthenticated_body_is_refused_before_it_is_read():
    """The auth middleware answers 401 without ever calling receive(): no upload is buffered for a stranger."""
    reads, sent = [], []

    async def app(scope, receive, send):  # never reached
        raise AssertionError("the app ran without a key")

    async def receive():
        reads.append(1)
        return {"type": "http.request", "body": b"\0" * 65_536, "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/audio/qa", "headers": [(b"content-length", b"999999999")]}
    asyncio.run(auth.ApiKeyMiddleware(app, auth.load_keys("k", None))(scope, receive, send))
    assert not reads and sent[0]["status"] == 401


def test_websockets_need_a_key_too():
    sent = []

    async def app(scope, receive, send):
        raise AssertionError("the app ran without a key")

    async def send(message):
        sent.append(message)

    scope = {"type": "websocket", "path": "/v1/anything", "headers": []}
    asyncio.run(auth.ApiKeyMiddleware(app, auth.load_keys("k", None))(scope, None, send))
    assert sent == [{"type": "websocket.close", "code": 1008}]


# --- body limits, enforced while reading ------------------------------------------------------------------


def test_body_limit_stops_reading_at_the_limit_without_content_length():
    """The app behind the middleware never gets more than the limit, however much is streamed."""
    limit_mb = 0.25
    received = {"bytes": 0, "messages": 0}

    async def app(scope, receive, send):
        while True:
            message = await receive()
            received["bytes"] += len(message.get("body", b""))
            received["messages"] += 1
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def run():
        chunks = iter([b"\0" * 32_768] * 1_000)  # 32 MB offered

        async def receive():
            return {"type": "http.request", "body": next(chunks), "more_body": True}

        async def send(_):
            pass

        scope = {"type": "http", "method": "POST", "headers": [(b"content-type", b"multipart/form-data; boundary=x")]}
        with pytest.raises(Exception) as caught:
            await BodyLimitMiddleware(app, int(limit_mb * 1024 * 1024))(scope, receive, send)
        return caught.value

    error = asyncio.run(run())
    assert getattr(error, "status", None) == 413
    assert received["messages"] <= (limit_mb * 1024 * 1024 + 64 * 1024) // 32_768 + 1


def test_json_body_over_its_limit_is_413(client, server):
    limit = int(server[1].max_upload_mb * 1024 * 1024)
    audio = base64.b64encode(b"\0" * (limit + 100_000)).decode()
    r = client.post("/v1/audio/qa", json={"audio": audio, "question": "q"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


# --- names ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../etc/passwd", "..", "/models/x", "a/b", "a\\b", "x" * 65, ".hidden", "name with space", "%2e%2e%2f"])
def test_model_names_that_could_be_paths_are_refused_and_not_echoed(client, name):
    r = client.post("/v1/audio/qa", files={"file": ("a.wav", CLIP)}, data={"question": "q", "model": name})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert name not in r.text


def test_the_served_name_is_accepted(client):
    served = client.get("/v1/models").json()["data"][0]["id"]
    r = client.post("/v1/audio/qa", files={"file": ("a.wav", CLIP)}, data={"question": "q", "model": served})
    assert r.status_code == 200, r.text


# --- logs -------------------------------------------------------------------------------------------------------


def _log_text(ray_temp_dir: str) -> str:
    logs = Path(ray_temp_dir) / "session_latest" / "logs"
    return "\n".join(p.read_text(errors="replace") for p in logs.rglob("*") if p.is_file() and p.stat().st_size < 50_000_000)


def test_no_question_audio_or_key_in_logs(client, server, secure):
    marker = f"zebra-quokka-{uuid.uuid4().hex[:10]}"
    audio_marker = base64.b64encode(f"RIFFaudio-{marker}".encode()).decode()
    question = f"Is there a {marker} in the audio?"
    assert _ask(server[0], question=question).status_code == 200
    assert client.post("/v1/audio/qa", json={"audio": audio_marker, "question": question}).status_code in (400, 415)
    assert _ask(server[0], question=question, model="not-served-here").status_code == 404
    assert _ask(server[0], question=question, max_tokens="999999").status_code == 422
    assert _ask(secure, {"Authorization": f"Bearer {KEYS[1]}"}, question=question).status_code == 200
    assert _ask(secure, {"Authorization": f"Bearer {marker}-key"}).status_code == 401
    deadline = time.time() + 15
    while True:  # positive control: the access log of these requests has reached the files
        text = _log_text(server[1].ray_temp_dir)
        if text.count("POST /secure/v1/audio/qa 401") and text.count("POST /v1/audio/qa 422"):
            break
        assert time.time() < deadline, "the Serve access log never showed the requests"
        time.sleep(0.5)
    assert marker not in text
    assert audio_marker[:24] not in text
    for key in KEYS:
        assert key not in text
