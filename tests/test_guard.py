"""The absent-sound guard's parts with real models: text matching, claims, policies, verifiers, audio contrast."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.answers import extract_claims
from models.questions import presence_target
from serving.guard.policy import ClaimCheck, Thresholds, apply_policy, is_prior, judge, verdict
from tests.guard_helpers import OUTSIDE_ONTOLOGY
from train.data.ontology import load_ontology

# paraphrases → ontology class, through the real all-MiniLM-L6-v2 (most are not phrases of the ontology)
PARAPHRASES = [
    ("a puppy yapping", "Dog"),
    ("a small dog yelping", "Dog"),
    ("someone knocking", "Knock"),
    ("rainfall", "Rain"),
    ("a kitten meowing", "Cat"),
    ("footsteps on gravel", "Walk, footsteps"),
    ("a rooster crowing at dawn", "Chicken, rooster"),
    ("a helicopter flying over", "Helicopter"),
    ("people applauding", "Applause"),
    ("a car honking", "Vehicle horn, car horn, honking"),
    ("someone coughing", "Cough"),
    ("an infant wailing", "Baby cry, infant cry"),
    ("a piano melody", "Piano"),
    ("a loud explosion", "Explosion"),
    ("a cow mooing", "Cattle, bovinae"),
    ("a phone ringing", "Telephone bell ringing"),
    ("typing on a keyboard", "Typing"),
    ("a man talking", "Speech"),
    ("a door slams", "Door"),
    ("birds chirping", "Bird"),
    ("a nice day", None),
]


@pytest.fixture(scope="module")
def verifier(verifier_checkpoint):
    from models.verifier.checkpoint import load_verifier

    return load_verifier(str(verifier_checkpoint))


def test_text_encoder_is_real_minilm():
    from models.verifier.text import shared_encoder

    enc = shared_encoder()
    v = enc.encode(["a dog barking", "a puppy yapping", "a helicopter flying over"])
    assert v.shape == (3, 384)
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > 0.4 > v[0] @ v[2]


@pytest.mark.parametrize("text,event", PARAPHRASES)
def test_paraphrases_land_on_the_right_class(verifier, text, event):
    (m,) = verifier.match([text])
    assert m.event == event, (text, m)


@pytest.mark.parametrize(
    "question,answer,claims",
    [
        ("Is there a sound of a dog barking in the audio?", "Yes", [("a dog barking", "question")]),
        ("Did you hear rain in the audio? Answer with yes or no.", "yes.", [("rain", "question")]),
        ("Can you hear someone knocking?", "No", []),
        ("Is the siren audible?", "Yes, and a puppy yapping too", [("the siren", "question"), ("a puppy yapping", "answer")]),
        ("Describe the audio in detail.", "I hear a dog barking and rain falling, then a door slams.",
         [("a dog barking", "answer"), ("rain falling", "answer"), ("a door slams", "answer")]),
        ("Generate a caption for the audio.", "An organ plays, with a fire crackling in the background.",
         [("An organ plays", "answer"), ("a fire crackling", "answer")]),
        ("Describe the audio.", "There is no dog, only rain.", [("rain", "answer")]),
    ],
)
def test_claims(question, answer, claims):
    assert [(c.text, c.source) for c in extract_claims(question, answer)] == claims


@pytest.mark.parametrize("question", ["Is there a sound of speech in the audio?", "Is there speech?", "Are there birds singing?",
                                      "Do you hear a dog?", "Did you hear rain?", "Can you hear someone talking?", "Is a piano audible?",
                                      "A dog barking in this clip?", "Is a dog barking in the recording?"])
def test_every_presence_phrasing_wants_a_yes_or_a_no(question):
    from models.answers import answers_the_question

    assert presence_target(question)
    assert answers_the_question(question, "Yes.") and answers_the_question(question, "No, there is none.")
    assert not answers_the_question(question, "1") and not answers_the_question(question, "a dog")


def test_counts_durations_and_open_questions_want_their_own_form():
    from models.answers import answers_the_question

    assert answers_the_question("How many times does the dog bark?", "3") and not answers_the_question("How many times does the dog bark?", "Yes")
    assert answers_the_question("How long does the rain last?", "About 4 seconds.") and not answers_the_question("How long does the rain last?", "No")
    for open_question in ("What do you hear?", "Describe the audio.", "Which sounds are in this clip?", "Generate a caption for the audio.",
                          "Write a short caption.", "Can you describe the clip?", "Please summarise the recording.", "Tell me what you hear."):
        assert answers_the_question(open_question, "A dog barks while rain falls.")
        assert not answers_the_question(open_question, "No") and not answers_the_question(open_question, "1")
        assert presence_target(open_question) is None
    assert answers_the_question("Count the barks.", "3") and not answers_the_question("Count the barks.", "Yes")
    assert presence_target("Can you identify the dog?") == "the dog"  # a hearing verb after "can you": still presence
    assert presence_target("Is the dog barking before the door slams in the audio?") is None  # order, not presence
    assert presence_target("What do you hear in this clip?") is None


def test_presence_targets():
    assert presence_target("Is there a sound of horse sounds in the audio?") == "horse sounds"
    assert presence_target("Do you hear a baby crying?") == "a baby crying"
    assert presence_target("Does the clip contain thunder?") == "thunder"
    assert presence_target("How many times do you hear a dog?") is None
    assert presence_target("Describe the audio in detail.") is None


T = Thresholds(absent_below=0.1, present_above=0.6, contrast_prior=0.05, contrast_heard=1.0)


def test_judge_combines_verifier_and_contrast():
    assert judge(0.05, 3.0, T) is False  # the verifier's confident 'absent' stands, whatever the model's contrast
    assert judge(0.9, -1.0, T) is True  # ... and so does its confident 'present'
    assert judge(0.3, 0.0, T) is None  # a prior is no evidence of absence: unsure stays unsure
    assert is_prior(0.0, T) and not is_prior(2.0, T) and not is_prior(None, T)
    assert judge(0.3, 2.0, T) is True  # unsure verifier + an answer that depends on the audio
    assert judge(0.3, None, T) is None
    assert judge(None, 2.0, T) is None
    # a claim outside the ontology is never judged, however sure its score or the contrast looks
    assert judge(0.99, 3.0, T, "outside_ontology") is None and judge(0.0, 0.0, T, "outside_ontology") is None


def _claim(present, source="question", text="a dog barking", span=None):
    return ClaimCheck(event="Dog", text=text, source=source, verifier_score=0.0, present=present, span=span)


def test_policies():
    absent = [_claim(False)]
    assert apply_policy("annotate", "Yes", absent, True).answer == "Yes"
    assert apply_policy("annotate", "Yes", absent, True).verdict == "unsupported"
    out = apply_policy("correct", "Yes", absent, True)
    assert (out.answer, out.original_answer, out.verdict) == ("No.", "Yes", "unsupported")
    out = apply_policy("abstain", "Yes", absent, True)
    assert (out.answer, out.original_answer) == ("I can't confirm hearing a dog barking.", "Yes")
    assert out.kind == "other", "an abstention is no 'no' (answer_kind, the 'no'-rate)"
    out = apply_policy("off", "Yes", absent, True)
    assert (out.answer, out.original_answer, out.verdict, out.claims) == ("Yes", None, "skipped", [])
    assert out.kind == "yes"
    for policy in ("annotate", "abstain", "correct"):
        assert apply_policy(policy, "Yes", [_claim(True)], True).original_answer is None
        assert apply_policy(policy, "Yes", [_claim(None)], True).verdict == "uncertain"
        assert apply_policy(policy, "Yes", [_claim(None)], True).original_answer is None
        unverified = apply_policy(policy, "Yes", [_claim(None)], False)
        assert (unverified.verdict, unverified.answer) == ("unverified", "Yes")
    assert verdict([], True) == "no_claims"  # nothing claimed: nothing vouched for
    # a 'yes' that ignores the audio about a sound the verifier can't confirm: abstain withholds it, correct keeps it
    prior = _claim(None)
    prior.prior = True
    assert apply_policy("abstain", "Yes", [prior], True).answer == "I can't confirm hearing a dog barking."
    assert apply_policy("correct", "Yes", [prior], True).original_answer is None
    assert apply_policy("abstain", "Yes", [prior], False).original_answer is None  # unverified: never changed


def test_correct_cuts_absent_mentions_from_free_text():
    answer = "I hear a dog barking and rain falling, then a door slams."
    claims = {c.text: c for c in extract_claims("Describe the audio.", answer)}
    checks = [
        ClaimCheck("Dog", "a dog barking", "answer", 0.9, present=True, span=claims["a dog barking"].span),
        ClaimCheck("Rain", "rain falling", "answer", 0.01, present=False, span=claims["rain falling"].span),
        ClaimCheck("Door", "a door slams", "answer", 0.9, present=True, span=claims["a door slams"].span),
    ]
    out = apply_policy("correct", answer, checks, True)
    assert "rain" not in out.answer.lower() and "dog barking" in out.answer and "door slams" in out.answer
    assert out.original_answer == answer


def test_verify_gives_calibrated_scores(verifier):
    sr = verifier.sample_rate
    noise = (0.05 * np.random.default_rng(0).standard_normal(sr * 2)).astype(np.float32)
    scores = verifier.verify(noise, ["a puppy yapping", "rainfall", "a spaceship landing"])
    assert [s.event for s in scores[:2]] == ["Dog", "Rain"]
    for s in scores:
        assert 0.0 <= s.probability <= 1.0 and s.present in (True, False, None)
    probs = verifier.class_probabilities(noise)
    assert set(probs) == set(load_ontology().names) and probs["Dog"] == pytest.approx(scores[0].probability, abs=1e-4)


@pytest.fixture(scope="module")
def noise_probs(verifier):
    noise = (0.05 * np.random.default_rng(0).standard_normal(verifier.sample_rate * 2)).astype(np.float32)
    return noise, verifier.class_probabilities(noise)


@pytest.mark.parametrize("text", OUTSIDE_ONTOLOGY)
def test_phrase_outside_the_ontology_is_never_judged(verifier, noise_probs, text):
    """No class matched: the nearest one and its similarity are reported, the free-text probability too, and no judgement."""
    noise, probs = noise_probs
    (s,) = verifier.verify(noise, [text], probs)
    assert s.event is None and s.nearest in verifier.index.classes
    assert 0.0 < s.similarity < verifier.index.min_similarity
    assert s.present is None and s.reason == "outside_ontology"
    assert 0.0 <= s.probability <= 1.0  # its own text scored, as evidence
    assert s.to_dict()["nearest"] == s.nearest and s.to_dict()["reason"] == "outside_ontology"


def test_matched_phrases_name_their_nearest_class(verifier):
    exact, paraphrase = verifier.match(["dog", "a small dog yelping"])
    assert (exact.event, exact.nearest, exact.similarity, exact.reason) == ("Dog", "Dog", 1.0, None)
    assert paraphrase.event == paraphrase.nearest == "Dog" and 0.5 <= paraphrase.similarity < 1.0 and paraphrase.reason is None


@pytest.mark.parametrize("forced", [0.999, 0.0])
def test_a_forced_free_text_probability_does_not_judge_an_unmatched_phrase(verifier, noise_probs, monkeypatch, forced):
    """The free-text score is a space trained only on the classes: sure-looking or not, it judges nothing."""
    noise, probs = noise_probs
    monkeypatch.setattr(verifier, "free_text_probabilities", lambda samples, texts: [forced] * len(texts))
    fax, dog = verifier.verify(noise, ["a fax machine handshake", "a puppy yapping"], probs)
    assert fax.probability == forced and fax.present is None and fax.reason == "outside_ontology"
    assert dog.reason is None and dog.present == judge(dog.probability, None, Thresholds(verifier.calibration.absent_below, verifier.calibration.present_above))  # a class: judged


def test_verifier_replica_keeps_a_clips_probabilities(verifier_checkpoint):
    """The same recording asked again (another question, a retry) is verified without an audio pass;
    a clip that differs in one sample, or in length, is scored anew; the cache stays bounded."""
    from serving.config import Settings
    from serving.verifier_server import VerifierServer

    server = VerifierServer.func_or_class(Settings(verifier=str(verifier_checkpoint), verifier_cache_size=2).model_dump())
    forwards = []
    score = server.verifier.class_probabilities
    server.verifier.class_probabilities = lambda clip: forwards.append(len(clip)) or score(clip)
    rng = np.random.default_rng(3)
    clip = (0.1 * rng.standard_normal(16_000)).astype(np.float32)
    first = server._assess(clip, ["a dog barking"])
    again = server._assess(clip.copy(), ["someone knocking"])  # the same samples in another buffer
    assert forwards == [16_000] and again.probabilities == first.probabilities
    assert (first.kept, again.kept) == (False, True)
    assert again.targets[0].event == "Knock"  # the question's own target is still matched
    again.probabilities["Dog"] = -1.0  # a caller's copy: the kept result is untouched
    assert server._assess(clip, []).probabilities["Dog"] == first.probabilities["Dog"]
    nudged = clip.copy()
    nudged[100] += 1e-3
    server._assess(nudged, [])
    server._assess(clip[:8_000], [])
    assert forwards == [16_000, 16_000, 8_000]
    server._assess(clip, [])  # pushed out by the two after it (size 2)
    assert forwards == [16_000, 16_000, 8_000, 16_000] and len(server.kept.entries) == 2
    off = VerifierServer.func_or_class(Settings(verifier=str(verifier_checkpoint), verifier_cache_size=0).model_dump())
    off._assess(clip, [])
    assert len(off.kept.entries) == 0


class _Handle:
    """A Serve handle's shape (``handle.method.remote(...)`` → awaitable) around a VerifierServer in this process."""

    def __init__(self, server):
        self.server = server

    def __getattr__(self, name):
        method = getattr(self.server, name)
        return type("Method", (), {"remote": staticmethod(lambda *args: method(*args))})()


