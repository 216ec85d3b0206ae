"""Every endpoint's intake, written once: a request body (multipart or JSON with base64 audio) into audio bytes
plus validated fields, and those bytes into a decoded clip within the configured size and duration.

``read_audio_body`` → ``decode``: the QA, verify and (for its decode step) chat endpoints each call these two
and nothing else to get from HTTP to a clip; what fails is a 4xx :class:`~serving.errors.ApiError` whose
``param`` names the field at fault.
"""

from __future__ import annotations

import base64
import binascii
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from serving import audio
from serving.config import Settings
from serving.errors import ApiError
from serving.limits import check_text, json_object, too_large

M = TypeVar("M", bound=BaseModel)


def describe(errors) -> str:
    """Pydantic's errors as one line a client can act on ("max_tokens: Input should be ...")."""
    parts = []
    for err in errors:
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
        parts.append(f"{where}: {err.get('msg')}")
    return "; ".join(parts)


def field_at_fault(errors) -> str | None:
    """The first error's field ("max_tokens", "messages.0.content"), for the error's ``param``."""
    for err in errors:
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        if where:
            return where
    return None


def invalid(errors, status: int = 422) -> ApiError:
    return ApiError(status, "invalid_request", describe(errors), param=field_at_fault(errors))


def validate(schema: type[M], fields: dict) -> M:
    try:
        return schema.model_validate(fields)
    except ValidationError as exc:
        raise invalid(exc.errors()) from exc


def b64(text: object, param: str = "audio", missing_status: int = 422) -> bytes:
    """Base64 audio; 400 ``invalid_base64`` when it is not, ``missing_status`` ``missing_audio`` when it is empty
    (OpenAI's clients expect every malformed chat as a 400)."""
    if not isinstance(text, str) or not text:
        raise ApiError(missing_status, "missing_audio", f"the '{param}' field is empty", param=param)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, "invalid_base64", f"'{param}' is not valid base64: {exc}", param=param) from exc


async def read_audio_body(request: Request, schema: type[M], fields_hint: str, list_field: str | None = None, max_fields: int = 8) -> tuple[bytes, M]:
    """``(audio bytes, fields)`` from multipart (``file`` + text fields) or JSON (base64 ``audio``).

    ``list_field`` is a multipart field that may repeat or hold a comma-separated list (verify's ``events``);
    ``fields_hint`` names the fields for the 415 message.
    """
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith("multipart/form-data"):
        form = await request.form(max_files=1, max_fields=max_fields)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise ApiError(422, "missing_audio", "the form needs a 'file' field holding the audio", param="file")
        fields: dict = {k: v for k, v in form.items() if k not in ("file", list_field) and isinstance(v, str)}
        if list_field is not None:
            fields[list_field] = [e.strip() for v in form.getlist(list_field) if isinstance(v, str) for e in v.split(",") if e.strip()]
        return await upload.read(), validate(schema, {**fields, "audio": ""})
    if content_type.startswith("application/json"):
        parsed = validate(schema, await json_object(request))
        return b64(parsed.audio), parsed
    raise ApiError(415, "unsupported_media_type", f"send multipart/form-data (file + {fields_hint}) or application/json (base64 audio)")


async def decode(data: bytes, settings: Settings, sample_rate: int, max_audio_s: float | None = None, truncate: bool = False) -> audio.Clip:
    """The upload's size checked, then decoded to mono ``sample_rate`` float32 within the duration limit (the
    settings', or the model's window when shorter)."""
    if len(data) > settings.max_upload_bytes:
        raise too_large(settings.max_upload_bytes)
    limit_s = settings.max_audio_s if max_audio_s is None else min(settings.max_audio_s, max_audio_s)
    return await audio.decode_async(data, sample_rate, limit_s, truncate)


def check_question(question: str, settings: Settings) -> str:
    """The question stripped; 422 when it is empty, too long or not text."""
    question = check_text(question, "question").strip()
    if not question:
        raise ApiError(422, "empty_question", "'question' is empty", param="question")
    if len(question) > settings.max_question_chars:
        raise ApiError(422, "question_too_long", f"'question' exceeds {settings.max_question_chars} characters", param="question")
    return question


def check_max_tokens(requested: int | None, settings: Settings) -> int:
    value = requested or settings.default_max_tokens
    if value > settings.max_tokens_limit:
        raise ApiError(422, "max_tokens_too_large", f"'max_tokens' may be at most {settings.max_tokens_limit}", param="max_tokens")
    return value
