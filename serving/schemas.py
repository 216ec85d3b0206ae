"""The HTTP edge's request and response shapes (pydantic), shared with the OpenAPI docs."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class QARequest(BaseModel):
    """JSON form of ``POST /v1/audio/qa``; the multipart form takes the same fields with ``file``."""

    audio: str = Field(..., description="the clip's bytes (WAV, FLAC, OGG/Vorbis or MP3), base64-encoded")
    question: str = Field(..., description="a question about the clip")
    max_tokens: int | None = Field(None, ge=1, description="most tokens to generate")
    truncate: bool = Field(False, description="cut audio longer than the limit instead of refusing it")
    model: str | None = Field(None, description="served model or adapter name (default: the served default)")


class AudioInfo(BaseModel):
    duration_s: float
    sample_rate: int
    source_format: str
    source_sample_rate: int
    channels: int
    flags: list[str] = Field(default_factory=list, description="digital_silence, truncated")


class Timing(BaseModel):
    decode_ms: float
    model_ms: float
    total_ms: float


class QAResponse(BaseModel):
    answer: str
    answer_kind: Literal["yes", "no", "other"] = Field(..., description="the answer read as yes / no / other")
    model: str
    audio: AudioInfo
    timing: Timing
    request_id: str


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    owned_by: str = "earwitness"
    family: str
    max_audio_s: float
    sample_rate: int
    adapter: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: str
    detail: str | None = None