def test_each_verdict_logs_its_clip_at_debug_level(verifier_checkpoint, caplog):
    """An operator can see which audio a verdict came from: at DEBUG the verifier logs the SHA-256 prefix of the
    samples it scored, and whether they came from its kept results."""
    import hashlib
    import logging

    from serving.config import Settings
    from serving.verifier_server import VerifierServer

    server = VerifierServer.func_or_class(Settings(verifier=str(verifier_checkpoint), verifier_cache_size=4, verifier_log_level="DEBUG").model_dump())
    clip = (0.1 * np.random.default_rng(5).standard_normal(16_000)).astype(np.float32)
    prefix = hashlib.sha256(memoryview(clip)).digest()[:6].hex()
    with caplog.at_level(logging.DEBUG, "earwitness.verifier"):
        server._assess(clip, ["a dog barking"])
        server._assess(clip, ["rain"])
    lines = [r.getMessage() for r in caplog.records if prefix in r.getMessage()]
    assert len(lines) == 2 and "scored" in lines[0] and "kept" in lines[1], lines
    logging.getLogger("earwitness.verifier").setLevel(logging.INFO)


@pytest.fixture(scope="module")
def verifier_server(verifier_checkpoint):
    from serving.config import Settings
    from serving.verifier_server import VerifierServer

    return VerifierServer.func_or_class(Settings(verifier=str(verifier_checkpoint), verifier_cache_size=0).model_dump())


