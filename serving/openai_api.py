"""OpenAI-compatible ``POST /v1/chat/completions`` for audio questions.

A request is a chat: the user's message holds one audio part and text parts (the question).

* audio: ``{"type": "input_audio", "input_audio": {"data": <base64>, "format": "wav"|"mp3"|"flac"|"ogg"}}``
  (OpenAI's shape), or ``{"type": "audio_url", "audio_url": {"url": ...}}`` (vLLM's): a ``data:`` URL is
  decoded, a remote URL is fetched only when it starts with a prefix in ``audio_url_allowlist`` (else 400
  ``audio_url_not_allowed``);
* question: the text parts of the last user message (a plain string content works too); system and
  earlier turns are not part of the prompt — the model's own chat template frames one question;
* ``model``: any id from ``GET /v1/models`` (base, default adapter, named adapters);
* ``max_tokens`` / ``max_completion_tokens``; decoding is greedy (``temperature``/``top_p`` are accepted
  and ignored, ``n`` must be 1); ``stream: true`` answers as server-sent events (one content chunk);
* extension ``earwitness``: ``{"guard": "off"|"annotate"|"abstain"|"correct", "truncate": bool, "events": bool}``;
  ``events``: also list the sounds the verifier hears, with their times (as ``POST /v1/audio/events``).

The response is a ``chat.completion`` plus an ``earwitness`` object: the guard's verdict and claims, the
model's original answer when the guard changed it, answer kind, audio facts and timing. Errors are
``{"error": {"message", "type", "param", "code"}}``, as OpenAI's clients expect.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serving import intake
from serving.errors import ApiError
from serving.middleware import too_large
from serving.schemas import AudioInfo, DetectedEvent, ErrorResponse, GuardInfo, Timing

AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg")
ENDPOINT = "/v1/chat/completions"


class EarwitnessOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    guard: Literal["off", "annotate", "abstain", "correct"] | None = None
    truncate: bool = False
    events: bool = Field(False, description="also list the sounds the verifier hears, with their times (POST /v1/audio/events)")


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields that greedy decoding ignores

    model: str | None = None
    messages: list[dict[str, Any]] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    temperature: float | None = None
    top_p: float | None = None
    earwitness: EarwitnessOptions | None = None


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: ChatMessage
    finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class EarwitnessResult(BaseModel):
    answer_kind: Literal["yes", "no", "other", "unparsed"]
    original_answer: str | None = None
    guard: GuardInfo | None = None
    audio: AudioInfo
    timing: Timing
    events: list[DetectedEvent] | None = Field(None, description="on request (earwitness.events): the verifier's detections")


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    earwitness: EarwitnessResult


def _invalid(message: str, param: str | None = None, code: str = "invalid_request") -> ApiError:
    return ApiError(400, code, message, param=param)


def parse_messages(messages: list[dict[str, Any]]) -> tuple[dict, str]:
    """The one audio part and the question text of a chat; raises :class:`ApiError` (400) otherwise."""
    audio_parts: list[tuple[int, dict]] = []
    last_user = None
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise _invalid("each message needs a 'role'", f"messages.{i}")
        if message["role"] != "user":
            continue
        last_user = i
        content = message.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or "type" not in part:
                    raise _invalid("each content part needs a 'type'", f"messages.{i}.content.{j}")
                if part["type"] in ("input_audio", "audio_url"):
                    audio_parts.append((i, part))
                elif part["type"] != "text":
                    raise _invalid(f"content part type {part['type']!r} is not supported (text, input_audio, audio_url)", f"messages.{i}.content.{j}.type")
        elif not isinstance(content, str):
            raise _invalid("'content' must be a string or a list of parts", f"messages.{i}.content")
    if last_user is None:
        raise _invalid("the chat has no user message", "messages")
    if not audio_parts:
        raise ApiError(400, "missing_audio", "a user message needs one 'input_audio' (or 'audio_url') part", param="messages")
    if len(audio_parts) > 1:
        raise _invalid("one audio part per request", "messages", code="too_many_audio_items")
    content = messages[last_user].get("content")
    if isinstance(content, str):
        question = content
    else:
        question = "\n".join(str(p.get("text", "")) for p in content if p.get("type") == "text")
    return audio_parts[0][1], question


def _fetch(url: str, limit: int, timeout_s: float) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "earwitness"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 - allowlisted by the caller
        data = response.read(limit + 1)
    if len(data) > limit:
        raise too_large(limit)
    return data


async def audio_bytes(part: dict, allowlist: list[str], limit: int, timeout_s: float = 10.0) -> bytes:
    """The raw bytes of an audio part: base64, a data: URL, or an allowlisted remote URL."""
    if part["type"] == "input_audio":
        body = part.get("input_audio")
        if not isinstance(body, dict):
            raise _invalid("'input_audio' must be an object with 'data' and 'format'", "input_audio")
        fmt = str(body.get("format", "wav")).lower()
        if fmt not in AUDIO_FORMATS:
            raise ApiError(400, "unsupported_audio_format", f"input_audio.format must be one of {', '.join(AUDIO_FORMATS)}", param="input_audio.format")
        return intake.b64(body.get("data"), "input_audio.data", missing_status=400)
    spec = part.get("audio_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str) or not url:
        raise _invalid("'audio_url' needs a 'url'", "audio_url.url")
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise _invalid("a data: URL must be base64-encoded", "audio_url.url")
        return intake.b64(payload, "audio_url.url", missing_status=400)
    if not url.startswith(("http://", "https://")) or not any(url.startswith(prefix) for prefix in allowlist):
        raise ApiError(400, "audio_url_not_allowed", "remote audio URLs are not fetched here; send the audio as input_audio (base64)", param="audio_url.url")
    try:
        return await asyncio.to_thread(_fetch, url, limit, timeout_s)
    except ApiError:
        raise
    except Exception as exc:  # noqa: BLE001 - any fetch failure is the client's URL's problem
        raise ApiError(400, "audio_url_unreachable", f"could not fetch the audio URL: {type(exc).__name__}", param="audio_url.url") from exc


async def chat_completion(service, request: Request):
    """Answer one OpenAI chat completion through the service's model, guard and metrics."""
    start = time.perf_counter()
    try:
        body = await intake.json_object(request)
    except ApiError as exc:  # OpenAI's clients expect every malformed body as a 400
        raise ApiError(400, exc.code, exc.message) from exc
    try:
        req = ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        raise intake.invalid(exc.errors()[:1], status=400) from exc
    if req.n != 1:
        raise _invalid("only n=1 is supported (decoding is greedy)", "n")
    part, question = parse_messages(req.messages)
    try:
        question = service.check_question(question)
    except ApiError as exc:
        raise ApiError(400, exc.code, exc.message, param="messages") from exc
    try:
        max_tokens = service.check_max_tokens(req.max_completion_tokens or req.max_tokens)
    except ApiError as exc:
        raise ApiError(400, exc.code, exc.message, param="max_tokens") from exc
    options = req.earwitness or EarwitnessOptions()
    model_id, info = await service.resolve_model(req.model)
    data = await audio_bytes(part, service.settings.audio_url_allowlist, service.settings.max_upload_bytes)
    clip = await intake.decode_upload(data, service.settings, info["sample_rate"], info["max_audio_s"], options.truncate)
    decoded = time.perf_counter()
    policy = service.guard.policy_for(options.guard, info)
    events = asyncio.ensure_future(service.events(clip)) if options.events else None  # beside the model's answer
    try:
        heard = await service.hear(ENDPOINT, clip, question, max_tokens, policy, model_id)
        report = await events if events is not None else None
    except BaseException:
        if events is not None:
            events.cancel()
        raise
    generation, outcome = heard.generation, heard.outcome
    answer = outcome.answer
    kind = outcome.kind
    service.observe(ENDPOINT, clip, kind, model_id, decoded - start)

    prompt_tokens = generation.prompt_tokens
    result = ChatCompletion(
        id=f"chatcmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=model_id,
        choices=[Choice(message=ChatMessage(content=answer), finish_reason="length" if generation.num_tokens >= max_tokens else "stop")],
        usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=generation.num_tokens, total_tokens=prompt_tokens + generation.num_tokens),
        earwitness=EarwitnessResult(
            answer_kind=kind,
            original_answer=outcome.original_answer,
            guard=GuardInfo(**outcome.guard_dict()),
            audio=AudioInfo.from_clip(clip),
            timing=Timing(
                decode_ms=round((decoded - start) * 1000, 2),
                model_ms=round(heard.model_s * 1000, 2),
                total_ms=round((time.perf_counter() - start) * 1000, 2),
                guard_ms=round(heard.guard_s * 1000, 2) if heard.guard_s is not None else None,
            ),
            events=[DetectedEvent(**d.to_dict()) for d in report.detections] if report is not None else None,
        ),
    )
    if req.stream:
        return StreamingResponse(_sse(result), media_type="text/event-stream")
    return result


