"""The real Serve application over real HTTP: answers, bad inputs, limits, metrics."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import FORMATS, encode, tone

QUESTION = "Is there a sound of a dog barking in the audio?"


def _ask(client, data: bytes, question: str = QUESTION, filename: str = "clip.wav", **fields):
    form = {"question": question, **{k: str(v) for k, v in fields.items()}}
    return client.post("/v1/audio/qa", files={"file": (filename, data)}, data=form)


def _samples(client) -> dict[tuple[str, tuple], float]:
    text = client.get("/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _metric(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.mark.parametrize("ext", sorted(FORMATS))
def test_answers_each_container(client, ext):
    r = _ask(client, encode(tone(3.0, 44_100, 2), 44_100, ext), filename=f"clip.{ext}")
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["answer"], str) and body["answer_kind"] in {"yes", "no", "other", "unparsed"}
    assert body["audio"]["source_format"] == FORMATS[ext][0]
    assert body["audio"]["duration_s"] == pytest.approx(3.0, abs=0.06)
    assert body["timing"]["model_ms"] > 0 and body["timing"]["total_ms"] >= body["timing"]["model_ms"]


def test_json_base64_matches_multipart(client):
    data = encode(tone(2.0, 16_000, 1), 16_000, "wav")
    multipart = _ask(client, data).json()
    as_json = client.post("/v1/audio/qa", json={"audio": base64.b64encode(data).decode(), "question": QUESTION}).json()
    assert as_json["answer"] == multipart["answer"]  # greedy decoding of the same input


def test_identical_requests_in_a_batch_get_identical_answers(client):
    import concurrent.futures as cf

    data = encode(tone(2.0, 16_000, 1, freq=300), 16_000, "wav")
    with cf.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: _ask(client, data).json()["answer"], range(6)))
    assert len(set(answers)) == 1


def test_direct_ingress_serves_the_same_app_as_the_proxy(client, server):
    """The ingress replica's own port (no proxy hop): same answers, same errors, same metrics."""
    import httpx

    _, settings = server
    data = encode(tone(2.0, 16_000, 1, freq=500), 16_000, "wav")
    with httpx.Client(base_url=f"http://{settings.host}:{settings.direct_port}", timeout=30) as direct:
        before = _metric(_samples(direct), "earwitness_requests_total", endpoint="/v1/audio/qa", code="200")
        via_direct = _ask(direct, data)
        assert via_direct.status_code == 200, via_direct.text
        assert via_direct.json()["answer"] == _ask(client, data).json()["answer"]
        refused = _ask(direct, data, question=" ")
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "empty_question"
        after = _metric(_samples(direct), "earwitness_requests_total", endpoint="/v1/audio/qa", code="200")
    assert after >= before + 2  # one exposition for both routes: the direct request and the proxied one


BAD = [
    ("empty file", lambda c: _ask(c, b""), 400, "empty_audio"),
    ("not audio", lambda c: _ask(c, b"hello" * 200), 415, "unsupported_audio_format"),
    ("truncated wav", lambda c: _ask(c, encode(tone(2.0, 16_000, 1), 16_000, "wav")[:9_000]), 400, "corrupt_audio"),
    ("nan samples", lambda c: _ask(c, encode(np.full(1_000, np.nan, np.float32), 16_000, "wav", "FLOAT")), 422, "invalid_samples"),
    ("too long", lambda c: _ask(c, encode(tone(12.0, 8_000, 1), 8_000, "ogg")), 413, "audio_too_long"),
    ("empty question", lambda c: _ask(c, encode(tone(1.0), 44_100), question="   "), 422, "empty_question"),
    ("huge question", lambda c: _ask(c, encode(tone(1.0), 44_100), question="x" * 5_000), 422, "question_too_long"),
    ("no file", lambda c: c.post("/v1/audio/qa", data={"question": QUESTION}, files={"other": ("a", b"x")}), 422, "missing_audio"),
    ("bad max_tokens", lambda c: _ask(c, encode(tone(1.0), 44_100), max_tokens=-3), 422, "invalid_request"),
    ("max_tokens too big", lambda c: _ask(c, encode(tone(1.0), 44_100), max_tokens=100_000), 422, "max_tokens_too_large"),
    ("unknown model", lambda c: _ask(c, encode(tone(1.0), 44_100), model="../../etc"), 404, "model_not_found"),
    ("bad base64", lambda c: c.post("/v1/audio/qa", json={"audio": "@@@not-base64", "question": QUESTION}), 400, "invalid_base64"),
    ("json missing question", lambda c: c.post("/v1/audio/qa", json={"audio": "AAAA"}), 422, "invalid_request"),
    ("broken json", lambda c: c.post("/v1/audio/qa", content=b"{nope", headers={"content-type": "application/json"}), 400, "invalid_json"),
    ("plain text body", lambda c: c.post("/v1/audio/qa", content=b"hi", headers={"content-type": "text/plain"}), 415, "unsupported_media_type"),
    ("over size limit", lambda c: _ask(c, b"\0" * (2 * 1024 * 1024)), 413, "payload_too_large"),
    ("unknown path", lambda c: c.get("/v1/nothing"), 404, "not_found"),
    ("wrong method", lambda c: c.get("/v1/audio/qa"), 405, "method_not_allowed"),
]