def _guard(verifier_server, question: str, answer: str, contrast: float, policy: str):
    import asyncio
    from types import SimpleNamespace

    from serving.config import Settings
    from serving.guard.runner import GuardRunner
    from serving.metrics import Metrics

    runner = GuardRunner(_Handle(verifier_server), Settings(), Metrics())
    clip = _decoded((0.05 * np.random.default_rng(2).standard_normal(16_000)).astype(np.float32))
    generation = SimpleNamespace(text=answer, answer_logprob=-0.5, blank_logprob=-0.5 - contrast)

    async def answered():
        return generation

    async def run():
        return (await runner.run(clip, question, policy, answered())).outcome

    return asyncio.run(run())


def _decoded(samples: np.ndarray):
    """``samples`` as the intake's decoded clip (16 kHz, no flags)."""
    from models.audio import Clip

    return Clip(samples, 16_000, "WAV", 16_000, 1)


@pytest.mark.parametrize("forced,contrast", [(0.999, 5.0), (0.0, 0.0)])
def test_guard_keeps_a_claim_outside_the_ontology_uncertain(verifier_server, monkeypatch, forced, contrast):
    """A 'yes' about a sound no class stands for: uncertain under every policy, even when its free-text score (forced
    here: a fault real audio can't easily cause) and the model's contrast both look sure; `correct` leaves the answer."""
    monkeypatch.setattr(verifier_server.verifier, "free_text_probabilities", lambda samples, texts: [forced] * len(texts))
    question, answer = "Is there a sound of a fax machine handshake in the audio?", "Yes, I hear a fax machine handshake."
    for policy in ("annotate", "abstain", "correct"):
        out = _guard(verifier_server, question, answer, contrast, policy)
        assert out.verdict == "uncertain", (policy, out)
        (claim,) = out.claims
        assert (claim.present, claim.reason, claim.event, claim.verifier_score) == (None, "outside_ontology", "a fax machine handshake", forced)
        assert claim.nearest in verifier_server.verifier.index.classes and claim.similarity < 0.5
        if policy != "abstain" or not claim.prior:
            assert (out.answer, out.original_answer) == (answer, None), policy
        else:  # abstain's own rule: unsure and a prior (the answer as likely on silence) is withheld, never denied
            assert out.answer == "I can't confirm hearing a fax machine handshake." and out.kind == "other"


