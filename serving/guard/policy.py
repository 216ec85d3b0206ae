"""Judging claims from the two signals, the answer's verdict, and what each policy does with it.

Per claim, two independent signals:

- ``verifier_score``: the verifier's calibrated probability that the claimed sound is in the
  clip (absent below ``absent_below``, present from ``present_above``, uncertain between);
- ``contrast``: ``log P(answer | real audio) − log P(answer | blank audio)`` from the served model
  (nats). Near zero or below, the answer does not depend on the audio: a prior, not a hearing.

A claim is judged **absent** only on the verifier's evidence of absence (a prior is no evidence
either way: it only means the model did not hear the sound, not that the sound is not there);
**present** when the verifier says present, or is uncertain while the answer clearly depends on
the audio (``contrast >= contrast_heard``); otherwise uncertain, and marked ``prior`` when the
answer does not depend on the audio (``contrast <= contrast_prior``). The verifier's confident
judgement is never overridden by the contrast: the model's own likelihoods are the weaker witness.
A claim that matched no ontology class (``reason`` ``outside_ontology``) is never judged either way: it
stays uncertain, so it can make an answer neither supported nor unsupported, and ``correct`` leaves it.

Verdict: ``unsupported`` if any claim is judged absent, ``supported`` if all are present, ``uncertain``
otherwise, ``no_claims`` when the answer claims no sound (nothing to check, so nothing is vouched for),
``unverified`` when the checks could not run, ``skipped`` when the policy is ``off`` (nothing was checked,
and nothing failed).

On a silent clip (digital silence, or a peak below -80 dBFS) every claimed sound is judged absent, with
``reason`` ``digital_silence``, whatever the verifier would say: silence is evidence of absence.

A claim can be ``present`` and ``prior`` at once: the sound is there (the verifier is confident), but the
answer is as likely on silence, so the model guessed right rather than heard it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from models.answers import classify
from models.verifier.calibration import reading

POLICIES = ("off", "annotate", "abstain", "correct")
VERDICTS = ("supported", "unsupported", "uncertain", "missed", "no_claims", "unverified", "skipped")
ABSTAIN = "I can't confirm hearing"


@dataclass
class ClaimCheck:
    event: str  # ontology class (or the mention itself when it matched none)
    text: str  # the mention as written
    source: str  # question | answer
    verifier_score: float | None = None
    contrast: float | None = None
    present: bool | None = None
    span: tuple[int, int] | None = None
    prior: bool = False  # the answer does not depend on the audio (contrast at or below contrast_prior)
    nearest: str | None = None  # the closest ontology class, close enough or not
    similarity: float | None = None  # of the mention to ``nearest``
    reason: str | None = None  # outside_ontology: matched no class, so never judged (see :func:`judge`); digital_silence
    denied: bool = False  # a claim of absence: the answer said "no" to a presence question about this sound
    either: bool = False  # one of a question's alternatives ("Are there X or Y?"): the alternatives are judged as one
    unconfirmed: bool = False  # a free-text mention the verifier does not judge present (what ``correct`` cuts)

    def to_dict(self) -> dict:
        return {
            "event": self.event,
            "text": self.text,
            "verifier_score": None if self.verifier_score is None else round(self.verifier_score, 4),
            "contrast": None if self.contrast is None else round(self.contrast, 4) + 0.0,  # + 0.0: no "-0.0" in the JSON
            "present": self.present,
            "prior": self.prior,
            "nearest": self.nearest,
            "similarity": None if self.similarity is None else round(self.similarity, 4),
            "reason": self.reason,
            "denied": self.denied,
            "either": self.either,
            "unconfirmed": self.unconfirmed,
        }


@dataclass(frozen=True)
class Thresholds:
    absent_below: float
    present_above: float
    contrast_prior: float = 0.05
    contrast_heard: float = 1.0


def judge(score: float | None, contrast: float | None, t: Thresholds, reason: str | None = None) -> bool | None:
    """Present / absent / None (uncertain): the verifier's own reading of its probability
    (:func:`models.verifier.calibration.reading`; a claim with a ``reason``, outside the ontology, is never judged),
    and, where that is unsure, present when the answer clearly depends on the audio."""
    heard = reading(score, t.absent_below, t.present_above, reason)
    if heard is None and score is not None and reason is None and contrast is not None and contrast >= t.contrast_heard:
        return True
    return heard


def is_prior(contrast: float | None, t: Thresholds) -> bool:
    """The answer is as likely on blank audio as on the clip: the model did not hear what it claims."""
    return contrast is not None and contrast <= t.contrast_prior


def _any(values: list[bool | None]) -> bool | None:
    return True if True in values else False if all(v is False for v in values) else None


def _all(values: list[bool | None]) -> bool | None:
    return False if False in values else True if all(v is True for v in values) else None


def units(claims: list[ClaimCheck]) -> list[tuple[bool, bool | None]]:
    """What the answer asserts, as ``(denied, present)`` pairs. A question's alternatives are one assertion: a 'yes' to
    "X or Y?" holds when any is there, a 'no' to "X and Y?" when not all are; every other claim stands alone."""
    out, asked_yes, asked_no = [], [], []
    for c in claims:
        if c.either and not c.denied:
            asked_yes.append(c.present)
        elif c.denied and _joint(claims):
            asked_no.append(c.present)
        else:
            out.append((c.denied, c.present))
    if asked_yes:
        out.append((False, _any(asked_yes)))
    if asked_no:
        out.append((True, _all(asked_no)))
    return out


def _joint(claims: list[ClaimCheck]) -> bool:
    """Several denied sounds of one question asked together ("Is there X and Y?" answered 'no')."""
    denied = [c for c in claims if c.denied]
    return len(denied) > 1 and not any(c.either for c in denied)


def verdict(claims: list[ClaimCheck], verified: bool = True) -> str:
    """A claim of presence is borne out when judged present, a claim of absence (``denied``) when judged absent."""
    if not verified:
        return "unverified"
    if not claims:
        return "no_claims"
    asserted = units(claims)
    if any(denied and present is True for denied, present in asserted):
        return "missed"
    if any(not denied and present is False for denied, present in asserted):
        return "unsupported"
    if all(present is (not denied) for denied, present in asserted):
        return "supported"
    return "uncertain"


@dataclass
class Outcome:
    answer: str
    original_answer: str | None
    policy: str
    verdict: str
    claims: list[ClaimCheck] = field(default_factory=list)
    abstained: bool = False  # the answer is the guard's "I can't confirm hearing X.", not the model's
    unparsed: bool = False  # the answer is not of the form the question asks for (``claims.answers_the_question``)
    described: tuple[str, ...] = ()  # the answer is the verifier's description of the clip (the classes it names), not the model's

    @property
    def overridden(self) -> bool:
        return self.original_answer is not None

    @property
    def kind(self) -> str:
        """The answer read as yes / no / other, or unparsed; an abstention is neither a yes nor a no."""
        if self.abstained:
            return "other"
        return "unparsed" if self.unparsed else classify(self.answer)

    def guard_dict(self) -> dict:
        contrasts = {c.contrast for c in self.claims if c.contrast is not None}
        return {"policy": self.policy, "verdict": self.verdict, "contrast": contrasts.pop() if len(contrasts) == 1 else None,
                "claims": [c.to_dict() for c in self.claims], "described": list(self.described)}


def _names(claims: list[ClaimCheck]) -> str:
    texts = list(dict.fromkeys(c.text for c in claims))
    return texts[0] if len(texts) == 1 else ", ".join(texts[:-1]) + " or " + texts[-1]


def _drop_spans(answer: str, spans: list[tuple[int, int]]) -> str:
    keep, pos = [], 0
    for a, b in sorted(spans):
        keep.append(answer[pos:a])
        pos = max(pos, b)
    keep.append(answer[pos:])
    text = "".join(keep)
    text = re.sub(r"\s*,\s*(,\s*)+", ", ", text)
    text = re.sub(r"(?:^|\s)(?:and|then|while|with|as)\s*(?=[.,;]|$)", "", text)
    text = re.sub(r"^[\s,;.]+|[\s,;]+(?=[.!?]?$)", "", text).strip()
    text = re.sub(r"^(?:and|then|while|with|as|but|also|plus)\b[\s,]*", "", text, flags=re.I)  # a clause that followed a cut one
    text = re.sub(r"(?:[\s,]+(?:and|then|while|with|as|plus))?[\s,]+(?:a|an|the|some)(?=[.!?]?$)", "", text, flags=re.I)  # a cut-off mention
    text = re.sub(r"\s{2,}", " ", text)
    return text


def apply_policy(policy: str, answer: str, claims: list[ClaimCheck], verified: bool) -> Outcome:
    """The answer to return under ``policy``; ``original_answer`` is set only when it changed.

    - ``annotate``: unchanged, verdict attached; free-text mentions the verifier does not judge present are
      marked ``unconfirmed``;
    - ``abstain``: "I can't confirm hearing X." when a claim is judged absent, or is uncertain while
      the answer is a prior (neither the verifier nor the model's own hearing confirms it);
    - ``correct``: a presence 'yes' whose sound is judged absent becomes "No." (of alternatives, when all are absent);
      a presence 'no' whose sound is judged present (``missed``) becomes "Yes."; free text is checked strictly: a
      mention is kept only when judged present (the verifier's present threshold, or an uncertain score with an
      answer that depends on the audio), the others are cut, and an answer with nothing left becomes "I can't confirm hearing X." (an open
      question's cut answer is then the verifier's description: :func:`answered_from_verifier`). A presence answer's 'yes' changes
      only on a confident 'absent': an uncertain claim is evidence for neither answer.
    ``unverified`` answers are never changed.
    """
    if policy == "off":
        return Outcome(answer, None, "off", "skipped", [])
    for c in claims:
        c.unconfirmed = verified and c.source == "answer" and not c.denied and c.present is not True
    v = verdict(claims, verified)
    if v == "missed" and policy == "correct":
        return Outcome("Yes.", answer, policy, v, claims)
    if v == "missed":
        return Outcome(answer, None, policy, v, claims)
    claims_present = [c for c in claims if not c.denied]
    absent = [c for c in claims_present if c.present is False]
    unconfirmed = absent + [c for c in claims_present if c.present is None and c.prior]
    if policy == "abstain" and verified and unconfirmed:
        return Outcome(f"{ABSTAIN} {_names(unconfirmed)}.", answer, policy, v, claims, abstained=True)
    if policy in ("annotate", "abstain") or not verified:
        return Outcome(answer, None, policy, v, claims)
    # correct
    asked = [c for c in claims_present if c.source == "question"]
    if asked and (_any if any(c.either for c in asked) else _all)([c.present for c in asked]) is False:
        return Outcome("No.", answer, policy, v, claims)
    cut = [c for c in claims_present if c.unconfirmed]
    if not cut:
        return Outcome(answer, None, policy, v, claims)
    spans = [c.span for c in cut if c.span]
    rest = _drop_spans(answer, spans) if spans else answer
    if not re.search(r"[A-Za-z]{3,}", rest):
        return Outcome(f"{ABSTAIN} {_names(cut)}.", answer, policy, v, claims, abstained=True)
    if rest[-1] not in ".!?":
        rest += "."
    rest = rest[0].upper() + rest[1:]
    return Outcome(rest, None if rest == answer else answer, policy, v, claims)


def silenced(claims: list[ClaimCheck]) -> list[ClaimCheck]:
    """Every claim on a silent clip judged absent: there is no sound for it to be about."""
    for c in claims:
        c.present, c.reason = False, "digital_silence"
    return claims


def answered_from_verifier(outcome: Outcome, description: str, named: tuple[str, ...]) -> Outcome:
    """``correct`` on an open question whose answer was unparsed or cut: the verifier's description of what it hears
    (:func:`models.verifier.events.describe`, which says where it came from; ``named``: the classes it names) in place of
    the answer; the model's own answer stays in ``original_answer``, the claims and verdict as judged."""
    original = outcome.original_answer if outcome.original_answer is not None else outcome.answer
    return Outcome(description, original, outcome.policy, outcome.verdict, outcome.claims, described=named)
