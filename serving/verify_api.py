"""The verifier alone (no language model): ``POST /v1/audio/verify`` and ``POST /v1/audio/events``.

verify: multipart ``file`` plus ``events`` (repeated fields, or one comma-separated field), optional
``truncate``; JSON: :class:`serving.schemas.VerifyRequest` with base64 ``audio``. Per phrase, its presence.

events: multipart ``file`` (optional ``truncate``) or JSON :class:`serving.schemas.EventsRequest`. Every class the
verifier hears, with its spans (:mod:`models.verifier.events`).
"""

from __future__ import annotations

import asyncio

from fastapi import Request

from serving import intake
from serving.errors import ApiError
from serving.guard.runner import failure_reason
from models.verifier.verifiers import SAMPLE_RATE
from serving.proxy import request_id
from serving.schemas import AudioInfo, DetectedEvent, EventsRequest, EventsResponse, VerifyRequest, VerifyResponse, audio_body

MAX_EVENT_CHARS = 200

VERIFY_BODY = audio_body(
    {"events": {"type": "array", "items": {"type": "string"}, "description": "repeated, or one comma-separated field"}},
    ["events"],
    VerifyRequest,
)
EVENTS_BODY = audio_body({}, [], EventsRequest)


def check_events(events: list[str]) -> list[str]:
    events = [intake.check_text(e, "events").strip() for e in events]
    if any(not e or len(e) > MAX_EVENT_CHARS for e in events):
        raise ApiError(422, "invalid_request", f"events: each must be 1-{MAX_EVENT_CHARS} characters", param="events")
    return events


async def verify(service, request: Request) -> VerifyResponse:
    """Decode the clip like the QA path does, then ask the verifier deployment; 503 when it can't answer."""
    data, fields = await intake.read_audio_body(request, VerifyRequest, "events", list_field="events", max_fields=80)
    events = check_events(fields.events)
    clip = await _decode(service, data, fields.truncate)
    result = await ask_verifier(service, service.guard.verifier.verify.remote(clip.samples, events))
    if result.get("kept"):
        service.metrics.verifier_kept_hits.inc()
    return VerifyResponse(
        verifier=result["verifier"],
        events=result["events"],
        absent_below=result["absent_below"],
        present_above=result["present_above"],
        audio=AudioInfo.from_clip(clip),
        request_id=request_id(request.headers),
    )


async def _decode(service, data: bytes, truncate: bool):
    """The clip as the verifier hears it; 503 first when no verifier is deployed."""
    if service.guard.verifier is None:
        raise ApiError(503, "verifier_unavailable", "no verifier is deployed here", {"Retry-After": "30"})
    return await intake.decode_upload(data, service.settings, SAMPLE_RATE, truncate=truncate)


async def ask_verifier(service, response):
    """A call to the verifier deployment, awaited within ``verifier_timeout_s``: a timeout, full queue or dead replica is
    a 503 with Retry-After (and a failure metric); an exception it raised is a bug, a 500."""
    try:
        return await asyncio.wait_for(response, service.settings.verifier_timeout_s)
    except Exception as exc:
        reason = failure_reason(exc)
        service.metrics.verifier_failures.labels(reason).inc()
        if reason == "error":  # the verifier raised on this request: its input was checked above, so a bug (500), no outage
            raise
        if reason == "timeout":  # a live verifier that can't keep up is overloaded: the client retries, as on a full queue
            response.cancel()
        why = f"is busy (no answer within {service.settings.verifier_timeout_s:g} s)" if reason == "timeout" else f"failed ({reason})"
        raise ApiError(503, "verifier_unavailable", f"the verifier {why}; retry shortly", {"Retry-After": "2"}) from exc


async def events(service, request: Request) -> EventsResponse:
    """Decode the clip like the QA path does, then ask the verifier deployment for its detections (a typed
    :class:`models.verifier.events.EventReport`)."""
    data, fields = await intake.read_audio_body(request, EventsRequest, "optional truncate")
    clip = await _decode(service, data, fields.truncate)
    report = await service.events(clip)
    return EventsResponse(
        verifier=report.verifier,
        events=[DetectedEvent(**d.to_dict()) for d in report.detections],
        description=report.describe(),
        thresholds={k: round(v, 4) for k, v in report.thresholds.items()},
        audio=AudioInfo.from_clip(clip),
        request_id=request_id(request.headers),
    )