@pytest.mark.parametrize("forced,verdict", [(0.999, "missed"), (0.0, "supported"), (None, None)])
def test_a_no_to_a_presence_question_is_checked_as_a_claim_of_absence(verifier_server, monkeypatch, forced, verdict):
    """'No' denies the asked-about sound: the verifier hearing it (its probability forced here, a verdict real audio
    can't be made to give on demand) makes the answer ``missed``, which ``correct`` turns into "Yes."; the
    verifier judging it absent supports the 'No'; in between it stays uncertain."""
    real = verifier_server.verifier.class_probabilities
    if forced is not None:
        monkeypatch.setattr(verifier_server.verifier, "class_probabilities", lambda samples: {**real(samples), "Dog": forced})
    question = "Is there a sound of a dog barking in the audio?"
    for policy in ("annotate", "abstain", "correct"):
        out = _guard(verifier_server, question, "No.", 0.0, policy)
        (claim,) = out.claims
        assert claim.denied and claim.event == "Dog" and claim.source == "question"
        if forced is None:
            assert out.verdict in ("supported", "uncertain", "missed")
            continue
        assert (out.verdict, claim.present) == (verdict, forced > 0.5), (policy, out)
        if verdict == "missed" and policy == "correct":
            assert (out.answer, out.original_answer, out.kind) == ("Yes.", "No.", "yes")
        else:
            assert (out.answer, out.original_answer) == ("No.", None)


