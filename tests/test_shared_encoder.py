"""One encoder pass per guarded request: when the served model's audio tower is the verifier's frozen encoder
(earwitness-small's architecture on the frozen tower, ``frozen_small``, and the shipped verifier: Whisper tiny.en
over 10 s), the model hands the verifier that encoder's layers instead of both encoding the clip
(``guard_share_encoder``, serving/guard/runner.py).

The request-level tests run the fused composition in process, as ``Ingress`` builds it for topology fused:
the Service over a LocalModel (the ModelServer class) and the VerifierServer class. The model is made
to answer "Yes" to everything (its generation config allows only that token), so every presence question is
a claim the verifier has to judge. The runner-level tests use a fake verifier.
"""

from __future__ import annotations

import asyncio
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from models.families import unwrap
from models.registry import SMALL_DIR, resolve
from tests.guard_helpers import shipped_verifier, verifier_clips
from tests.helpers import encode

SR = 16_000
WINDOW = 10 * SR
QUESTION = "Is there a sound of a dog barking in the audio?"
SIGNATURE = "whisper-tiny.en@10s"


def _clip(seconds: float, seed: int) -> np.ndarray:
    """Noise under a chirp of 300-1200 Hz: a clip no two seeds share."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    chirp = np.sin(2 * np.pi * (300 + 90 * t) * t) * (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.2, 2) * t))
    return (0.2 * chirp + 0.05 * rng.standard_normal(len(t))).astype(np.float32)


def _always_yes(backend) -> None:
    """Decoding allows only "Yes", once, then the end: a real forward whose answer ignores the audio."""
    tok = backend.processor.tokenizer
    yes = tok.encode("Yes", add_special_tokens=False)
    assert len(yes) == 1, f"'Yes' is {yes} in earwitness-small's tokenizer"
    stops = {i for i in (tok.eos_token_id, tok.pad_token_id) if i is not None}
    config = unwrap(backend.model).generation_config
    config.suppress_tokens = [i for i in range(len(tok)) if i != yes[0] and i not in stops]
    config.begin_suppress_tokens = sorted(stops)
    config.sequence_bias = {(yes[0], yes[0]): -1000.0}


@pytest.fixture(scope="module")
def app(frozen_small):
    """``(client, service, model_server, verifier_server)`` of the fused composition in this process."""
    if shipped_verifier() is None:
        pytest.skip("needs the shipped earwitness-verifier")
    from fastapi.testclient import TestClient

    from models.pretrained.wheels import WheelError, WheelHashError
    from serving.config import Settings
    from serving.ingress import Service, create_app
    from serving.model_client import InProcess, LocalModel
    from serving.verifier_server import VerifierServer

    settings = Settings(_env_file=None, topology="fused", model=str(frozen_small), verifier=str(shipped_verifier()), model_cpus=1)
    try:
        model, verifier = LocalModel(settings, multiplexed=False), VerifierServer.func_or_class(settings.model_dump())
    except WheelHashError:
        raise
    except WheelError as e:
        pytest.skip(f"pretrained wheels unavailable: {e}")
    _always_yes(model.server.backend)
    service = Service(model, settings, InProcess(verifier))
    with TestClient(create_app(service)) as client:
        yield client, service, model.server, verifier


@contextmanager
def encoder_passes(model_server, verifier_server):
    """Forward passes of the model's audio tower and of the verifier's own encoder inside the block."""
    from models.families import audio_tower

    counts = {"model": 0, "verifier": 0}
    towers = {"model": audio_tower(model_server.backend.model), "verifier": verifier_server.verifier.scorer.frontend.tower}
    handles = [t.register_forward_hook(lambda *_, name=name: counts.__setitem__(name, counts[name] + 1)) for name, t in towers.items()]
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def _ask(client, samples: np.ndarray, policy: str = "annotate") -> dict:
    r = client.post("/v1/audio/qa", files={"file": ("clip.wav", encode(samples, SR, "wav"))},
                    data={"question": QUESTION, "guard": policy, "max_tokens": "4"})
    assert r.status_code == 200, r.text
    return r.json()


def _clips_counted(client) -> dict[str, float]:
    return verifier_clips(client.get("/metrics").text)


def _wav_samples(samples: np.ndarray) -> np.ndarray:
    """The samples the server decodes from ``_ask``'s 16-bit WAV."""
    from models.audio import decode

    return decode(encode(samples, SR, "wav"), SR).samples


# ---- signatures ------------------------------------------------------------------------------------


