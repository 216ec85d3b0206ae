"""Synthetic audio for load tests: tones, chords, chirps, noise bursts and silence, made in memory.

No audio is committed or downloaded; these clips exercise decoding, resampling and the model's window, not
what the model hears. Durations, sample rates, channel counts and containers vary like real uploads.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import soundfile as sf

FORMATS = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "ogg": ("OGG", "VORBIS"), "mp3": ("MP3", "MPEG_LAYER_III")}


@dataclass(frozen=True)
class Clip:
    data: bytes
    filename: str
    seconds: float


def synth(seconds: float, sample_rate: int, channels: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    n = int(seconds * sample_rate)
    t = np.arange(n) / sample_rate
    if kind == "tone":
        wave = 0.3 * np.sin(2 * np.pi * rng.uniform(110, 2000) * t)
    elif kind == "chord":
        wave = sum(0.12 * np.sin(2 * np.pi * f * t) for f in rng.uniform(150, 1200, size=3))
    elif kind == "chirp":
        f0, f1 = rng.uniform(100, 400), rng.uniform(1000, 6000)
        wave = 0.3 * np.sin(2 * np.pi * (f0 + (f1 - f0) * t / (2 * max(seconds, 1e-3))) * t)
    elif kind == "noise":
        envelope = (np.sin(2 * np.pi * rng.uniform(0.5, 3) * t) > 0).astype(np.float64)
        wave = 0.2 * rng.standard_normal(n) * envelope
    elif kind == "silence":
        wave = np.zeros(n)
    else:
        raise ValueError(kind)
    wave = wave.astype(np.float32)
    return np.stack([wave] * channels, axis=1) if channels > 1 else wave


def spoken(text: str, sample_rate: int = 16_000) -> np.ndarray | None:
    """``text`` spoken by espeak-ng, mono float32 at ``sample_rate`` (None when espeak-ng is not installed): speech
    anyone can make, for the scripts that check what the guard hears."""
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    if shutil.which("espeak-ng") is None:
        return None
    from models.audio import decode

    with tempfile.TemporaryDirectory() as d:  # a file, not --stdout: a streamed WAV's header leaves its length open
        wav = Path(d) / "spoken.wav"
        subprocess.run(["espeak-ng", "-w", str(wav), text], check=True, timeout=60)
        return decode(wav.read_bytes(), sample_rate).samples


def encode(samples: np.ndarray, sample_rate: int, ext: str = "wav", subtype: str | None = None) -> bytes:
    """``samples`` as an audio file's bytes (``ext``'s format, its usual subtype unless one is given)."""
    fmt, default_subtype = FORMATS[ext]
    buf = io.BytesIO()
    sf.write(buf, samples, sample_rate, format=fmt, subtype=subtype or default_subtype)
    return buf.getvalue()


def make_pool(count: int, min_s: float, max_s: float, seed: int) -> list[Clip]:
    """``count`` clips with durations uniform in [min_s, max_s], mixed formats, rates and channels."""
    rng = np.random.default_rng(seed)
    clips = []
    for i in range(count):
        seconds = float(rng.uniform(min_s, max_s))
        ext = str(rng.choice(["wav", "wav", "flac", "ogg", "mp3"]))
        rate = int(rng.choice([16_000, 22_050, 44_100, 48_000] if ext != "mp3" else [16_000, 22_050, 44_100]))
        channels = int(rng.choice([1, 1, 2]))
        kind = str(rng.choice(["tone", "chord", "chirp", "noise", "noise", "silence"], p=[0.2, 0.2, 0.2, 0.17, 0.18, 0.05]))
        clips.append(Clip(encode(synth(seconds, rate, channels, kind, rng), rate, ext), f"clip{i}.{ext}", seconds))
    return clips


def bad_inputs(seed: int) -> list[tuple[str, bytes, str, int, str]]:
    """(name, bytes, filename, expected status, expected error code) for inputs a client gets wrong."""
    rng = np.random.default_rng(seed)
    wav = encode(synth(2.0, 16_000, 1, "tone", rng), 16_000, "wav")
    return [
        ("empty", b"", "empty.wav", 400, "empty_audio"),
        ("not-audio", b"%PDF-1.7 not audio at all " * 40, "doc.wav", 415, "unsupported_audio_format"),
        ("truncated-wav", wav[: len(wav) // 3], "cut.wav", 400, "corrupt_audio"),
    ]
