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
    guard: Literal["off", "annotate", "abstain", "correct"] | None = Field(
        None, description="absent-sound guard policy for this request (default: the server's guard_policy when set, else the served model's default)"
    )


class AudioInfo(BaseModel):
    duration_s: float
    sample_rate: int
    source_format: str
    source_sample_rate: int
    channels: int
    flags: list[str] = Field(default_factory=list, description="digital_silence, truncated, padded (shorter than 0.5 s: trailing silence added)")

    @classmethod
    def from_clip(cls, clip) -> "AudioInfo":
        """What intake made of the upload (a :class:`models.audio.Clip`), as the API reports it."""
        return cls(
            duration_s=round(clip.duration_s, 3),
            sample_rate=clip.sample_rate,
            source_format=clip.source_format,
            source_sample_rate=clip.source_sample_rate,
            channels=clip.source_channels,
            flags=list(clip.flags),
        )


class Timing(BaseModel):
    decode_ms: float
    model_ms: float
    total_ms: float
    guard_ms: float | None = Field(None, description="time the guard added after the model answered")


class GuardClaim(BaseModel):
    event: str = Field(..., description="the ontology class claimed (or the mention itself when it matched none)")
    text: str = Field(..., description="the claim as the question or answer put it")
    verifier_score: float | None = Field(None, description="the verifier's calibrated probability that the sound is there")
    contrast: float | None = Field(None, description="the answer's audio contrast (guard.contrast), the same on each of its claims")
    present: bool | None = Field(None, description="judged present / absent; null: uncertain or unverified")
    denied: bool = Field(False, description="the answer says this sound is absent (a 'No' to a presence question): checked as a "
                                            "claim of absence, 'missed' when the verifier hears it")
    prior: bool = Field(False, description="the answer does not depend on the audio (as likely on blank audio): a prior, not a hearing. "
                        "With present true: the sound is there, but the model guessed it rather than heard it")
    nearest: str | None = Field(None, description="the closest ontology class to the claim, close enough to match or not")
    similarity: float | None = Field(None, description="cosine similarity of the claim to `nearest` (1.0: one of its phrases)")
    either: bool = Field(False, description="one of a question's alternatives ('Are there X or Y?'): a 'yes' holds when any of them is there")
    unconfirmed: bool = Field(False, description="a sound the answer's free text mentions that the verifier does not judge present "
                                                  "(under `correct` it is cut from the answer)")
    reason: Literal["outside_ontology", "digital_silence"] | None = Field(
        None, description="outside_ontology: the claim matched no class (similarity below the verifier's minimum), so it is never "
                          "judged present or absent (present null, verdict at best uncertain) and no policy changes the answer for it; "
                          "digital_silence: the clip is silent (no sample above -80 dBFS), so the claimed sound is judged absent")


class GuardInfo(BaseModel):
    policy: Literal["off", "annotate", "abstain", "correct"]
    verdict: Literal["supported", "unsupported", "uncertain", "missed", "no_claims", "unverified", "skipped"] = Field(
        ..., description="missed: the answer denies a sound the verifier hears; no_claims: nothing claimed, nothing checked; "
                         "skipped: guard off, nothing checked; unverified: the verifier failed or timed out")
    contrast: float | None = Field(None, description="log P(answer | audio) - log P(answer | blank audio), nats: one number for the whole answer")
    claims: list[GuardClaim] = Field(default_factory=list)
    described: list[str] = Field(default_factory=list, description="not empty: the answer is the verifier's description of the "
                                 "sounds it hears, with their times (/v1/audio/events), not the model's, and these are the classes it "
                                 "names; under correct, an open question whose answer was unparsed or cut. The model's answer is in "
                                 "original_answer")


class QAResponse(BaseModel):
    answer: str
    original_answer: str | None = Field(None, description="the model's own answer, when the guard changed it")
    guard: GuardInfo | None = None
    answer_kind: Literal["yes", "no", "other", "unparsed"] = Field(
        ..., description="the answer read as yes / no / other; unparsed: not the form the question asks for (a yes or no to a "
                         "presence question, a number to a count or duration, a sentence to an open question)")
    model: str
    audio: AudioInfo
    timing: Timing
    request_id: str