@pytest.mark.parametrize("name, send, status, code", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_named_4xx_and_the_server_lives(client, name, send, status, code):
    r = send(client)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert r.json()["error"]["message"]
    assert _ask(client, encode(tone(1.0), 44_100)).status_code == 200


def test_streamed_oversize_body_is_cut_off_without_content_length(client):
    def chunks():
        yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
        for _ in range(64):
            yield b"\0" * 65_536  # 4 MiB in all, over the 1 MiB limit, no Content-Length

    r = client.post("/v1/audio/qa", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


def test_truncation_on_request(client):
    long_clip = encode(tone(12.0, 16_000, 1), 16_000, "flac")
    r = _ask(client, long_clip, truncate="true")
    assert r.status_code == 200, r.text
    assert r.json()["audio"]["duration_s"] == pytest.approx(10.0, abs=0.01)
    assert "truncated" in r.json()["audio"]["flags"]


def test_silence_is_answered_and_flagged(client):
    r = _ask(client, encode(np.zeros(16_000, np.float32), 16_000, "wav"))
    assert r.status_code == 200 and r.json()["audio"]["flags"] == ["digital_silence"]


def test_metrics_count_requests_answers_and_latency(client):
    before = _samples(client)
    ok = _ask(client, encode(tone(1.5), 44_100)).json()
    _ask(client, b"")
    after = _samples(client)
    name = "earwitness_requests_total"
    assert _metric(after, name, endpoint="/v1/audio/qa", code="200") == _metric(before, name, endpoint="/v1/audio/qa", code="200") + 1
    assert _metric(after, name, endpoint="/v1/audio/qa", code="400") == _metric(before, name, endpoint="/v1/audio/qa", code="400") + 1
    answers = "earwitness_answers_total"
    labels = dict(answer=ok["answer_kind"], model=ok["model"])
    assert _metric(after, answers, **labels) == _metric(before, answers, **labels) + 1
    for stage in ("decode", "model", "total"):
        count = "earwitness_request_latency_seconds_count"
        assert _metric(after, count, endpoint="/v1/audio/qa", stage=stage) > _metric(before, count, endpoint="/v1/audio/qa", stage=stage)
    assert _metric(after, "earwitness_audio_duration_seconds_count") == _metric(before, "earwitness_audio_duration_seconds_count") + 1


def test_health_readiness_models_and_docs(client, server):
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.get("/readyz").json()["status"] == "ready"
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == server[1].model.rstrip("/").split("/")[-1]
    assert models["data"][0]["max_audio_s"] == 10.0  # the tiny model's window, under the 30 s limit
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/audio/qa"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)
    assert client.get("/docs").status_code == 200


def test_ray_processes_start_with_the_malloc_settings(server):
    """glibc reads them when a process starts: the local cluster's workers (replicas among them) inherit them."""
    import os

    import ray

    from serving.runtime import MALLOC_ENV

    probe = ray.remote(num_cpus=0)(lambda: {name: os.environ.get(name) for name in MALLOC_ENV})
    assert ray.get(probe.remote(), timeout=60) == MALLOC_ENV
