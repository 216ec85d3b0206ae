"""The sounds heard, with their times: ``POST /v1/audio/events``, the description an open question gets under
``correct``, and the event-level F1 the README reports.

The endpoint runs in process (the real ingress app over the real verifier deployment's class, the shipped fused
verifier) on recordings the tests make: a 1 kHz beep in a noise floor, an espeak-ng sentence.
"""

from __future__ import annotations

import asyncio
import base64

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from loadtests.clips import spoken
from loadtests.event_f1 import counts, f1, matches
from models.verifier.events import Detection, Timeline, active_spans, describe, detect
from tests.helpers import cli_in_process, encode

SR = 16_000


def _noise(seconds: float, seed: int = 0) -> np.ndarray:
    return (0.003 * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(np.float32)


def _beep(onset: float = 1.5, offset: float = 3.0, seconds: float = 5.0, freq: float = 1000.0, seed: int = 0) -> np.ndarray:
    """A sine beep from ``onset`` to ``offset`` over a quiet noise floor."""
    x = _noise(seconds, seed)
    t = np.arange(int((offset - onset) * SR)) / SR
    x[int(onset * SR):int(onset * SR) + len(t)] += (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return x


# ---- spans, detection and description (no model) -------------------------------------------------------------------


def test_active_frames_become_spans_with_short_gaps_filled_and_clipped_to_the_clip():
    starts = np.arange(10) * 0.5
    ends = starts + 0.5
    active = np.array([1, 1, 0, 1, 0, 0, 0, 1, 1, 1], dtype=bool)  # gap of 0.5 s after frame 1, 1.5 s after frame 3
    assert active_spans(starts, ends, active, 0.5, 4.8) == [(0.0, 2.0), (3.5, 4.8)]
    assert active_spans(starts, ends, active, 0.3, 5.0) == [(0.0, 1.0), (1.5, 2.0), (3.5, 5.0)]
    overlapping = active_spans(np.array([0.0, 0.48, 0.96]), np.array([0.96, 1.44, 1.92]), np.array([1, 1, 0], bool), 0.0, 2.0)
    assert overlapping == [(0.0, 1.44)]  # the tagger's 0.96 s patches every 0.48 s join


def test_a_class_is_detected_by_its_clip_probability_and_spans_where_its_frames_pass_the_threshold():
    starts = np.arange(5) * 1.0
    probs = np.array([[0.1, 0.9, 0.95, 0.2, 0.1],  # heard at 1-3 s
                      [0.5, 0.55, 0.5, 0.5, 0.5],  # present over the clip, no frame at the threshold: its best frame
                      [0.9, 0.2, 0.1, 0.1, 0.1]])  # one loud frame, but its clip probability is below: not detected
    t = Timeline("ontology", ["Bird", "Wind", "Knock"], starts, starts + 1.0, probs, np.array([0.8, 0.62, 0.3]), 0.6, ["bird", "wind", "knocking"])
    found = detect(t, 0.3, 5.0)
    assert [(d.event, d.spans) for d in found] == [("Bird", [(1.0, 3.0)]), ("Wind", [(1.0, 2.0)])]
    assert found[0].peak == pytest.approx(0.95) and found[0].probability == pytest.approx(0.8)
    assert [d.event for d in detect(t, 0.3, 5.0, threshold=0.7)] == ["Bird"]


def test_the_description_lists_the_sounds_with_their_times_and_says_where_it_came_from():
    bird = Detection("Bird", "ontology", "birdsong", 0.9, 0.95, [(0.2, 2.1)])
    insects = Detection("Insect", "ontology", "crickets", 0.8, 0.9, [(0.0, 2.5)])
    assert describe([bird, insects], 2.5) == "I hear birdsong (0.2–2.1 s) and crickets (from the sound-event verifier)."
    assert describe([], 3.0) == "I hear no sound I can name (from the sound-event verifier)."
    tone = Detection("Dial tone", "audioset", "dial tone", 0.9, 0.9, [(0.0, 3.0)])
    assert describe([tone, insects], 2.5) == "I hear crickets (from the sound-event verifier)."  # the trained classes first
    assert describe([tone], 3.0) == "I hear dial tone (from the sound-event verifier)."  # the tagger's, when they hear nothing


# ---- event-based F1 against a hand-computed case -----------------------------------------------------------------------


def test_event_f1_matches_onsets_and_offsets_within_the_collar_one_to_one():
    ref = {"a": {"Dog": [(1.0, 2.0), (5.0, 6.0)], "Cat": [(0.0, 10.0)]}}
    est = {"a": {"Dog": [(1.3, 2.4), (5.6, 6.0), (8.0, 9.0)], "Cat": [(0.2, 8.1)]}}
    c = counts(ref, est, 0.5)
    assert c["Dog"] == [1, 2, 1]  # (5.6, 6.0): onset 0.6 s late; (8, 9): nothing there
    assert c["Cat"] == [1, 0, 0]  # offset 1.9 s early, within 0.2 x 10 s
    assert f1(*c["Dog"]) == pytest.approx(0.4)
    # the largest matching, not the first: (1.3, 2.3) fits both references, (0.7, 1.6) only the first
    assert matches([(1.0, 2.0), (1.4, 2.4)], [(1.3, 2.3), (0.7, 1.6)], 0.5) == 2


# ---- the endpoint, in process, on real audio ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def service():
    from models.pretrained.wheels import WheelError
    from serving.config import Settings
    from serving.ingress import Service
    from serving.model_client import InProcess
    from serving.verifier_server import VerifierServer
    from tests.test_edge_in_process import BrokenModel

    settings = Settings(_env_file=None, guard_policy="off", verifier_cache_size=0, verifier_timeout_s=120)  # every request heard anew; a loaded CI box is slow
    try:
        verifier = InProcess(VerifierServer.func_or_class(settings.model_dump()))
    except WheelError as e:
        pytest.skip(f"a pretrained part is unavailable: {e}")
    return Service(BrokenModel(), settings, verifier)


@pytest.fixture(scope="module")
def client(service):
    from serving.ingress import create_app

    with TestClient(create_app(service), raise_server_exceptions=False) as c:
        yield c


def _by_event(body: dict) -> dict[str, dict]:
    return {e["event"]: e for e in body["events"]}


def test_a_beep_is_detected_where_it_sounds(client):
    r = client.post("/v1/audio/events", files={"file": ("beep.wav", encode(_beep(1.5, 3.0), SR, "wav"))})
    assert r.status_code == 200, r.text
    body = r.json()
    beep = _by_event(body)["Beep, bleep"]
    assert beep["vocabulary"] == "ontology" and beep["probability"] >= body["thresholds"]["ontology"]
    (span,) = beep["spans"]
    assert abs(span["onset_s"] - 1.5) <= 0.5 and abs(span["offset_s"] - 3.0) <= 0.5, span
    assert "beep" in body["description"] and body["description"].endswith("(from the sound-event verifier).")


def test_a_spoken_sentence_is_detected_as_speech_over_its_words_in_json_too(client):
    sentence = spoken("Hello, this is a short test of what the verifier hears.", SR)
    if sentence is None:
        pytest.skip("espeak-ng is not installed (Debian package 'espeak-ng')")
    clip = np.concatenate([_noise(1.0), sentence + _noise(len(sentence) / SR, 1)[: len(sentence)], _noise(1.5, 2)])
    r = client.post("/v1/audio/events", json={"audio": base64.b64encode(encode(clip, SR, "wav")).decode()})
    assert r.status_code == 200, r.text
    speech = _by_event(r.json())["Speech"]
    assert speech == r.json()["events"][0], "speech is the most probable sound"
    words = (1.0, 1.0 + len(sentence) / SR)
    heard = sum(min(s["offset_s"], words[1]) - max(s["onset_s"], words[0]) for s in speech["spans"] if s["offset_s"] > words[0])
    assert abs(speech["spans"][0]["onset_s"] - words[0]) <= 0.5 and heard >= 0.8 * (words[1] - words[0]), speech


@pytest.mark.parametrize("kwargs, status, code", [
    ({"files": {"file": ("a.wav", b"RIFF....WAVEfmt nonsense")}}, 415, "unsupported_audio_format"),
    ({"files": {"file": ("a.wav", b"")}}, 400, None),
    ({"files": {"other": ("a.txt", b"x")}}, 422, "missing_audio"),
    ({"json": {"audio": "not base64!"}}, 400, "invalid_base64"),
    ({"json": {"truncate": True}}, 422, None),
    ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
    ({"content": b"{", "headers": {"content-type": "application/json"}}, 400, "invalid_json"),
])
def test_bad_input_is_a_4xx_json_error(client, kwargs, status, code):
    r = client.post("/v1/audio/events", **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and (code is None or error["code"] == code), error


def test_a_clip_over_the_limit_is_refused_unless_truncated(client, service):
    long = encode(_noise(service.settings.max_audio_s + 2), SR, "wav")
    r = client.post("/v1/audio/events", files={"file": ("long.wav", long)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "audio_too_long", r.text
    r = client.post("/v1/audio/events", files={"file": ("long.wav", long)}, data={"truncate": "true"})
    assert r.status_code == 200 and "truncated" in r.json()["audio"]["flags"]


def test_concurrent_requests_get_what_each_would_get_alone(client, service):
    """Different clips at once (threads in the verifier) answer exactly as one at a time."""
    from serving.ingress import create_app

    clips = [encode(_beep(0.5 + i * 0.4, 2.0 + i * 0.4, freq=500.0 + 250 * i, seed=i), SR, "wav") for i in range(5)]
    clips.append(encode(_noise(3.0, 9), SR, "wav"))

    def strip(body: dict) -> dict:
        return {k: v for k, v in body.items() if k != "request_id"}

    alone = [strip(client.post("/v1/audio/events", files={"file": ("c.wav", c)}).json()) for c in clips]
    assert len({json_key(b["events"]) for b in alone}) > 1, "the clips are told apart"

    async def together() -> list[dict]:
        transport = httpx.ASGITransport(app=create_app(service))
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as c:
            rs = await asyncio.gather(*(c.post("/v1/audio/events", files={"file": ("c.wav", clip)}) for clip in clips * 2))
        return [strip(r.json()) for r in rs]

    assert asyncio.run(together()) == alone * 2


def json_key(value) -> str:
    import json

    return json.dumps(value, sort_keys=True)


def test_events_are_counted_and_documented(client):
    before = client.get("/metrics").text
    client.post("/v1/audio/events", files={"file": ("beep.wav", encode(_beep(), SR, "wav"))})
    after = client.get("/metrics").text

    def total(text: str) -> float:
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith('earwitness_events_detected_total{vocabulary="ontology"}'))

    assert total(after) > total(before)
    assert 'earwitness_requests_total{code="200",endpoint="/v1/audio/events"}' in after
    spec = client.get("/openapi.json").json()["paths"]["/v1/audio/events"]["post"]
    assert set(spec["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    assert spec["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("EventsResponse")


# ---- the guard: an open question answered from the events --------------------------------------------------------------


@pytest.fixture(scope="module")
def yes_checkpoint(tmp_path_factory):
    """The tiny random Qwen2-Audio made to answer "yes" to everything: a bare "yes" to an open question is unparsed."""
    from tests.guard_helpers import build_yes_checkpoint

    return build_yes_checkpoint(tmp_path_factory.mktemp("yes"))


@pytest.fixture(scope="module")
def yes_service(service, yes_checkpoint):
    """The events' verifier under the yes-model."""
    from serving.ingress import Service
    from serving.model_client import LocalModel

    settings = service.settings.model_copy(update={"model": str(yes_checkpoint), "adapter": None})
    model = LocalModel(settings, multiplexed=False)
    yield Service(model, settings, service.guard.verifier)
    model.close()


@pytest.mark.parametrize("question, policy, described", [
    ("What do you hear?", "correct", True),  # unparsed: a bare yes to an open question
    ("Describe the audio.", "correct", True),
    ("What do you hear?", "annotate", False),  # annotate never rewrites
    ("Is there a beep?", "correct", False),  # a presence question: "yes" answers it
])
def test_correct_answers_an_unparsed_open_question_with_the_verifiers_description(yes_service, question, policy, described):
    from serving.ingress import create_app

    wav = encode(_beep(), SR, "wav")
    with TestClient(create_app(yes_service)) as c:
        r = c.post("/v1/audio/qa", files={"file": ("beep.wav", wav)}, data={"question": question, "guard": policy, "max_tokens": "4"})
        events = c.post("/v1/audio/events", files={"file": ("beep.wav", wav)}).json()
    body = r.json()
    assert r.status_code == 200, r.text
    assert bool(body["guard"]["described"]) is described
    if described:
        assert body["answer"] == events["description"] and "beep" in body["answer"]
        assert "Beep, bleep" in body["guard"]["described"]
        assert body["original_answer"].strip(" .").lower() == "yes" and body["answer_kind"] == "other"
    else:
        assert body["answer"].strip(" .").lower() == "yes"


def test_the_chat_completion_lists_the_events_on_request(yes_service):
    from serving.ingress import create_app

    wav = encode(_beep(), SR, "wav")
    audio = {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}}
    with TestClient(create_app(yes_service)) as c:
        def ask(extension: dict) -> dict:
            r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [audio, {"type": "text", "text": "Is there a beep?"}]}],
                                                     "max_tokens": 4, "earwitness": extension})
            assert r.status_code == 200, r.text
            return r.json()["earwitness"]

        listed = ask({"events": True})["events"]
        assert ask({})["events"] is None
        assert listed == c.post("/v1/audio/events", files={"file": ("b.wav", wav)}).json()["events"]
        assert any(e["event"] == "Beep, bleep" for e in listed)


@pytest.mark.slow  # the command loads the model and the verifier
def test_ask_lists_the_events_on_request(yes_checkpoint, client, tmp_path, capsys):
    """``earwitness ask --events``: the same list as the endpoint, beside the answer, in this process (the command's
    ``main``, here, where torch is loaded already; tests/test_cli_and_config.py runs ``python -m earwitness ask``)."""
    import json

    clip = tmp_path / "beep.wav"
    clip.write_bytes(encode(_beep(), SR, "wav"))
    done = cli_in_process(capsys, "ask", clip, "Is there a beep?", "--model", yes_checkpoint, "--guard", "off", "--events", "--max-tokens", "4")
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout.strip().splitlines()[-1])
    assert body["events"] == client.post("/v1/audio/events", files={"file": ("beep.wav", clip.read_bytes())}).json()["events"]
    assert body["guard"]["verdict"] == "skipped" and body["answer"].strip(" .").lower() == "yes"