def test_both_ends_name_the_same_frozen_tower(app, frozen_small):
    from models.loading import frozen_tower
    from models.registry import REGISTRY
    from models.verifier.scorer import ScorerConfig

    _, service, model_server, verifier_server = app
    assert model_server.info()["tower"] == verifier_server.info()["tower"] == SIGNATURE
    assert frozen_tower(resolve(str(frozen_small))) == SIGNATURE  # from its parts file
    assert frozen_tower(REGISTRY["earwitness-small"]) is None  # the shipped model's top tower layers are distilled: its own
    assert frozen_tower(REGISTRY["earwitness-tiny"]) is None  # trained from scratch: its tower is its own
    assert frozen_tower(REGISTRY["qwen2-audio-7b-instruct"]) is None
    assert not hasattr(ScorerConfig(), "tower")  # the log-mel verifier reads no encoder


def test_an_adapter_that_changes_the_tower_stops_the_sharing(app, tmp_path):
    import json

    backend = app[2].backend
    shipped = str(SMALL_DIR / "adapter")
    assert backend.shared_tower([shipped]) == SIGNATURE  # its LoRA is on the language model only
    for name, doc in {"q": {"target_modules": ["q_proj"]},  # q_proj is in the tower's attention too
                      "saved": {"target_modules": "model\\.language_model\\..*q_proj", "modules_to_save": ["audio_tower"]}}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, **doc}))
        assert backend.shared_tower([shipped, str(tmp_path / name)]) is None, name


# ---- the layers ------------------------------------------------------------------------------------


def test_the_models_layers_are_the_verifiers_own_on_a_full_window(app):
    """A clip that fills the window: the layers captured in generate's prefill are encode_layers' own, and so
    are the verifier's scores from them."""
    from models.pretrained.whisper import encode_layers
    from serving.backends import AudioPrompt
    from models.verifier.scorer import TowerLayers

    _, _, model_server, verifier_server = app
    verifier = verifier_server.verifier
    frontend = verifier.scorer.frontend
    clips = [_clip(10.0, 1), _clip(10.0, 2)]
    generations = model_server.backend.generate([AudioPrompt(c, QUESTION, 2, tower_layers=True) for c in clips] + [AudioPrompt(clips[0], QUESTION, 2)])
    assert generations[2].tower_layers is None  # not asked, not computed
    for clip, g in zip(clips, generations):
        assert g.tower_layers.shape == (2, 250, 384) and g.tower_layers.dtype == np.float32
        feats = frontend.extractor([clip], sampling_rate=SR, padding="max_length", return_tensors="pt")["input_features"]
        own = torch.stack(encode_layers(frontend.tower, feats))[:, 0].numpy()
        np.testing.assert_allclose(g.tower_layers, own, rtol=0, atol=1e-5)  # measured: identical
        texts = verifier.class_texts()
        np.testing.assert_allclose(verifier.raw_scores(TowerLayers(g.tower_layers, len(clip)), texts), verifier.raw_scores(clip, texts), atol=1e-5)


def test_a_clip_shorter_than_the_window_is_not_shared(app):
    """The model's tower masks a short clip's padded frames (transformers' Qwen2-Audio passes an attention mask);
    the encoder alone, as the verifier runs it and was trained on, attends to them. The layers differ, and so would
    the verifier's probabilities: measured on 12 corpus test scenes cut short, the largest difference over the 73
    classes was 0.05 at 9.9 s, 0.08 at 9 s, 0.16 at 7 s, 0.30 at 5 s, 0.37 at 1 s, changing on average 1 (9.9 s)
    to 4 (1 s) of a clip's 73 judgements. So a short clip gets no layers and keeps the verifier's own, overlapped pass."""
    from serving.backends import AudioPrompt
    from models.families import audio_tower
    from serving.backends.hf import captured_layers
    from models.verifier.scorer import TowerLayers

    client, _, model_server, verifier_server = app
    backend, verifier = model_server.backend, verifier_server.verifier
    short = _clip(5.0, 3)
    (g,) = backend.generate([AudioPrompt(short, QUESTION, 2, tower_layers=True)])
    assert g.tower_layers is None
    inputs = backend.inputs([AudioPrompt(short, QUESTION, 1)])
    base = unwrap(backend.model)
    with torch.inference_mode(), captured_layers(audio_tower(backend.model)) as heard:
        base.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                   input_features=inputs["input_features"], feature_attention_mask=inputs["feature_attention_mask"])
    masked = torch.stack(heard["layers"])[:, 0].numpy()
    texts = verifier.class_texts()
    difference = np.abs(verifier.raw_scores(TowerLayers(masked, len(short)), texts) - verifier.raw_scores(short, texts)).max()
    assert difference > 0.05, difference  # the reason for the rule: if the mask ever goes, revisit it

    before = _clips_counted(client)
    with encoder_passes(model_server, verifier_server) as passes:
        body = _ask(client, short)
    assert body["guard"]["verdict"] != "unverified" and passes["verifier"] == 1
    after = _clips_counted(client)
    assert after["shared"] == before["shared"] and after["scored"] + after["kept"] == before["scored"] + before["kept"] + 1


