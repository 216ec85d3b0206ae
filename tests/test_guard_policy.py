"""Which policy a request runs under, and what `correct` does with free text and with alternatives (no models)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from models.questions import read_presence
from models.answers import extract_claims
from serving.guard.policy import POLICIES, ClaimCheck, apply_policy, verdict
from serving.guard.runner import GuardRunner, claim_checks


def _runner(server_policy: str | None) -> GuardRunner:
    return GuardRunner(None, SimpleNamespace(guard_policy=server_policy), None)


def test_a_requests_guard_then_the_servers_then_the_models_default():
    small, production = {"guard_policy": "correct"}, {"guard_policy": "annotate"}
    assert _runner(None).policy_for(None, small) == "correct"
    assert _runner(None).policy_for(None, production) == "annotate"
    assert _runner(None).policy_for(None, {}) == "annotate"  # a model that names none
    assert _runner("abstain").policy_for(None, small) == "abstain"  # EARWITNESS_GUARD_POLICY over the model's
    assert _runner("abstain").policy_for("off", small) == "off"  # the request over both
    assert _runner(None).policy_for("Annotate", small) == "annotate"


def test_the_embedded_default_answers_with_its_verifier_and_production_models_annotate():
    from models.registry import REGISTRY

    assert REGISTRY["earwitness-small"].guard_policy == "correct"
    assert REGISTRY["qwen2-audio-7b-instruct"].guard_policy == REGISTRY["qwen2.5-omni-7b"].guard_policy == "annotate"
    assert all(spec.guard_policy in POLICIES and spec.guard_policy != "off" for spec in REGISTRY.values())


CAPTION = "Someone snores twice, while someone sneezes."


def _caption_checks(scores: dict[str, tuple[bool | None, float]]) -> list[ClaimCheck]:
    out = []
    for c in extract_claims("Describe the audio.", CAPTION):
        present, score = scores[c.text]
        out.append(ClaimCheck(c.text, c.text, c.source, score, present=present, span=c.span))
    return out


def test_correct_keeps_only_mentions_judged_present():
    checks = _caption_checks({"Someone snores twice": (True, 0.9), "someone sneezes": (None, 0.3)})
    out = apply_policy("correct", CAPTION, checks, True)
    assert out.answer == "Someone snores twice." and out.original_answer == CAPTION
    assert [c.unconfirmed for c in checks] == [False, True]


def test_a_caption_with_nothing_confirmed_is_withheld():
    """Nothing of it judged present: "I can't confirm hearing …" (an open question's is then answered by the
    verifier's description of the clip, ``GuardRunner``), whether its mentions are absent or only uncertain."""
    checks = _caption_checks({"Someone snores twice": (None, 0.28), "someone sneezes": (None, 0.09)})
    out = apply_policy("correct", CAPTION, checks, True)
    assert (out.answer, out.original_answer, out.abstained) == ("I can't confirm hearing Someone snores twice or someone sneezes.", CAPTION, True)
    assert verdict(checks) == "uncertain" and out.overridden


def test_annotate_marks_unconfirmed_mentions_and_changes_nothing():
    checks = _caption_checks({"Someone snores twice": (True, 0.9), "someone sneezes": (None, 0.3)})
    out = apply_policy("annotate", CAPTION, checks, True)
    assert out.answer == CAPTION and out.original_answer is None
    assert [c.to_dict()["unconfirmed"] for c in out.claims] == [False, True]
    unverified = _caption_checks({"Someone snores twice": (None, 0.9), "someone sneezes": (None, 0.3)})
    assert apply_policy("correct", CAPTION, unverified, False).answer == CAPTION  # never changed unverified


def _asked_checks(question: str, answer: str, present: dict[str, bool | None]) -> list[ClaimCheck]:
    checks = claim_checks(question, answer, None, read_presence(question))
    for c in checks:
        c.present = present[c.text]
    return checks


@pytest.mark.parametrize("present,yes_verdict,yes_answer,no_verdict", [
    ({"cats": True, "dogs": False}, "supported", "Yes", "missed"),
    ({"cats": False, "dogs": False}, "unsupported", "No.", "supported"),
    ({"cats": None, "dogs": False}, "uncertain", "Yes", "uncertain"),
])
def test_alternatives_are_judged_as_one(present, yes_verdict, yes_answer, no_verdict):
    question = "Are there cats or dogs?"
    yes = apply_policy("correct", "Yes", _asked_checks(question, "Yes", present), True)
    assert (yes.verdict, yes.answer) == (yes_verdict, yes_answer)
    no = _asked_checks(question, "No", present)
    assert all(c.denied and c.either for c in no) and verdict(no) == no_verdict


def test_a_no_to_sounds_asked_together_is_missed_only_when_all_are_there():
    question = "Is there a dog and a cat?"
    assert verdict(_asked_checks(question, "No", {"a dog": True, "a cat": False})) == "supported"
    assert verdict(_asked_checks(question, "No", {"a dog": True, "a cat": True})) == "missed"
    both = apply_policy("correct", "Yes", _asked_checks(question, "Yes", {"a dog": True, "a cat": False}), True)
    assert (both.verdict, both.answer) == ("unsupported", "No.")


def test_the_served_path_reads_alternatives_and_takes_the_models_default_unless_the_server_names_one(tmp_path, verifier_checkpoint):
    """In process, as `earwitness ask` and the ingress answer: a model that says yes to everything, asked "cats or
    dogs?" about silence (every claimed sound judged absent without the verifier)."""
    import asyncio

    import numpy as np

    from serving import intake
    from serving.cli import in_process_service
    from serving.config import Settings
    from tests.guard_helpers import build_yes_checkpoint
    from tests.helpers import encode

    ckpt = build_yes_checkpoint(tmp_path / "yes")
    data = encode(np.zeros(16_000, np.float32), 16_000, "wav")

    async def ask(service):
        model_id, info = await service.resolve_model(None)
        clip = await intake.decode_upload(data, service.settings, info["sample_rate"], info["max_audio_s"])
        policy = service.guard.policy_for(None, info)
        return info, (await service.hear("test", clip, "Are there cats or dogs?", 4, policy, model_id)).outcome

    for server_policy, expected in ((None, "annotate"), ("correct", "correct")):
        settings = Settings(_env_file=None, model=str(ckpt), verifier=str(verifier_checkpoint), guard_policy=server_policy)
        with in_process_service(settings) as service:
            info, outcome = asyncio.run(ask(service))
        assert info["guard_policy"] == "annotate"  # a checkpoint directory's default
        assert outcome.policy == expected and outcome.verdict == "unsupported"
        assert [(c.text, c.either, c.present) for c in outcome.claims] == [("cats", True, False), ("dogs", True, False)]
        assert (outcome.answer, outcome.original_answer) == (("yes", None) if expected == "annotate" else ("No.", "yes"))


def test_what_is_left_of_a_cut_caption_reads_as_a_sentence():
    answer = "Someone snores twice, while a violin plays, then a"
    checks = []
    for c in extract_claims("Describe the audio.", answer):
        present = c.text != "Someone snores twice"
        checks.append(ClaimCheck(c.text, c.text, c.source, 0.9 if present else 0.2, present=present or None, span=c.span))
    assert apply_policy("correct", answer, checks, True).answer == "A violin plays."