def _tiny_clap(directory: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, ClapAudioConfig, ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor, ClapTextConfig

    from models.verifier.text import minilm_path

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    text = ClapTextConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=1, intermediate_size=32,
                          max_position_embeddings=130, pad_token_id=tok.pad_token_id, projection_dim=16)
    audio = ClapAudioConfig(num_mel_bins=64, spec_size=128, window_size=4, patch_size=4, patch_stride=(4, 4), depths=[1, 1],
                            num_attention_heads=[1, 2], patch_embeds_hidden_size=16, hidden_size=32, projection_dim=16)
    ClapModel(ClapConfig(text_config=text.to_dict(), audio_config=audio.to_dict(), projection_dim=16)).save_pretrained(directory)
    ClapProcessor(feature_extractor=ClapFeatureExtractor(feature_size=64, sampling_rate=48_000, max_length_s=1), tokenizer=tok).save_pretrained(directory)
    return directory


def test_clap_verifier_behind_the_same_interface(tmp_path, verifier):
    from models.verifier.verifiers import ClapVerifier, Verifier

    clap = ClapVerifier.load(str(_tiny_clap(tmp_path / "clap")), verifier.index)
    assert isinstance(clap, Verifier)
    clip = (0.1 * np.random.default_rng(1).standard_normal(16_000 * 2)).astype(np.float32)
    scores = clap.verify(clip, ["a puppy yapping", "someone knocking"])
    assert [s.event for s in scores] == ["Dog", "Knock"]
    assert all(0.0 <= s.probability <= 1.0 for s in scores)
    assert set(clap.class_probabilities(clip)) == set(verifier.index.classes)


