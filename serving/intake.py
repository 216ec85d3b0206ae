"""Every endpoint's intake, written once: a request body (multipart or JSON with base64 audio) into audio bytes
plus validated fields, and those bytes into a decoded clip within the configured size and duration.

``read_audio_body`` → ``decode_upload``: the QA, verify and (for its decode step) chat endpoints each call these
two and nothing else to get from HTTP to a clip; what fails is a 4xx :class:`~serving.errors.ApiError` whose
``param`` names the field at fault (the decoder's :class:`~models.audio.AudioError` becomes one here).

A JSON body is read as an object of bounded depth holding only valid text (:func:`json_object`), or a named 4xx.

Decoding itself (bytes in any supported container → validated mono float32 at the model's rate) is
:func:`models.audio.decode`, shared with the corpus build.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from models.audio import AudioError, Clip, decode
from serving.config import Settings
from serving.errors import ApiError
from serving.middleware import too_large

M = TypeVar("M", bound=BaseModel)


# --- the request's body and fields ---------------------------------------------------------------------


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


# The deepest JSON body accepted: a chat request is 6 levels deep; Python's parser recurses per level.
MAX_JSON_DEPTH = 32
# A UTF-16 surrogate is no character: JSON's "\ud800" escape parses into one, and no tokenizer takes it.
_SURROGATE = re.compile("[\ud800-\udfff]")


async def json_object(request) -> dict:
    """The request's JSON body, which must be an object; 400 / 422 otherwise."""
    try:
        body = await request.json()
    except ValueError as exc:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from exc
    except RecursionError:
        raise _too_deep() from None
    if not isinstance(body, dict):
        raise ApiError(422, "invalid_request", "the JSON body must be an object")
    check_json(body)
    return body


def _too_deep() -> ApiError:
    return ApiError(400, "invalid_json", f"the JSON body is nested deeper than {MAX_JSON_DEPTH} levels")


def check_json(value: object) -> None:
    """400 ``invalid_json`` past :data:`MAX_JSON_DEPTH` levels; 422 ``invalid_text`` for a lone surrogate in
    any string or key (walked iteratively: a deep body cannot exhaust the stack here)."""
    stack: list[tuple[object, int, str]] = [(value, 1, "")]
    while stack:
        item, depth, path = stack.pop()
        if isinstance(item, str):
            check_text(item, path or None)
            continue
        if not isinstance(item, (dict, list)):
            continue
        if depth > MAX_JSON_DEPTH:
            raise _too_deep()
        pairs = item.items() if isinstance(item, dict) else enumerate(item)
        for key, child in pairs:
            where = f"{path}.{key}" if path else str(key)
            if isinstance(key, str):
                check_text(key, where)
            stack.append((child, depth + 1, where))


def check_text(text: str, param: str | None = None) -> str:
    """``text`` itself, or 422 ``invalid_text`` when it holds an unpaired UTF-16 surrogate (not a character)."""
    if _SURROGATE.search(text):
        raise ApiError(422, "invalid_text", f"{param or 'a string'} holds an unpaired UTF-16 surrogate, which is not text", param=param)
    return text


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


# --- the audio: decoded off the event loop, a failure as the API's error -------------------------------------

# A PCM WAV up to this size decodes in about a millisecond (a copy and a few checks): cheaper on the
# event loop than a hand-off to a worker thread. Compressed formats always go to a thread.
INLINE_WAV_BYTES = 1 << 20


async def decode_async(data: bytes, target_sample_rate: int, max_duration_s: float | None = None, truncate: bool = False) -> Clip:
    """:func:`~models.audio.decode` for request handlers: small PCM WAVs inline, anything else off the event loop;
    unusable audio is the API's 4xx."""
    try:
        if len(data) <= INLINE_WAV_BYTES and data[:4] == b"RIFF" and data[8:12] == b"WAVE":
            return decode(data, target_sample_rate, max_duration_s, truncate)
        return await asyncio.to_thread(decode, data, target_sample_rate, max_duration_s, truncate)
    except AudioError as exc:
        raise ApiError(exc.status, exc.code, exc.message) from exc


async def decode_upload(data: bytes, settings: Settings, sample_rate: int, max_audio_s: float | None = None, truncate: bool = False) -> Clip:
    """The upload's size checked, then decoded to mono ``sample_rate`` float32 within the duration limit (the
    settings', or the model's window when shorter)."""
    if len(data) > settings.max_upload_bytes:
        raise too_large(settings.max_upload_bytes)
    limit_s = settings.max_audio_s if max_audio_s is None else min(settings.max_audio_s, max_audio_s)
    return await decode_async(data, sample_rate, limit_s, truncate)
