"""The ingress side of the guard: the verifier's call beside the model's, then the judgement, made once here.

:meth:`GuardRunner.plan` says, before the model is called, whether the clip is silent (judged without the verifier)
and whether the model should hand back its tower's layers (``shared``: the served model's audio tower is the
verifier's own frozen encoder, the same signature in both deployments' ``info()``, and the clip fills its window).
The ingress then sends the model its call and gives :meth:`GuardRunner.run` the answer to come; ``run`` sends the
verifier its call at once, beside generation (``assess``: the clip heard, a presence question's target scored), and
awaits both. On the shared path the verifier's call goes after the answer with the model's layers
(``assess_layers``: one encoder pass per request, the answer's mentions placed in the same call). A free-form
answer's mentions on the clip path are placed on the ontology after the answer (``place``: text only).

The verifier answers typed values (:class:`models.verifier.assessment.Assessment`), never a judgement: each claim is
judged once, by :func:`judged`, from the verifier's probability and the model's audio contrast, and the policy applied.
Any verifier failure or timeout yields verdict ``unverified`` (and a failure metric), never an error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass

from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError

from models.answers import answers_the_question, classify, extract_claims, is_open_question
from models.questions import Asked, read_presence
from models.verifier.assessment import Assessment, EventScore
from models.verifier.text import Match
from serving.errors import ApiError
from serving.guard.client import VerifierClient
from serving.guard.policy import POLICIES, ClaimCheck, Outcome, Thresholds, answered_from_verifier, apply_policy, is_prior, judge, silenced

log = logging.getLogger("earwitness.guard")


@dataclass(frozen=True)
class Plan:
    """What the guard needs of a clip before the model is called."""

    silent: bool  # the clip holds no sound: every claim is judged absent without the verifier
    shared: bool  # the model hands back its tower's layers, which the verifier scores after the answer


@dataclass
class Pending:
    response: object | None  # the verifier's call in flight: assess(), or assess_layers() once the model has answered
    started: float
    asked: Asked | None  # the sounds a presence question asks about
    samples: object | None = None  # the clip, while the verifier waits for the model's tower layers (shared encoder)
    silent: bool = False  # the clip holds no sound (digital silence): every claim is judged absent without the verifier
    prepared: object | None = None  # prepare() in flight: a fused verifier's clip-only members hearing the clip beside generation


@dataclass(frozen=True)
class Heard:
    """One answered clip: the model's generation, the guard's outcome, and their stage times (seconds)."""

    generation: object
    outcome: Outcome
    model_s: float
    guard_s: float | None  # None when the guard is off


_UNKNOWN = object()


def failure_reason(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout"
    if isinstance(exc, BackPressureError):
        return "overloaded"
    if isinstance(exc, RayActorError) or type(exc).__name__ in ("ActorDiedError", "ActorUnavailableError", "DeploymentUnavailableError"):
        return "unavailable"
    return "error"


def answer_contrast(generation) -> float | None:
    real, blank = getattr(generation, "answer_logprob", None), getattr(generation, "blank_logprob", None)
    if real is None or blank is None:
        return None
    return float(real) - float(blank)


def mention_contrast(generation) -> float | None:
    """The contrast a free-text mention is judged with: the answer's, per token. Summed over a caption's tokens the
    contrast grows with its length (a caption is far likelier with any audio than on silence), so it would vouch for
    every sound the caption names; per token it stands for an answer that depends on the audio throughout, and for a
    one-word 'yes' it is the whole contrast."""
    contrast = answer_contrast(generation)
    return None if contrast is None else contrast / max(1, int(getattr(generation, "num_tokens", 1) or 1))


def claim_checks(question: str, answer: str, contrast: float | None, asked: Asked | None) -> list[ClaimCheck]:
    """What an answer claims, to be checked: each sound it says is there, or, for a 'No' to a presence question
    (``asked``), the absence of the sounds it asks about (``denied``: ``missed`` when the verifier hears one)."""
    checks = [ClaimCheck(event=c.text, text=c.text, source=c.source, contrast=contrast, span=c.span, either=c.either)
              for c in extract_claims(question, answer)]
    if not checks and asked and classify(answer) == "no":
        checks = [ClaimCheck(event=t, text=t, source="question", denied=True, either=asked.any_of) for t in asked.targets]
    return checks


def place(check: ClaimCheck, where: EventScore | Match | None) -> None:
    """Where the verifier put a claim: its class (else the claim's own text), nearest class, similarity and reason."""
    check.event = (where.event if where else None) or check.text
    check.nearest, check.reason = (where.nearest, where.reason) if where else (None, None)
    check.similarity = where.similarity if where else None


def judged(checks: list[ClaimCheck], assessment: Assessment, placed: list[Match], t: Thresholds,
           per_token: float | None = None) -> list[ClaimCheck]:
    """Each claim placed and judged, once: a presence question's target by its scored event, an answer's mention by
    its class's probability (a mention that names no known sound is not a sound claim) and the answer's contrast per
    token (:func:`mention_contrast`); one claim per class."""
    targets = {e.text: e for e in assessment.targets}
    matches = {m.text: m for m in placed}
    out: list[ClaimCheck] = []
    seen: set[str] = set()
    for c in checks:
        if c.source == "question":
            ev = targets.get(c.text)
            place(c, ev)
            if ev is not None:  # 4 decimals, as the API reports the verifier's numbers
                c.verifier_score, c.similarity = round(ev.probability, 4), round(ev.similarity, 4)
        else:
            m = matches.get(c.text)
            if m is None or m.event is None:
                continue
            place(c, m)
            c.verifier_score = assessment.probabilities.get(c.event)
        if c.event in seen:
            continue
        seen.add(c.event)
        c.present = judge(c.verifier_score, per_token if c.source == "answer" else c.contrast, t, c.reason)
        c.prior = is_prior(c.contrast, t)
        out.append(c)
    return out


class GuardRunner:
    def __init__(self, verifier, settings, metrics):
        # a handle (or InProcess) → typed calls; a client already typed (another service's) as it is
        self.verifier = verifier if verifier is None or isinstance(verifier, VerifierClient) else VerifierClient(verifier)
        self.settings, self.metrics = settings, metrics
        self._verifier_tower = _UNKNOWN  # its info()'s tower signature, asked once
        self._verifier_hears_clip = False  # its info(): a call with the layers also carries the clip

    async def plan(self, clip, policy: str, model_info: dict) -> Plan:
        """Asked before the model's call: silence (a pass over the samples: once), and whether the model should return
        its tower's layers for the verifier (a shared encoder on a full window)."""
        silent = clip.silent
        shared = policy != "off" and not silent and await self._shares_encoder(model_info, len(clip.samples))
        return Plan(silent, shared)

    async def run(self, clip, question: str, policy: str, answer: Awaitable, plan: Plan | None = None) -> Heard:
        """The model's ``answer`` to a decoded clip (already sent: the longer call is never queued behind the
        verifier's), judged under ``policy``. The verifier's call leaves now, beside generation, and is cancelled if
        the model's fails. ``plan``: :meth:`plan`'s, when the model was asked for its layers."""
        plan = plan or Plan(clip.silent, False)
        start = time.perf_counter()
        pending = self._start(clip.samples, question, policy, plan.shared, plan.silent)
        try:
            generation = await answer
        except BaseException:
            self.cancel(pending)
            raise
        done = time.perf_counter()
        outcome = await self._finish(pending, question, generation, policy)
        outcome.unparsed = not answers_the_question(question, outcome.answer)
        if policy == "correct" and not plan.silent and is_open_question(question) and (outcome.unparsed or outcome.overridden):
            outcome = await self._describe(clip, outcome)
        return Heard(generation, outcome, done - start, time.perf_counter() - done if policy != "off" else None)

    async def _describe(self, clip, outcome: Outcome) -> Outcome:
        """An open question's unparsed or cut answer, replaced by the verifier's description of the clip (its events).
        Should the verifier fail, or be missing, the outcome stays as it was."""
        if self.verifier is None:
            return outcome
        try:
            report = await asyncio.wait_for(self.verifier.events(clip.samples), self.settings.verifier_timeout_s)
        except Exception as exc:  # noqa: BLE001 - the answer still goes out, undescribed
            self.metrics.verifier_failures.labels(failure_reason(exc)).inc()
            log.warning("verifier events %s: the answer is not described", failure_reason(exc))
            return outcome
        for d in report.detections:
            self.metrics.events_detected.labels(d.vocabulary).inc()
        return answered_from_verifier(outcome, report.describe(), report.named())

    async def _shares_encoder(self, model_info: dict, n_samples: int) -> bool:
        """Whether the model should hand the verifier its tower's layers on this clip: both name the same
        frozen tower, and the clip fills the model's window (``max_audio_s``). A shorter clip keeps the overlapped
        clip path: the model's tower masks the padding the encoder alone attends to, so its layers are other numbers.

        The verifier's signature is asked on the first such request (again after an ask that failed,
        which leaves that request on the clip path)."""
        tower = model_info.get("tower")
        if tower is None or self.verifier is None or not self.settings.guard_share_encoder:
            return False
        if n_samples < model_info["max_audio_s"] * model_info["sample_rate"]:
            return False
        if self._verifier_tower is _UNKNOWN:
            try:
                info = await asyncio.wait_for(self.verifier.info(), self.settings.verifier_timeout_s)
            except Exception as exc:  # noqa: BLE001 - the clip path still works
                log.warning("verifier info unavailable (%s): it encodes the clip itself", failure_reason(exc))
                return False
            self._verifier_tower, self._verifier_hears_clip = info.get("tower"), bool(info.get("hears_clip"))
            log.info("encoder %s: model %s, verifier %s", "shared" if tower == self._verifier_tower else "not shared", tower, self._verifier_tower)
        return tower == self._verifier_tower

    def policy_for(self, requested: str | None, model_info: dict) -> str:
        """The policy a request runs under: its own ``guard``, else the server's ``guard_policy`` when one is set,
        else the served model's default (its registry entry's ``guard_policy``, in ``model_info``)."""
        policy = (requested or self.settings.guard_policy or model_info.get("guard_policy") or "annotate").strip().lower()
        if policy not in POLICIES:
            raise ApiError(422, "invalid_request", f"guard: must be one of {', '.join(POLICIES)}", param="guard")
        return policy

    def _start(self, samples, question: str, policy: str, shared: bool = False, silent: bool = False) -> Pending:
        """The verifier's call on the clip, beside the model's; ``shared``: none yet (``_finish`` sends the model's layers);
        ``silent``: none at all (silence is its own evidence)."""
        if policy == "off" or self.verifier is None:
            return Pending(None, time.perf_counter(), None)
        asked = read_presence(question)
        if silent:
            return Pending(None, time.perf_counter(), asked, silent=True)
        if shared:  # a verifier that also hears the clip itself (fused) starts on it now, beside generation
            prepared = self._send(self.verifier.prepare, samples) if self._verifier_hears_clip else None
            return Pending(None, time.perf_counter(), asked, samples, prepared=prepared)
        return Pending(self._send(self.verifier.assess, samples, list(asked.targets) if asked else []), time.perf_counter(), asked)

    @staticmethod
    def _send(call, *args):
        try:
            return call(*args)
        except Exception as exc:  # a handle that cannot even send: judged at finish
            log.warning("verifier call failed to start: %s", type(exc).__name__)
            return exc

    def _send_shared(self, pending: Pending, generation, mentions: list[str]) -> None:
        """The shared encoder's verifier call, now that the model answered: its layers (the answer's mentions placed in
        the same call), or the clip when it sent none."""
        layers, texts = getattr(generation, "tower_layers", None), list(pending.asked.targets) if pending.asked else []
        if layers is not None:
            clip = pending.samples if self._verifier_hears_clip else None
            pending.response = self._send(self.verifier.assess_layers, layers, len(pending.samples), texts, mentions, clip)
        else:
            pending.response = self._send(self.verifier.assess, pending.samples, texts)
        pending.started, pending.samples = time.perf_counter(), None

    def _remaining(self, pending: Pending) -> float:
        return max(0.01, self.settings.verifier_timeout_s - (time.perf_counter() - pending.started))

    async def _await(self, pending: Pending, response):
        if isinstance(response, BaseException):
            raise response
        try:
            return await asyncio.wait_for(response, self._remaining(pending))
        except asyncio.TimeoutError:
            try:
                response.cancel()
            except Exception:  # cancelling is best-effort
                pass
            raise

    async def _finish(self, pending: Pending, question: str, generation, policy: str) -> Outcome:
        """The outcome under ``policy``; whatever goes wrong in the guard, the answer goes out (unverified)."""
        try:
            return await self._judge(pending, question, generation, policy)
        except Exception:  # never a 500 because of the guard
            log.exception("guard failed; answering unverified")
            self.cancel(pending)
            self.metrics.verifier_failures.labels("error").inc()
            return self._count(apply_policy(policy, generation.text, [], False) if policy != "off" else apply_policy("off", generation.text, [], True))

    async def _judge(self, pending: Pending, question: str, generation, policy: str) -> Outcome:
        answer = generation.text
        if policy == "off":
            self.cancel(pending)
            return apply_policy("off", answer, [], True)
        checks = claim_checks(question, answer, answer_contrast(generation), pending.asked)
        if not checks:
            self.cancel(pending)
            return self._count(apply_policy(policy, answer, [], True))
        if pending.silent:
            return self._count(apply_policy(policy, answer, silenced(checks), True))
        mentions = [c.text for c in checks if c.source == "answer"]
        if pending.samples is not None:
            self._send_shared(pending, generation, mentions)
        if pending.response is None:
            self.metrics.verifier_failures.labels("disabled").inc()
            return self._count(apply_policy(policy, answer, checks, False))
        try:
            assessment: Assessment = await self._await(pending, pending.response)
            self.metrics.verifier_clips.labels("kept" if assessment.kept else "shared" if assessment.shared else "scored").inc()
            if assessment.kept:
                self.metrics.verifier_kept_hits.inc()
            placed = assessment.mentions
            if mentions and not assessment.shared:  # the clip path heard the clip before the answer existed
                placed = await self._await(pending, self.verifier.place(mentions))
        except Exception as exc:  # whatever went wrong, the answer still goes out, marked unverified
            reason = failure_reason(exc)
            self.metrics.verifier_failures.labels(reason).inc()
            log.warning("verifier %s: answering unverified", reason)
            return self._count(apply_policy(policy, answer, checks, False))
        t = Thresholds(assessment.absent_below, assessment.present_above, self.settings.guard_contrast_prior, self.settings.guard_contrast_heard)
        return self._count(apply_policy(policy, answer, judged(checks, assessment, placed, t, mention_contrast(generation)), True))

    def cancel(self, pending: Pending) -> None:
        for response in (pending.response, pending.prepared):
            if response is not None and not isinstance(response, BaseException):
                try:
                    response.cancel()
                except Exception:  # best-effort
                    pass

    def _count(self, outcome: Outcome) -> Outcome:
        self.metrics.guard_verdicts.labels(outcome.verdict).inc()
        if outcome.overridden:
            self.metrics.guard_overrides.labels(outcome.policy).inc()
        return outcome