def test_audio_contrast_from_the_model(tiny_checkpoint):
    """Blank audio in, blank audio as reference: no contrast. Real audio: the two log-probs differ."""
    from models.registry import resolve
    from serving.backends import AudioPrompt
    from serving.backends.hf import TransformersBackend

    backend = TransformersBackend.load(resolve(str(tiny_checkpoint)))
    rng = np.random.default_rng(0)
    real = (0.2 * rng.standard_normal(16_000 * 4)).astype(np.float32)
    blank = np.zeros(16_000 * 3, dtype=np.float32)
    out = backend.generate([AudioPrompt(real, "Is there a dog?", 4, True), AudioPrompt(blank, "Is there a dog?", 4, True),
                            AudioPrompt(real, "Is there a dog?", 4, False)])
    assert out[0].answer_logprob is not None and out[0].answer_logprob != pytest.approx(out[0].blank_logprob, abs=1e-6)
    assert out[1].answer_logprob == pytest.approx(out[1].blank_logprob, abs=1e-4)
    assert out[2].answer_logprob is None and out[2].blank_logprob is None
    assert out[0].text == out[2].text  # asking for the contrast does not change the answer
    assert backend.contrast.scores.hits == 0
    backend.contrast.scores.clear()  # the pass again, from the blank prompt's kept prefix
    again = backend.generate([AudioPrompt(real, "Is there a dog?", 4, True)])
    assert again[0].blank_logprob == pytest.approx(out[0].blank_logprob, abs=1e-4)
    assert backend.contrast.prefixes.hits >= 1  # the blank prompt up to the question was computed once, then reused
    [kept] = backend.generate([AudioPrompt(real, "Is there a dog?", 4, True)])  # the same answer to the same question
    assert backend.contrast.scores.hits == 1 and kept.blank_logprob == again[0].blank_logprob  # its blank side kept, no pass
    hits = backend.contrast.scores.hits
    backend.generate([AudioPrompt(real[: 16_000 * 2], "Is there a dog?", 4, True)])
    assert backend.contrast.scores.hits == hits  # another length: computed anew


def test_contrast_matches_full_teacher_forced_passes(tiny_checkpoint):
    """Both log-probs equal full teacher-forced passes: the decode's for the real audio, a whole blank prompt's for silence."""
    import torch

    from models.registry import resolve
    from serving.backends import AudioPrompt
    from serving.backends.hf import TransformersBackend

    backend = TransformersBackend.load(resolve(str(tiny_checkpoint)))
    real = (0.2 * np.random.default_rng(3).standard_normal(16_000 * 4)).astype(np.float32)
    question, limit = "Is there a sound of a dog barking in the audio?", 3
    [out] = backend.generate([AudioPrompt(real, question, limit, True)])
    if out.answer_logprob is None:
        pytest.skip("the random tiny model answered 'no': nothing to contrast")

    tokenizer = backend.processor.tokenizer
    inputs = backend.inputs([AudioPrompt(real, question, limit)])
    with torch.no_grad():
        generated = backend.model.generate(**inputs, max_new_tokens=limit, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                           eos_token_id=tokenizer.eos_token_id)[0, inputs["input_ids"].shape[1] :]
    answer = generated[: max(1, min(out.num_tokens + 1, limit))]

    def teacher_forced(features: torch.Tensor) -> float:
        ids = torch.cat([inputs["input_ids"][0], answer])[None]
        with torch.no_grad():
            logits = backend.model(input_ids=ids, attention_mask=torch.ones_like(ids), input_features=features,
                                   feature_attention_mask=inputs["feature_attention_mask"]).logits[0]
        lp = logits[-len(answer) - 1 : -1].float().log_softmax(-1)
        return float(lp.gather(-1, answer[:, None]).sum())

    silence = backend.processor.feature_extractor(np.zeros_like(real), sampling_rate=16_000, return_tensors="pt", padding="max_length")
    assert out.answer_logprob == pytest.approx(teacher_forced(inputs["input_features"]), abs=1e-3)
    assert out.blank_logprob == pytest.approx(teacher_forced(silence["input_features"]), abs=1e-3)