# ---- through the app ---------------------------------------------------------------------------------


def test_a_guarded_request_runs_the_whisper_encoder_once(app):
    """A full-window clip: the model's prefill is the one encoder pass, and the guard's outcome is the one
    the verifier's own pass gives (guard_share_encoder off)."""
    client, service, model_server, verifier_server = app
    with encoder_passes(model_server, verifier_server) as warm:  # also fills the blank-audio prefix of a 10 s clip
        _ask(client, _clip(10.0, 4))
    assert warm["verifier"] == 0
    clip = _clip(10.0, 5)
    before = _clips_counted(client)
    with encoder_passes(model_server, verifier_server) as passes:
        shared = _ask(client, clip)
    assert passes == {"model": 1, "verifier": 0}
    assert _clips_counted(client)["shared"] == before["shared"] + 1
    assert shared["answer"] == "Yes" and shared["guard"]["verdict"] in ("supported", "unsupported", "uncertain")
    (claim,) = shared["guard"]["claims"]
    assert claim["event"] == "Dog" and claim["verifier_score"] is not None

    service.settings.guard_share_encoder = False
    try:
        with encoder_passes(model_server, verifier_server) as passes:
            apart = _ask(client, clip)
    finally:
        service.settings.guard_share_encoder = True
    assert passes == {"model": 1, "verifier": 1}
    assert apart["guard"] == shared["guard"]
    probs = verifier_server.verifier.class_probabilities(_wav_samples(clip))
    assert claim["verifier_score"] == pytest.approx(probs["Dog"], abs=5e-5)  # the response rounds to 4 places


def test_the_fused_verifier_reads_the_models_layers_and_hears_the_clip_with_them(app):
    """earwitness-verifier-fused on the shared path: its Whisper member scores the model's layers (no pass of its
    own), its tagger the clip that comes with them; the claim's score is the fused verifier's on the clip itself."""
    from fastapi.testclient import TestClient

    from models.pretrained.wheels import WheelError
    from serving.ingress import Service, create_app
    from serving.model_client import InProcess
    from serving.verifier_server import VerifierServer

    _, service, model_server, _ = app
    settings = service.settings.model_copy(update={"verifier": "earwitness-verifier-fused"})
    try:
        fused = VerifierServer.func_or_class(settings.model_dump())
    except WheelError as e:
        pytest.skip(f"pretrained wheels unavailable: {e}")
    assert fused.info()["tower"] == SIGNATURE and fused.info()["hears_clip"] is True
    whisper = fused.verifier.members[0].scorer.frontend.tower
    tagger = fused.verifier.members[1].scorer.frontend.top
    calls, tagged = [], []
    handles = [whisper.register_forward_hook(lambda *_: calls.append(1)), tagger.register_forward_hook(lambda *_: tagged.append(1))]
    clip = _clip(10.0, 9)
    try:
        with TestClient(create_app(Service(service.model, settings, InProcess(fused)))) as client:
            before = _clips_counted(client)
            body = _ask(client, clip)
            assert _clips_counted(client)["shared"] == before["shared"] + 1
    finally:
        for h in handles:
            h.remove()
    assert calls == []  # the Whisper member read the model's layers
    assert len(tagged) == 1  # the tagger heard the clip once: prepared beside generation, then found by the layers' call
    (claim,) = body["guard"]["claims"]
    assert claim["event"] == "Dog"
    assert claim["verifier_score"] == pytest.approx(fused.verifier.class_probabilities(_wav_samples(clip))["Dog"], abs=5e-5)


def test_the_verifier_refuses_layers_that_are_not_one_window(app):
    server = app[3]
    with pytest.raises(ValueError, match="not one whisper-tiny.en window"):
        server._assess_layers(np.zeros((2, 125, 384), np.float32), WINDOW, [])
    with pytest.raises(ValueError, match="not one whisper-tiny.en window"):
        server._assess_layers(np.zeros((2, 250, 384), np.float32), WINDOW + 1, [])



def test_the_verifier_scores_read_only_layers_as_a_ray_handle_delivers_them(app):
    """An object-store view is read-only: the verifier copies it once instead of wrapping it (torch warns of undefined behaviour)."""
    import warnings

    server = app[3]
    layers = np.zeros((2, 250, 384), np.float32)
    layers.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = server._assess_layers(layers, WINDOW, [])
    probs = result["probabilities"].values()
    assert result["shared"] and len(probs) > 0 and all(0.0 <= p <= 1.0 for p in probs)

# ---- the runner, on a fake verifier --------------------------------------------------------------------