def _sse(result: ChatCompletion):
    """The completion as OpenAI's stream: a role+content chunk, a finish chunk, then [DONE]."""
    base = {"id": result.id, "object": "chat.completion.chunk", "created": result.created, "model": result.model}
    choice = result.choices[0]
    first = {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": choice.message.content}, "finish_reason": None}]}
    last = {
        **base,
        "choices": [{"index": 0, "delta": {}, "finish_reason": choice.finish_reason}],
        "usage": result.usage.model_dump(),
        "earwitness": result.earwitness.model_dump(),
    }
    yield f"data: {json.dumps(first)}\n\n"
    yield f"data: {json.dumps(last)}\n\n"
    yield "data: [DONE]\n\n"


_CHAT_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": ChatCompletionRequest.model_json_schema()}},
    }
}


def register(app: FastAPI, service) -> None:
    """Add ``POST /v1/chat/completions`` to an ingress app."""

    @app.post(
        ENDPOINT,
        response_model=ChatCompletion,
        responses={code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 415, 503, 504)},
        openapi_extra=_CHAT_BODY,
        summary="OpenAI-compatible chat completion with input_audio parts",
    )
    async def chat_completions(request: Request):
        try:
            result = await chat_completion(service, request)
        except ApiError as exc:  # OpenAI's clients read every invalid request as a 400 (sizes stay 413)
            if exc.status in (415, 422):
                raise ApiError(400, exc.code, exc.message, exc.headers, exc.param) from exc
            raise
        if isinstance(result, StreamingResponse):
            return result
        return JSONResponse(result.model_dump())
