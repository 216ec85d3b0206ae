"""A response depends on its own request only: concurrent answers equal the same requests' answers alone.

Against the real Serve app (the session's Ray cluster, variant applications), with the shipped verifier:
- the tiny Qwen2-Audio that answers "yes" to everything (every presence question is a claim the verifier
  judges) with the verifier keeping nothing, so every request, concurrent ones too, runs the verifier's
  encoder: ``/v1/audio/verify``, guarded ``/v1/audio/qa`` and ``/v1/chat/completions`` at concurrency 4 and 16;
- earwitness-small's architecture on the frozen tower (``frozen_small``), whose tower is the verifier's encoder (``guard_share_encoder``): full-window clips are
  verified from the model's own layers, shorter ones by the verifier's encoder;
- the kept results (``verifier_cache_size``, the session app): clips first heard concurrently, then again one
  at a time, get the probabilities the verifier computes for their own samples in this process.
"""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
import soundfile as sf

from loadtests import equivalence as eq
from tests.guard_helpers import build_yes_checkpoint, metric_total, shipped_verifier, verifier_clips
from tests.test_ops_variants import variant_app

pytestmark = pytest.mark.slow  # two Serve deployments and hundreds of requests


def _needs_verifier() -> str:
    if shipped_verifier() is None:
        pytest.skip("needs the shipped verifier (models/earwitness-verifier)")
    return str(shipped_verifier())


def _model(base: str) -> str:
    return httpx.get(f"{base}/v1/models", timeout=30).json()["data"][0]["id"]


def _claims_scored(refs: dict) -> int:
    """Claims with a verifier score among the references: the test compares something the verifier said."""
    n = 0
    for _, body in refs.values():
        guard = body.get("guard") or (body.get("earwitness") or {}).get("guard") or {}
        n += sum(c.get("verifier_score") is not None for c in guard.get("claims", []))
    return n


@pytest.fixture(scope="module")
def yes_uncached(server, tmp_path_factory):
    verifier = _needs_verifier()
    ckpt = build_yes_checkpoint(tmp_path_factory.mktemp("yes-equiv"))
    with variant_app(server, "equiv", model=str(ckpt), verifier=verifier, verifier_cache_size=0,
                     verifier_timeout_s=120, request_timeout_s=120, max_batch_size=8) as base:
        yield base


def test_concurrent_answers_equal_alone_answers(yes_uncached):
    clips = eq.make_clips(6, seed=1, window_s=6.0, short_s=3.0)
    model = _model(yes_uncached)
    todo = eq.probes(len(clips), questions=2)
    refs = eq.references(yes_uncached, clips, todo, model)
    assert all(s == 200 for s, _ in refs.values()), [b for s, b in refs.values() if s != 200][:2]
    assert _claims_scored(refs) >= len(clips), "the yes-model's claims should be judged by the verifier"
    verify = [b for p, (_, b) in refs.items() if p.kind == "verify" and p.question == 0]
    assert len({tuple(e["probability"] for e in b["events"]) for b in verify}) == len(clips), "each clip its own scores"
    for concurrency in (4, 16):
        order = list(todo)
        np.random.default_rng(concurrency).shuffle(order)
        answers = eq.burst(yes_uncached, clips, order, model, concurrency)
        assert len(answers) == len(todo)
        differ = eq.mismatches(refs, answers)
        assert not differ, f"c={concurrency}: {len(differ)} of {len(answers)} differ, first: {differ[0]}"
        assert sum(s == 200 for _, s, _ in answers) >= len(answers) - 2, "nearly all answered (a 503 is backpressure)"


@pytest.fixture(scope="module")
def small_shared(server, frozen_small):
    verifier = _needs_verifier()
    with variant_app(server, "equiv-small", model=str(frozen_small), verifier=verifier, verifier_cache_size=0,
                     verifier_timeout_s=120, request_timeout_s=120) as base:
        yield base


def _clips_counted(base: str) -> dict[str, float]:
    return verifier_clips(httpx.get(f"{base}/metrics", timeout=10).text)


def test_shared_encoder_answers_equal_alone_answers(small_shared):
    clips = eq.make_clips(4, seed=2)  # 10 s (the model's window: shared) and 4 s (the verifier encodes)
    model = _model(small_shared)
    todo = [p for p in eq.probes(len(clips), questions=1)]
    before = _clips_counted(small_shared)
    refs = eq.references(small_shared, clips, todo, model)
    assert all(s == 200 for s, _ in refs.values())
    answers = eq.burst(small_shared, clips, list(reversed(todo)), model, 4)
    differ = eq.mismatches(refs, answers)
    assert not differ, f"{len(differ)} of {len(answers)} differ, first: {differ[0]}"
    after = _clips_counted(small_shared)
    if _claims_scored(refs):  # the model made claims: full-window clips were judged from the model's layers
        assert after["shared"] > before["shared"], (before, after)


def _samples(wav: bytes) -> np.ndarray:
    """What the server decodes from the WAV: 16-bit samples as float32 at 16 kHz."""
    from models.audio import decode

    return decode(wav, 16_000).samples


def test_kept_results_are_each_clips_own(server):
    """Clips heard first four at once, then one at a time from the kept results: every probability is the one
    the verifier computes for that clip alone (in this process, to the 4th decimal), and kept hits are counted."""
    from models.verifier.checkpoint import load_verifier

    url, settings = server
    verifier_dir = _needs_verifier()
    if settings.verifier != verifier_dir:
        pytest.skip("the session app does not serve the shipped verifier")
    verifier = load_verifier(verifier_dir)
    clips = eq.make_clips(4, seed=3, window_s=5.0, short_s=2.0)
    phrases = ["a dog barking", "speech", "a piano"]
    truth = [[round(e.probability, 4) for e in verifier.verify(_samples(c), phrases)] for c in clips]
    assert len({tuple(t) for t in truth}) == len(clips)

    def ask(client: httpx.Client, data: bytes) -> list[float]:
        r = client.post("/v1/audio/verify", files={"file": ("c.wav", data)}, data={"events": ",".join(phrases)})
        assert r.status_code == 200, r.text
        return [e["probability"] for e in r.json()["events"]]

    def hits() -> float:
        return metric_total(httpx.get(f"{url}/metrics", timeout=10).text, "earwitness_verifier_kept_hits_total")

    import concurrent.futures as cf

    def alone_client(data: bytes) -> list[float]:
        with httpx.Client(base_url=url, timeout=60) as c:
            return ask(c, data)

    with cf.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(alone_client, clips))
    start = hits()
    with httpx.Client(base_url=url, timeout=60) as client:
        again = [ask(client, c) for c in clips]
    assert together == truth, "concurrent answers are each clip's own"
    assert again == truth, "kept answers are each clip's own"
    assert hits() - start == len(clips), "the second hearing of each clip came from the kept results"


def test_decode_matches_what_the_reference_scores():
    """The in-process truth above scores what the server decodes: 16-bit WAV samples, bit for bit."""
    wav = eq.clip(1.0, 0)
    ref, _ = sf.read(io.BytesIO(wav), dtype="float32")
    np.testing.assert_array_equal(_samples(wav), ref)
