"""The clips the aiSFX reference embeddings were computed on (``tests/fixtures/aisfx_reference.json``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SAMPLE_RATE = 44_100
#: a 44.1 kHz mono recording in the listed packages (the sonic-pi-samples package)
RECORDING = ("sonic-pi-samples", "usr/share/sonic-pi/samples/drum_roll.flac")


def synthetic_clip() -> np.ndarray:
    """5 s at 44.1 kHz, float32: a 440 Hz tone with harmonics, a 200 Hz → 8 kHz chirp, then decaying clicks."""
    t = np.arange(5 * SAMPLE_RATE) / SAMPLE_RATE
    tone = sum(0.3 / k * np.sin(2 * np.pi * 440 * k * t) for k in (1, 2, 3)) * (t < 1.5)
    u = np.clip((t - 1.5) / 2.0, 0, 1)
    chirp = 0.25 * np.sin(2 * np.pi * (200 * 2.0 * (40 ** u - 1) / np.log(40))) * ((t >= 1.5) & (t < 3.5))
    since = (t - 3.5) % 0.25
    clicks = 0.6 * np.exp(-since / 0.01) * np.sin(2 * np.pi * 3000 * t + 7 * np.sin(2 * np.pi * 37 * t)) * (t >= 3.5)
    return (tone + chirp + clicks).astype(np.float32)


def recording(unpacked: Path) -> np.ndarray:
    """:data:`RECORDING` as float32 mono samples (it is mono, at 44.1 kHz)."""
    import soundfile as sf

    samples, sr = sf.read(unpacked / RECORDING[0] / RECORDING[1], dtype="float32")
    if sr != SAMPLE_RATE or samples.ndim != 1:
        raise ValueError(f"{RECORDING}: {sr} Hz, shape {samples.shape}; expected mono 44.1 kHz")
    return samples
