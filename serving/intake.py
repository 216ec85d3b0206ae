"""Every endpoint's intake, written once: a request body (multipart or JSON with base64 audio) into audio bytes
plus validated fields, and those bytes into a decoded clip within the configured size and duration.

``read_audio_body`` → ``decode_upload``: the QA, verify and (for its decode step) chat endpoints each call these
two and nothing else to get from HTTP to a clip; what fails is a 4xx :class:`~serving.errors.ApiError` whose
``param`` names the field at fault.

A JSON body is read as an object of bounded depth holding only valid text (:func:`json_object`), or a named 4xx.

Decoding (:func:`decode`: bytes in any supported container → validated mono float32 at the model's rate) trusts
the bytes, never the file name or content type: libsndfile sniffs the container, so a renamed or lying file is
judged by what it really holds.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import re
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import soundfile as sf
import soxr
from fastapi import Request
from pydantic import BaseModel, ValidationError

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


# --- the audio: decoded, checked, converted ------------------------------------------------------------

SUPPORTED_FORMATS = ("WAV", "FLAC", "OGG", "MP3")
MIN_SAMPLE_RATE = 1_000
MAX_SAMPLE_RATE = 384_000
MAX_CHANNELS = 8  # 7.1 surround; more is refused (422 too_many_channels) before a frame is decoded
# Shorter clips are padded with trailing silence to this length (flag "padded"): Qwen2-Audio's encoder
# needs a few mel frames (earwitness-tiny fails at 0.24 s), and every clip of a batch then has audio tokens.
MIN_AUDIO_S = 0.5
# Float formats may exceed full scale a little; a sample past this is no recording (3.4e38 overflows a
# float32 mean and turns into NaN in the resampler), so it is refused as invalid_samples.
MAX_ABS_SAMPLE = 1_000.0
# A clip whose peak stays below -80 dBFS (about 3 LSB of 16-bit audio) holds no sound a claim could be about:
# the guard judges every claimed sound absent there (``Clip.silent``).
SILENCE_PEAK = 1e-4


@dataclass(frozen=True)
class Clip:
    """Decoded audio ready for a model: mono float32 samples at ``sample_rate``."""

    samples: np.ndarray
    sample_rate: int
    source_format: str
    source_sample_rate: int
    source_channels: int
    flags: tuple[str, ...] = field(default=())

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.sample_rate

    @property
    def silent(self) -> bool:
        """Digital silence, or a peak below :data:`SILENCE_PEAK`: evidence that no claimed sound is there."""
        return "digital_silence" in self.flags or not len(self.samples) or float(np.max(np.abs(self.samples))) < SILENCE_PEAK


def _audio_error(status: int, code: str, message: str) -> ApiError:
    return ApiError(status, code, message)


def _open(data: bytes) -> sf.SoundFile:
    if not data:
        raise _audio_error(400, "empty_audio", "the audio file is empty (0 bytes)")
    try:
        handle = sf.SoundFile(io.BytesIO(data))
    except sf.LibsndfileError as exc:
        raise _audio_error(
            415,
            "unsupported_audio_format",
            f"could not recognise the audio container ({exc.error_string}); "
            f"supported: {', '.join(SUPPORTED_FORMATS)}",
        ) from exc
    except (RuntimeError, ValueError, TypeError) as exc:
        raise _audio_error(415, "unsupported_audio_format", f"could not open the audio: {exc}") from exc
    if handle.format not in SUPPORTED_FORMATS:
        handle.close()
        raise _audio_error(
            415,
            "unsupported_audio_format",
            f"{handle.format} audio is not accepted; supported: {', '.join(SUPPORTED_FORMATS)}",
        )
    return handle


def decode(
    data: bytes,
    target_sample_rate: int,
    max_duration_s: float | None = None,
    truncate: bool = False,
) -> Clip:
    """Decode, check and convert ``data``; raise :class:`ApiError` (4xx) for anything unusable.

    Whatever a decoder raises on hostile bytes is the upload's fault: it is a 400 ``corrupt_audio``.
    """
    try:
        return _decode(data, target_sample_rate, max_duration_s, truncate)
    except ApiError:
        raise
    except Exception as exc:  # noqa: BLE001 - libsndfile/mpg123/soxr on damaged input: never a 500
        raise _audio_error(400, "corrupt_audio", f"the audio could not be decoded ({type(exc).__name__})") from exc


def _decode(data: bytes, target_sample_rate: int, max_duration_s: float | None, truncate: bool) -> Clip:
    with _open(data) as handle:
        fmt, sr, channels = handle.format, handle.samplerate, handle.channels
        if not MIN_SAMPLE_RATE <= sr <= MAX_SAMPLE_RATE:
            raise _audio_error(422, "invalid_sample_rate", f"sample rate {sr} Hz is outside {MIN_SAMPLE_RATE}–{MAX_SAMPLE_RATE} Hz")
        if not 1 <= channels <= MAX_CHANNELS:
            raise _audio_error(422, "too_many_channels", f"the audio has {channels} channels; at most {MAX_CHANNELS} are accepted")
        declared = _declared_frames(data, handle)
        limit = None
        if max_duration_s is not None:
            limit = int(max_duration_s * sr)
            if declared is not None and declared > limit and not truncate:
                raise _too_long(declared / sr, max_duration_s)
        try:
            # Read at most one frame past the limit so a file whose header lies about its
            # length cannot make us decode (and buffer) an unbounded stream.
            frames = -1 if limit is None else limit + 1
            samples = handle.read(frames=frames, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError, ValueError) as exc:
            raise _audio_error(400, "corrupt_audio", f"the {fmt} stream is corrupt or truncated: {exc}") from exc
    expected = declared if declared is None or limit is None else min(declared, limit + 1)
    if expected is not None and fmt in _EXACT_LENGTH and len(samples) < expected:
        raise _audio_error(
            400,
            "corrupt_audio",
            f"the {fmt} file is truncated: its header declares {expected} frames but only {len(samples)} decode",
        )
    if limit is not None and len(samples) > limit:
        if not truncate:
            raise _too_long(len(samples) / sr, max_duration_s)
        samples = samples[:limit]
    return _finish(samples, sr, fmt, channels, target_sample_rate, truncated=truncate and declared is not None and declared > len(samples))


# Formats whose declared length is exact enough to call a shortfall truncation. MP3's is an
# estimate from headers and bitrate: real encoder output often decodes 2–12% short of it, so an
# MP3 is accepted for what decodes (a damaged frame still raises).
_EXACT_LENGTH = frozenset({"WAV", "FLAC", "OGG"})


def _declared_frames(data: bytes, handle: sf.SoundFile) -> int | None:
    """Frames the container promises, so a cut-off upload is caught rather than half-heard.

    libsndfile silently shrinks a WAV's frame count to the bytes present, so for WAV the
    RIFF ``data`` chunk size is read directly.
    """
    if handle.format == "WAV":
        return _riff_data_frames(data, handle)
    return handle.frames if handle.frames > 0 else None


def _riff_data_frames(data: bytes, handle: sf.SoundFile) -> int | None:
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    pos, block_align = 12, None
    while pos + 8 <= len(data):
        chunk, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        if chunk == b"fmt " and pos + 22 <= len(data):
            block_align = int.from_bytes(data[pos + 20 : pos + 22], "little")
        if chunk == b"data":
            if size in (0, 0xFFFFFFFF) or not block_align:  # streaming writers leave the size open
                return None
            return size // block_align
        pos += 8 + size + (size & 1)
    return None


def _too_long(duration_s: float, max_duration_s: float | None) -> ApiError:
    return _audio_error(
        413,
        "audio_too_long",
        f"the audio lasts {duration_s:.1f} s, over the {max_duration_s:g} s limit; "
        "send a shorter clip or ask for truncation (truncate=true)",
    )


def _finish(samples: np.ndarray, sr: int, fmt: str, channels: int, target_sr: int, truncated: bool) -> Clip:
    if samples.size == 0:
        raise _audio_error(400, "empty_audio", f"the {fmt} file holds no decodable audio frames (empty or truncated)")
    _check_samples(samples, "the audio")
    mono = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    if sr != target_sr:
        mono = soxr.resample(mono, sr, target_sr, quality="HQ").astype(np.float32, copy=False)
        _check_samples(mono, "the resampled audio")  # what the model gets is checked, not only what came in
    mono = np.clip(mono, -1.0, 1.0)
    flags: list[str] = []
    if not np.any(samples):
        flags.append("digital_silence")
    if truncated:
        flags.append("truncated")
    shortfall = int(MIN_AUDIO_S * target_sr) - len(mono)
    if shortfall > 0:
        mono = np.concatenate([mono, np.zeros(shortfall, np.float32)])
        flags.append("padded")
    return Clip(np.ascontiguousarray(mono), target_sr, fmt, sr, channels, tuple(flags))


def _check_samples(samples: np.ndarray, what: str) -> None:
    """422 ``invalid_samples`` for NaN/inf, or magnitudes no recording has (past :data:`MAX_ABS_SAMPLE`)."""
    if not np.isfinite(samples).all():
        raise _audio_error(422, "invalid_samples", f"{what} contains NaN or infinite samples")
    if samples.size and float(np.abs(samples).max()) > MAX_ABS_SAMPLE:
        raise _audio_error(422, "invalid_samples", f"{what} has samples past ±{MAX_ABS_SAMPLE:g} (full scale is ±1)")


# A PCM WAV up to this size decodes in about a millisecond (a copy and a few checks): cheaper on the
# event loop than a hand-off to a worker thread. Compressed formats always go to a thread.
INLINE_WAV_BYTES = 1 << 20


async def decode_async(data: bytes, target_sample_rate: int, max_duration_s: float | None = None, truncate: bool = False) -> Clip:
    """:func:`decode` for request handlers: small PCM WAVs inline, anything else off the event loop."""
    if len(data) <= INLINE_WAV_BYTES and data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return decode(data, target_sample_rate, max_duration_s, truncate)
    return await asyncio.to_thread(decode, data, target_sample_rate, max_duration_s, truncate)


async def decode_upload(data: bytes, settings: Settings, sample_rate: int, max_audio_s: float | None = None, truncate: bool = False) -> Clip:
    """The upload's size checked, then decoded to mono ``sample_rate`` float32 within the duration limit (the
    settings', or the model's window when shorter)."""
    if len(data) > settings.max_upload_bytes:
        raise too_large(settings.max_upload_bytes)
    limit_s = settings.max_audio_s if max_audio_s is None else min(settings.max_audio_s, max_audio_s)
    return await decode_async(data, sample_rate, limit_s, truncate)
