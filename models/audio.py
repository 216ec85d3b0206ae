"""Audio decoding, written once for the server's uploads and the corpus build alike: bytes in any supported container
→ validated mono float32 at the model's rate (:func:`decode`), or an :class:`AudioError` naming what is wrong.

It trusts the bytes, never a file name or content type: libsndfile sniffs the container, so a renamed or lying file is
judged by what it really holds. The corpus hears exactly what the server would.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import soundfile as sf
import soxr


class AudioError(ValueError):
    """Audio that cannot be used, with a stable machine-readable ``code`` and the HTTP ``status`` the serving edge
    answers it with (400 damaged, 413 too long, 415 not a supported container, 422 values no recording has)."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def __reduce__(self):  # keep the fields across process pools
        return (type(self), (self.status, self.code, self.message))


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


def _open(data: bytes) -> sf.SoundFile:
    if not data:
        raise AudioError(400, "empty_audio", "the audio file is empty (0 bytes)")
    try:
        handle = sf.SoundFile(io.BytesIO(data))
    except sf.LibsndfileError as exc:
        raise AudioError(
            415,
            "unsupported_audio_format",
            f"could not recognise the audio container ({exc.error_string}); "
            f"supported: {', '.join(SUPPORTED_FORMATS)}",
        ) from exc
    except (RuntimeError, ValueError, TypeError) as exc:
        raise AudioError(415, "unsupported_audio_format", f"could not open the audio: {exc}") from exc
    if handle.format not in SUPPORTED_FORMATS:
        handle.close()
        raise AudioError(
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
    """Decode, check and convert ``data``; raise :class:`AudioError` for anything unusable.

    Whatever a decoder raises on hostile bytes is the upload's fault: it is a 400 ``corrupt_audio``.
    """
    try:
        return _decode(data, target_sample_rate, max_duration_s, truncate)
    except AudioError:
        raise
    except Exception as exc:  # noqa: BLE001 - libsndfile/mpg123/soxr on damaged input: never a 500
        raise AudioError(400, "corrupt_audio", f"the audio could not be decoded ({type(exc).__name__})") from exc


def _decode(data: bytes, target_sample_rate: int, max_duration_s: float | None, truncate: bool) -> Clip:
    with _open(data) as handle:
        fmt, sr, channels = handle.format, handle.samplerate, handle.channels
        if not MIN_SAMPLE_RATE <= sr <= MAX_SAMPLE_RATE:
            raise AudioError(422, "invalid_sample_rate", f"sample rate {sr} Hz is outside {MIN_SAMPLE_RATE}–{MAX_SAMPLE_RATE} Hz")
        if not 1 <= channels <= MAX_CHANNELS:
            raise AudioError(422, "too_many_channels", f"the audio has {channels} channels; at most {MAX_CHANNELS} are accepted")
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
            raise AudioError(400, "corrupt_audio", f"the {fmt} stream is corrupt or truncated: {exc}") from exc
    expected = declared if declared is None or limit is None else min(declared, limit + 1)
    if expected is not None and fmt in _EXACT_LENGTH and len(samples) < expected:
        raise AudioError(
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


def _too_long(duration_s: float, max_duration_s: float | None) -> AudioError:
    return AudioError(
        413,
        "audio_too_long",
        f"the audio lasts {duration_s:.1f} s, over the {max_duration_s:g} s limit; "
        "send a shorter clip or ask for truncation (truncate=true)",
    )


def _finish(samples: np.ndarray, sr: int, fmt: str, channels: int, target_sr: int, truncated: bool) -> Clip:
    if samples.size == 0:
        raise AudioError(400, "empty_audio", f"the {fmt} file holds no decodable audio frames (empty or truncated)")
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
        raise AudioError(422, "invalid_samples", f"{what} contains NaN or infinite samples")
    if samples.size and float(np.abs(samples).max()) > MAX_ABS_SAMPLE:
        raise AudioError(422, "invalid_samples", f"{what} has samples past ±{MAX_ABS_SAMPLE:g} (full scale is ±1)")