class FakeVerifier:
    """The verifier deployment's calls, answering that the asked-about sound is absent."""

    def __init__(self, tower: str | None = SIGNATURE):
        self.tower, self.calls, self.fail = tower, [], set()

    def _maybe_fail(self, name: str) -> None:
        self.calls.append(name)
        if name in self.fail:
            raise RuntimeError(f"{name} failed")

    def info(self) -> dict:
        self._maybe_fail("info")
        return {"verifier": "fake", "tower": self.tower}

    def _result(self, texts, **extra) -> dict:
        events = [{"text": t, "event": "Dog", "nearest": "Dog", "similarity": 1.0, "probability": 0.01, "present": False, "reason": None} for t in texts]
        return {"probabilities": {"Dog": 0.01}, "kept": False, "events": events, "absent_below": 0.1, "present_above": 0.5, **extra}

    def assess(self, samples, texts) -> dict:
        self._maybe_fail("assess")
        return self._result(texts)

    def assess_layers(self, layers, n_samples, texts) -> dict:
        self._maybe_fail("assess_layers")
        assert n_samples == WINDOW
        return self._result(texts, shared=True)

    def match(self, texts) -> list:
        return []


def _runner(fake: FakeVerifier, **settings):
    from serving.config import Settings
    from serving.guard.runner import GuardRunner
    from serving.metrics import Metrics
    from serving.model_client import InProcess

    return GuardRunner(InProcess(fake), Settings(_env_file=None, **settings), Metrics())


INFO = {"tower": SIGNATURE, "max_audio_s": 10.0, "sample_rate": SR}


def _guarded(runner, layers, n_samples: int = WINDOW, model_info: dict = INFO):
    generation = SimpleNamespace(text="yes", answer_logprob=-0.1, blank_logprob=-0.1, tower_layers=layers)

    from models.audio import Clip

    asked: dict = {}

    def call_model(tower_layers: bool):
        asked["shared"] = tower_layers

        async def answer():  # awaited once the verifier's call (if any) has left: what it was asked so far
            asked["started"] = list(runner.verifier.instance.calls)
            return generation

        return answer()

    async def run():
        clip = Clip(np.full(n_samples, 0.01, np.float32), SR, "WAV", SR, 1)
        outcome = (await runner.run(clip, QUESTION, "annotate", model_info, call_model)).outcome
        return asked["shared"], asked["started"], outcome

    return asyncio.run(run())


LAYERS = np.zeros((2, 250, 384), np.float32)


def test_shared_the_verifier_scores_the_models_layers_after_the_answer():
    fake = FakeVerifier()
    shared, started, outcome = _guarded(_runner(fake), LAYERS)
    assert shared and started == ["info"]  # nothing sent beside the model
    assert fake.calls == ["info", "assess_layers"] and outcome.verdict == "unsupported"
    fake.calls.clear()
    runner = _runner(fake)
    _guarded(runner, LAYERS)
    _guarded(runner, LAYERS)
    assert fake.calls == ["info", "assess_layers", "assess_layers"]  # the signature is asked once per runner


def test_a_model_that_sends_no_layers_gets_the_clip_scored():
    fake = FakeVerifier()
    shared, _, outcome = _guarded(_runner(fake), None)
    assert shared and fake.calls == ["info", "assess"] and outcome.verdict == "unsupported"


def test_a_failed_layers_call_answers_unverified():
    fake = FakeVerifier()
    fake.fail.add("assess_layers")
    _, _, outcome = _guarded(_runner(fake), LAYERS)
    assert outcome.verdict == "unverified" and outcome.answer == "yes"


@pytest.mark.parametrize("case", ["other tower", "model without one", "short clip", "switched off", "verifier without one"])
def test_otherwise_the_verifier_encodes_the_clip_beside_the_model(case):
    fake = FakeVerifier(None if case == "verifier without one" else SIGNATURE)
    info = {**INFO, "tower": {"other tower": "whisper-base@10s", "model without one": None}.get(case, SIGNATURE)}
    runner = _runner(fake, guard_share_encoder=case != "switched off")
    shared, started, outcome = _guarded(runner, LAYERS, WINDOW - 1 if case == "short clip" else WINDOW, info)
    assert not shared and started[-1] == "assess" and outcome.verdict == "unsupported"
    assert fake.calls.count("assess") == 1 and "assess_layers" not in fake.calls


def test_a_verifier_that_cannot_say_its_tower_is_asked_again_later():
    fake = FakeVerifier()
    fake.fail.add("info")
    runner = _runner(fake)
    shared, _, outcome = _guarded(runner, LAYERS)
    assert not shared and outcome.verdict == "unsupported"  # scored from the clip meanwhile
    fake.fail.clear()
    shared, _, _ = _guarded(runner, LAYERS)
    assert shared and fake.calls[-2:] == ["info", "assess_layers"]
