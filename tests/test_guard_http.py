"""The guard through the real Serve app: response shape, /v1/audio/verify, each policy, the verifier down.

Policies are exercised on a variant application whose model is the tiny random Qwen2-Audio made to
answer "yes" to everything (a real forward pass that ignores the audio: the maximal hallucinator)
and whose verifier is the shipped one, on real recordings (corpus test-split scenes: unseen
recordings) where the asked-about sound is and is not present.
"""

from __future__ import annotations

import base64
import time

import httpx
import pytest

from tests.guard_helpers import OUTSIDE_ONTOLOGY, build_yes_checkpoint, shipped_verifier, verifier_clips
from tests.helpers import encode, tone
from tests.test_ops_variants import variant_app

QUESTION = "Is there a sound of {x} in the audio?"


def _wav(seconds: float = 1.0) -> bytes:
    return encode(tone(seconds, 16_000, 1), 16_000, "wav")


def test_default_response_carries_a_guard(client):
    r = client.post("/v1/audio/qa", files={"file": ("a.wav", _wav())}, data={"question": "Is there a sound of a dog barking in the audio?"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["guard"]["policy"] == "annotate"
    assert body["guard"]["verdict"] in ("supported", "unsupported", "uncertain", "missed", "no_claims", "unverified")
    assert body.get("original_answer") is None  # annotate never changes the answer
    assert body["timing"]["guard_ms"] is not None


def test_guard_off_per_request(client):
    r = client.post("/v1/audio/qa", files={"file": ("a.wav", _wav())}, data={"question": "Did you hear rain?", "guard": "off"})
    assert r.status_code == 200, r.text
    assert r.json()["guard"] == {"policy": "off", "verdict": "skipped", "contrast": None, "claims": [], "described": []}
    assert r.json()["timing"]["guard_ms"] is None


def test_chat_completion_times_the_guard_as_the_qa_endpoint_does(client):
    """The OpenAI route reports the guard's stage (``timing.guard_ms``) when it runs, and null when it is off."""
    model = client.get("/v1/models").json()["data"][0]["id"]
    audio = {"type": "input_audio", "input_audio": {"data": base64.b64encode(_wav()).decode(), "format": "wav"}}

    def timing(policy: str) -> dict:
        body = {"model": model, "max_tokens": 4, "earwitness": {"guard": policy},
                "messages": [{"role": "user", "content": [audio, {"type": "text", "text": "Is there a sound of a dog barking in the audio?"}]}]}
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["earwitness"]["timing"]

    guarded = timing("annotate")
    assert guarded["guard_ms"] is not None and 0 <= guarded["guard_ms"] <= guarded["total_ms"]
    assert timing("off")["guard_ms"] is None


def test_unknown_guard_policy_is_422(client):
    r = client.post("/v1/audio/qa", files={"file": ("a.wav", _wav())}, data={"question": "Did you hear rain?", "guard": "sometimes"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"


def test_verify_endpoint_multipart_and_json(client):
    r = client.post("/v1/audio/verify", files={"file": ("a.wav", _wav())}, data={"events": ["a puppy yapping", "rainfall"]})
    assert r.status_code == 200, r.text
    events = r.json()["events"]
    assert [e["event"] for e in events] == ["Dog", "Rain"]
    assert all(0 <= e["probability"] <= 1 and e["present"] in (True, False, None) for e in events)
    r = client.post("/v1/audio/verify", json={"audio": base64.b64encode(_wav()).decode(), "events": ["someone knocking, a kitten meowing"]})
    assert r.status_code == 200, r.text
    assert [e["event"] for e in r.json()["events"]] == ["Knock"] or len(r.json()["events"]) == 1
    r = client.post("/v1/audio/verify", json={"audio": base64.b64encode(_wav()).decode(), "events": []})
    assert r.status_code == 422


def test_verify_names_the_nearest_class_of_phrases_outside_the_ontology(client):
    """Each phrase says which class it landed on (null here), the nearest one and how close, and is not judged."""
    r = client.post("/v1/audio/verify", json={"audio": base64.b64encode(_wav()).decode(), "events": [*OUTSIDE_ONTOLOGY, "a puppy yapping"]})
    assert r.status_code == 200, r.text
    *outside, dog = r.json()["events"]
    assert [e["text"] for e in outside] == OUTSIDE_ONTOLOGY
    for e in outside:
        assert e["event"] is None and e["nearest"] and 0 < e["similarity"] < 0.5, e
        assert e["present"] is None and e["reason"] == "outside_ontology" and 0 <= e["probability"] <= 1, e
    assert (dog["event"], dog["nearest"], dog["reason"]) == ("Dog", "Dog", None)
    schema = client.get("/openapi.json").json()["components"]["schemas"]["EventPresence"]["properties"]
    assert {"nearest", "similarity", "reason"} <= set(schema) and "outside_ontology" in schema["reason"]["description"]


def test_guard_metrics_exposed(client):
    client.post("/v1/audio/qa", files={"file": ("a.wav", _wav())}, data={"question": "Is there a dog?"})
    text = client.get("/metrics").text
    assert "earwitness_guard_verdicts_total" in text
    assert 'stage="guard"' in text


# ---- policies on real recordings, with a model that always says yes ----------------------------------

@pytest.fixture(scope="module")
def yes_app(server, tmp_path_factory):
    if shipped_verifier() is None:
        pytest.skip("needs the shipped verifier (models/earwitness-verifier)")
    ckpt = build_yes_checkpoint(tmp_path_factory.mktemp("yes-model"))
    with variant_app(server, "guard-yes", model=str(ckpt), verifier=str(shipped_verifier()), verifier_timeout_s=5.0) as base:
        deadline = time.time() + 90
        while time.time() < deadline:  # readyz covers the model; wait for the verifier replica too
            try:
                if httpx.post(f"{base}/v1/audio/verify", files={"file": ("a.wav", _wav())}, data={"events": "rain"}, timeout=10).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield base


def _ask(base: str, path, question: str, policy: str | None) -> dict:
    data = {"question": question}
    if policy:
        data["guard"] = policy
    with open(path, "rb") as f:
        r = httpx.post(f"{base}/v1/audio/qa", files={"file": ("clip.flac", f.read())}, data=data, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _clip_counts(base: str) -> tuple[float, float]:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    counts = verifier_clips(text)
    return counts["scored"], counts["kept"]


@pytest.mark.slow
def test_policies_on_an_absent_sound(yes_app, guard_clips):
    case = guard_clips["absent"]
    question = QUESTION.format(x=case["phrase"])
    before = _clip_counts(yes_app)
    annotated = _ask(yes_app, case["path"], question, "annotate")
    assert annotated["answer"] == "yes" and annotated.get("original_answer") is None
    assert annotated["guard"]["verdict"] == "unsupported"
    (claim,) = annotated["guard"]["claims"]
    assert claim["event"] == case["event"] and claim["present"] is False
    assert claim["contrast"] == pytest.approx(0.0, abs=0.5)  # a yes that ignores the audio: a prior

    corrected = _ask(yes_app, case["path"], question, "correct")
    assert (corrected["answer"], corrected["original_answer"], corrected["answer_kind"]) == ("No.", "yes", "no")
    abstained = _ask(yes_app, case["path"], question, "abstain")
    assert abstained["answer"] == f"I can't confirm hearing {case['phrase']}." and abstained["original_answer"] == "yes"
    off = _ask(yes_app, case["path"], question, "off")
    assert off["answer"] == "yes" and off["guard"]["verdict"] == "skipped"
    scored, kept = (after - b for after, b in zip(_clip_counts(yes_app), before))
    assert scored <= 1 and kept >= 2 and scored + kept == 3  # one recording, judged three times: one audio pass at most


@pytest.mark.slow
def test_policies_keep_a_present_sound(yes_app, guard_clips):
    case = guard_clips["present"]
    question = QUESTION.format(x=case["phrase"])
    for policy in ("correct", "abstain"):
        body = _ask(yes_app, case["path"], question, policy)
        assert body["answer"] == "yes" and body.get("original_answer") is None, body
        (claim,) = body["guard"]["claims"]
        assert claim["event"] == case["event"] and claim["present"] is not False


@pytest.mark.slow
def test_a_yes_about_a_sound_outside_the_ontology_stays_uncertain(yes_app):
    """A 'yes' to a sound no class stands for is neither confirmed nor denied: uncertain, and `correct` leaves it."""
    question = QUESTION.format(x="a fax machine handshake")
    for policy in ("annotate", "correct", "abstain"):
        r = httpx.post(f"{yes_app}/v1/audio/qa", files={"file": ("a.wav", _wav())}, data={"question": question, "guard": policy}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["guard"]["verdict"] == "uncertain", body
        (claim,) = body["guard"]["claims"]
        assert claim["present"] is None and claim["reason"] == "outside_ontology" and claim["event"] == "a fax machine handshake"
        assert claim["nearest"] and claim["similarity"] < 0.5
        if policy != "abstain":
            assert body["answer"] == "yes" and body.get("original_answer") is None, body
        else:  # abstain's own rule: unsure and a prior withholds the 'yes'; never a "No."
            assert body["answer"] == ("yes" if not claim["prior"] else "I can't confirm hearing a fax machine handshake."), body


@pytest.mark.slow
@pytest.mark.parametrize("samples", ["zeros", "noise under -80 dBFS"])
def test_a_yes_about_silence_is_unsupported_under_every_judging_policy(yes_app, samples):
    """Silence is evidence of absence: a 'yes, there is speech' about digital silence (or a clip whose peak is
    below -80 dBFS) is unsupported whatever the policy, and ``correct`` says "No"."""
    import numpy as np

    rng = np.random.default_rng(0)
    wave = np.zeros(16_000, np.float32) if samples == "zeros" else np.clip(2e-5 * rng.standard_normal(16_000), -9e-5, 9e-5).astype(np.float32)
    wav = encode(wave, 16_000, "wav", "FLOAT")
    for policy in ("annotate", "abstain", "correct"):
        r = httpx.post(f"{yes_app}/v1/audio/qa", files={"file": ("quiet.wav", wav)},
                       data={"question": "Is there a sound of speech in the audio?", "guard": policy}, timeout=60)
        assert r.status_code == 200, r.text
        guard = r.json()["guard"]
        assert guard["verdict"] == "unsupported", (policy, guard)
        assert [(c["present"], c["reason"]) for c in guard["claims"]] == [(False, "digital_silence")]
        if policy == "correct":
            assert r.json()["answer"] == "No." and r.json()["original_answer"].lower().startswith("yes")


@pytest.mark.slow
def test_verifier_down_answers_unverified(yes_app, server, guard_clips):
    """Kill the verifier's replica: answers still come back 200, marked unverified, and the failure is counted."""
    import ray

    case = guard_clips["absent"]
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "guard-yes#VerifierServer" in a["name"]]
    assert names, "no verifier replica found"
    for name in names:
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    start = time.time()
    body = _ask(yes_app, case["path"], QUESTION.format(x=case["phrase"]), "correct")
    assert time.time() - start < 30
    assert body["guard"]["verdict"] == "unverified" and body["answer"] == "yes"  # nothing judged, nothing changed
    assert body["guard"]["claims"][0]["present"] is None
    metrics = httpx.get(f"{yes_app}/metrics", timeout=10).text
    assert "earwitness_verifier_failures_total" in metrics and 'verdict="unverified"' in metrics


@pytest.mark.slow
def test_a_verify_the_verifier_cannot_answer_in_time_is_503_with_retry_after(server, verifier_checkpoint):
    """A live verifier that can't keep up is overloaded, not a gateway failure: the client is told when to retry."""
    with variant_app(server, "verify-slow", verifier=str(verifier_checkpoint), verifier_timeout_s=0.001) as base:
        r = httpx.post(f"{base}/v1/audio/verify", files={"file": ("a.wav", _wav())}, data={"events": "rain"}, timeout=30)
    assert r.status_code == 503 and r.headers.get("retry-after")
    assert r.json()["error"]["code"] == "verifier_unavailable"
