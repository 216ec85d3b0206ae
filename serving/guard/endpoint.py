"""``POST /v1/audio/verify``: per-event presence scores from the verifier alone (no language model).

Multipart: ``file`` plus ``events`` (repeated fields, or one comma-separated field), optional
``truncate``. JSON: :class:`serving.schemas.VerifyRequest` with base64 ``audio``.
"""

from __future__ import annotations

import asyncio

from fastapi import Request
from pydantic import ValidationError

from serving import audio as intake
from serving.errors import ApiError
from serving.limits import check_text, json_object
from serving.proxy import request_id
from serving.schemas import AudioInfo, VerifyRequest, VerifyResponse, audio_body

MAX_EVENT_CHARS = 200

VERIFY_BODY = audio_body(
    {"events": {"type": "array", "items": {"type": "string"}, "description": "repeated, or one comma-separated field"}},
    ["events"],
    VerifyRequest,
)


def _validate(fields: dict) -> VerifyRequest:
    from serving.ingress import _describe

    try:
        return VerifyRequest.model_validate(fields)
    except ValidationError as exc:
        raise ApiError(422, "invalid_request", _describe(exc.errors())) from exc


async def read_verify(request: Request) -> tuple[bytes, VerifyRequest]:
    from serving.ingress import _b64

    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith("multipart/form-data"):
        form = await request.form(max_files=1, max_fields=80)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise ApiError(422, "missing_audio", "the form needs a 'file' field holding the audio")
        events = [e.strip() for v in form.getlist("events") if isinstance(v, str) for e in v.split(",") if e.strip()]
        fields = {"audio": "", "events": events}
        if isinstance(form.get("truncate"), str):
            fields["truncate"] = form.get("truncate")
        return await upload.read(), _validate(fields)
    if content_type.startswith("application/json"):
        parsed = _validate(await json_object(request))
        return _b64(parsed.audio), parsed
    raise ApiError(415, "unsupported_media_type", "send multipart/form-data (file + events) or application/json (base64 audio)")


async def verify(service, request: Request) -> VerifyResponse:
    """Decode the clip like the QA path does, then ask the verifier deployment; 503/504 when it can't answer."""
    from serving.guard.runner import failure_reason

    data, fields = await read_verify(request)
    events = [check_text(e, "events").strip() for e in fields.events]
    if any(not e or len(e) > MAX_EVENT_CHARS for e in events):
        raise ApiError(422, "invalid_request", f"events: each must be 1-{MAX_EVENT_CHARS} characters")
    if service.guard.verifier is None:
        raise ApiError(503, "verifier_unavailable", "no verifier is deployed here", {"Retry-After": "30"})
    if len(data) > service.settings.max_upload_bytes:
        from serving.limits import too_large

        raise too_large(service.settings.max_upload_bytes)
    limit_s = service.settings.max_audio_s
    clip = await intake.decode_async(data, 16_000, limit_s, fields.truncate)
    response = service.guard.verifier.verify.remote(clip.samples, events)
    try:
        result = await asyncio.wait_for(response, service.settings.verifier_timeout_s)
    except Exception as exc:
        reason = failure_reason(exc)
        service.metrics.verifier_failures.labels(reason).inc()
        if reason == "error":  # the verifier raised on this request: its input was checked above, so a bug (500), no outage
            raise
        if reason == "timeout":  # a live verifier that can't keep up is overloaded: the client retries, as on a full queue
            response.cancel()
        why = f"is busy (no answer within {service.settings.verifier_timeout_s:g} s)" if reason == "timeout" else f"failed ({reason})"
        raise ApiError(503, "verifier_unavailable", f"the verifier {why}; retry shortly", {"Retry-After": "2"}) from exc
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