class ErrorDetail(BaseModel):
    code: str
    message: str
    type: str = Field("invalid_request_error", description="OpenAI's error type (invalid_request_error, server_error, ...)")
    param: str | None = Field(None, description="the request field at fault, when there is one")
    request_id: str | None = Field(None, description="the request's id (X-Request-Id), to quote when reporting an error")


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


class VerifyRequest(BaseModel):
    """JSON form of ``POST /v1/audio/verify``; the multipart form takes ``file`` and ``events`` (repeated or comma-separated)."""

    audio: str = Field(..., description="the clip's bytes, base64-encoded")
    events: list[str] = Field(..., min_length=1, max_length=64, description="sound events to check, as phrases")
    truncate: bool = Field(False, description="cut audio longer than the limit instead of refusing it")


class EventPresence(BaseModel):
    text: str
    event: str | None = Field(None, description="the class the phrase matched, in `vocabulary` (null: none close enough, see reason)")
    nearest: str | None = Field(None, description="the closest class, close enough to match or not")
    similarity: float = Field(..., description="cosine similarity of the phrase to `nearest` (1.0: one of its phrases); "
                              "below the verifier's minimum, `event` is null")
    vocabulary: Literal["ontology", "audioset"] | None = Field(
        None, description="ontology: one of the classes the verifier was trained on; audioset: outside them, but close to one of "
                          "the AudioSet tagger's 521 classes, judged by the tagger's own output for it (verifiers on the tagger)")
    probability: float = Field(..., description="calibrated probability that the event is in the clip; for a phrase outside the "
                               "ontology, of its own text, reported as evidence only")
    present: bool | None = Field(None, description="judged present / absent with the verifier's thresholds; null: uncertain, "
                                 "or not judged (reason)")
    reason: Literal["outside_ontology"] | None = Field(
        None, description="outside_ontology: the phrase matched no class, so it is not judged (present null), whatever its probability")


class VerifyResponse(BaseModel):
    verifier: str
    events: list[EventPresence]
    absent_below: float
    present_above: float
    audio: AudioInfo
    request_id: str


class EventsRequest(BaseModel):
    """JSON form of ``POST /v1/audio/events``; the multipart form takes ``file`` (and ``truncate``)."""

    audio: str = Field(..., description="the clip's bytes, base64-encoded")
    truncate: bool = Field(False, description="cut audio longer than the limit instead of refusing it")


class EventSpan(BaseModel):
    onset_s: float = Field(..., description="seconds from the clip's start")
    offset_s: float


class DetectedEvent(BaseModel):
    event: str = Field(..., description="the class, in `vocabulary`")
    vocabulary: Literal["ontology", "audioset"] = Field(
        ..., description="ontology: one of the classes the verifier was trained on; audioset: one of the AudioSet tagger's own classes "
                         "that the ontology does not cover (verifiers on the tagger)")
    phrase: str = Field(..., description="the words a description uses for it")
    probability: float = Field(..., description="the clip's calibrated probability of the class (what /v1/audio/verify reports for it)")
    peak: float = Field(..., description="its highest probability in one frame")
    spans: list[EventSpan] = Field(..., description="where it was heard: runs of frames at or above the threshold, short gaps filled")


class EventsResponse(BaseModel):
    verifier: str
    events: list[DetectedEvent] = Field(..., description="every class at or above its vocabulary's threshold, most probable first")
    description: str = Field(..., description="the events in one sentence, as the guard answers an open question with them")
    thresholds: dict[str, float] = Field(..., description="per vocabulary: the calibrated probability a class needs, over the clip "
                                                         "and per frame of its spans")
    audio: AudioInfo
    request_id: str


def audio_body(fields: dict[str, dict], required: list[str], json_model: type[BaseModel]) -> dict:
    """OpenAPI request body of an audio endpoint: a multipart upload (``file`` + ``fields``) or JSON."""
    properties = {
        "file": {"type": "string", "format": "binary", "description": "WAV, FLAC, OGG/Vorbis or MP3"},
        **fields,
        "truncate": {"type": "boolean"},
    }
    multipart = {"type": "object", "required": ["file", *required], "properties": properties}
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": multipart},
        "application/json": {"schema": json_model.model_json_schema()},
    }}}
