"""The signal transforms that augmentation draws: other microphones, channels, rooms, devices and codecs.

Each takes and returns float32 mono samples. All but :func:`time_stretch` keep the length, and none
moves an event: filters are causal IIRs (group delay < 1.5 ms above 500 Hz, ≲ 7 ms near a low cutoff or
resonance), :func:`reverb` keeps the dry onset and only adds a tail after it, resampling and codecs are
delay-compensated and trimmed back. :mod:`train.data.augment` draws chains of them and applies them.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from functools import cache

import numpy as np
import soundfile as sf
import soxr
from scipy import fft, signal

from train.data.decoding import SAMPLE_RATE
from train.data.mixer import loop_to_length

# soundfile (format, subtype) per codec name; which of them this libsndfile can write is probed.
CODECS: dict[str, tuple[str, str]] = {
    "vorbis": ("OGG", "VORBIS"),
    "mp3": ("MP3", "MPEG_LAYER_III"),
    "opus": ("OGG", "OPUS"),  # ~6× slower than Vorbis here; not in the default draw
}
EQ_KINDS = ("peaking", "low_shelf", "high_shelf")


def gain(x: np.ndarray, db: float) -> np.ndarray:
    """Scale by ``db`` decibels (recording level / preamp setting)."""
    return (np.asarray(x, np.float32) * np.float32(10 ** (db / 20))).astype(np.float32)


def biquad(kind: str, freq: float, gain_db: float, q: float, sr: int = SAMPLE_RATE) -> np.ndarray:
    """One second-order section (RBJ audio-EQ cookbook) as a ``(1, 6)`` sos row.

    ``peaking`` boosts/cuts ``gain_db`` around ``freq``; the shelves tilt everything below
    (``low_shelf``) or above (``high_shelf``) it by ``gain_db`` — a microphone's colouration.
    """
    a = 10 ** (gain_db / 40)
    w0 = 2 * math.pi * freq / sr
    cw, alpha = math.cos(w0), math.sin(w0) / (2 * q)
    if kind == "peaking":
        b = [1 + alpha * a, -2 * cw, 1 - alpha * a]
        den = [1 + alpha / a, -2 * cw, 1 - alpha / a]
    elif kind in ("low_shelf", "high_shelf"):
        s = 1.0 if kind == "low_shelf" else -1.0  # the high shelf is the low shelf with cos(w0) negated
        ra = 2 * math.sqrt(a) * alpha
        b = [a * ((a + 1) - s * (a - 1) * cw + ra), s * 2 * a * ((a - 1) - s * (a + 1) * cw),
             a * ((a + 1) - s * (a - 1) * cw - ra)]
        den = [(a + 1) + s * (a - 1) * cw + ra, -s * 2 * ((a - 1) + s * (a + 1) * cw),
               (a + 1) + s * (a - 1) * cw - ra]
    else:
        raise ValueError(f"unknown EQ kind {kind!r}; expected one of {EQ_KINDS}")
    return np.array([b + den], np.float64) / den[0]


def eq(x: np.ndarray, bands: Sequence[Sequence], sr: int = SAMPLE_RATE) -> np.ndarray:
    """Apply ``(kind, freq, gain_db, q)`` biquads in series (causal: events do not move)."""
    if not bands:
        return np.asarray(x, np.float32)
    sos = np.concatenate([biquad(str(k), float(f), float(g), float(q), sr) for k, f, g, q in bands])
    return signal.sosfilt(sos, x).astype(np.float32)


def band_limit(x: np.ndarray, low_hz: float | None, high_hz: float | None, order: int = 6,
               sr: int = SAMPLE_RATE) -> np.ndarray:
    """Butterworth high-pass at ``low_hz`` and/or low-pass at ``high_hz`` (a cheap mic, a phone line).

    Causal, so nothing is shifted by more than the filter's group delay: < 1.5 ms above 500 Hz,
    up to ~5 ms within an octave of a low high-pass cutoff.
    """
    if low_hz and high_hz:
        sos = signal.butter(order, [low_hz, high_hz], "bandpass", fs=sr, output="sos")
    elif high_hz:
        sos = signal.butter(order, high_hz, "lowpass", fs=sr, output="sos")
    elif low_hz:
        sos = signal.butter(order, low_hz, "highpass", fs=sr, output="sos")
    else:
        return np.asarray(x, np.float32)
    return signal.sosfilt(sos, x).astype(np.float32)


def reverb_ir(rt60: float, seed: int, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Unit-energy late reverb: Gaussian noise under an envelope falling 60 dB in ``rt60`` seconds."""
    n = max(1, int(rt60 * sr))
    t = np.arange(n) / sr
    h = np.random.default_rng(seed).standard_normal(n) * 10 ** (-3 * t / rt60)
    return (h / np.sqrt(np.sum(h**2))).astype(np.float32)


def reverb(x: np.ndarray, rt60: float, wet: float, seed: int, predelay_s: float = 0.005,
           sr: int = SAMPLE_RATE) -> np.ndarray:
    """Room: the dry signal plus its FFT convolution with :func:`reverb_ir`, same length.

    Equal-power mix (dry √(1−wet), reverberant √wet) so the level stays about the same; the
    reverberant part starts ``predelay_s`` after the direct sound, so onsets stay where they are.
    """
    x = np.asarray(x, np.float32)
    h = np.concatenate([np.zeros(int(predelay_s * sr), np.float32), reverb_ir(rt60, seed, sr)])
    tail = signal.oaconvolve(x, h)[: len(x)]
    return (math.sqrt(1 - wet) * x + math.sqrt(wet) * tail).astype(np.float32)


def coloured_noise(n: int, exponent: float, seed: int) -> np.ndarray:
    """Unit-RMS noise with power spectrum ∝ f^-exponent (0 white, 1 pink, 2 brown, −1 blue)."""
    spec = fft.rfft(np.random.default_rng(seed).standard_normal(n, dtype=np.float32))  # float32: half the cost
    f = np.arange(len(spec), dtype=np.float32)
    f[0] = f[1] if len(f) > 1 else 1.0
    spec *= f ** np.float32(-exponent / 2)
    spec[0] = 0.0
    y = fft.irfft(spec, n)
    rms = np.sqrt(np.mean(y.astype(np.float64) ** 2))
    return (y / rms if rms > 0 else y).astype(np.float32)


def add_noise(x: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """Add ``noise`` scaled so that power(x) / power(added) is ``snr_db``; silence is left silent."""
    x = np.asarray(x, np.float32)
    px = float(np.mean(x.astype(np.float64) ** 2))
    pn = float(np.mean(np.asarray(noise, np.float64) ** 2))
    if px <= 0 or pn <= 0:
        return x.copy()
    scale = math.sqrt(px / (pn * 10 ** (snr_db / 10)))
    return (x + noise * np.float32(scale)).astype(np.float32)


def bank_excerpt(noise: np.ndarray, n: int, offset: int) -> np.ndarray:
    """``n`` samples of a noise recording from ``offset``, looped with cross-fades if it is shorter."""
    noise = np.asarray(noise, np.float32)
    return loop_to_length(noise, n, offset % len(noise))


def resample_roundtrip(x: np.ndarray, rate: int, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Down to ``rate`` Hz and back with soxr: a device's band limit and resampler, same length."""
    x = np.asarray(x, np.float32)
    y = soxr.resample(soxr.resample(x, sr, rate), rate, sr)
    return _fit(y, len(x))


def quantize(x: np.ndarray, bits: int) -> np.ndarray:
    """Uniform ``bits``-bit quantisation of [-1, 1] (a low-resolution ADC): full-scale sine SNR 6.02·bits + 1.76 dB."""
    step = 2.0 ** (1 - bits)
    return np.clip(np.round(np.asarray(x, np.float64) / step) * step, -1.0, 1.0).astype(np.float32)


def mu_law(x: np.ndarray, bits: int = 8, mu: float = 255.0) -> np.ndarray:
    """μ-law companding through ``bits`` bits (telephony, G.711-like): SNR ~38 dB, nearly level-independent."""
    x = np.clip(np.asarray(x, np.float64), -1.0, 1.0)
    y = np.sign(x) * np.log1p(mu * np.abs(x)) / math.log1p(mu)
    yq = quantize(y, bits).astype(np.float64)
    return (np.sign(yq) * np.expm1(np.abs(yq) * math.log1p(mu)) / mu).astype(np.float32)


@cache
def available_codecs() -> tuple[str, ...]:
    """The :data:`CODECS` this libsndfile can really write and read back in memory."""
    probe = np.zeros(1600, np.float32)
    ok = []
    for name, (fmt, sub) in CODECS.items():
        try:
            buf = io.BytesIO()
            sf.write(buf, probe, SAMPLE_RATE, format=fmt, subtype=sub)
            buf.seek(0)
            sf.read(buf)
        except Exception:  # noqa: BLE001 — any failure means "not usable here"
            continue
        ok.append(name)
    return tuple(ok)


def lossy_codec(x: np.ndarray, codec: str, compression: float, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Encode and decode in memory (soundfile/libsndfile); ``compression`` 0 = best quality … 1 = smallest.

    libsndfile's Vorbis, MP3 (LAME tag, gapless) and Opus decoders return the input's alignment;
    the length is trimmed/padded back, so events do not move (the tests check both).
    """
    fmt, sub = CODECS[codec]
    x = np.clip(np.asarray(x, np.float32), -1.0, 1.0)
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt, subtype=sub, compression_level=float(compression))
    buf.seek(0)
    y, _ = sf.read(buf, dtype="float32")
    return _fit(y, len(x))


def time_stretch(x: np.ndarray, factor: float, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Make ``x`` ``factor`` times as long at the same pitch (WSOLA). Changes length and timing.

    30 ms Hann frames are overlap-added at a fixed 15 ms hop, each taken from near its nominal
    input position where it best continues the previous frame (±7.5 ms search), so periodic
    sounds stay in phase. Output length is ``round(len(x) * factor)``.
    """
    x = np.asarray(x, np.float32)
    n_out = int(round(len(x) * factor))
    hop = int(0.015 * sr)
    win, tol = 2 * hop, hop // 2
    if n_out == len(x):
        return x.copy()
    if len(x) < win:  # too short for frames: plain resampling (shifts pitch too, by 1/factor)
        return _fit(soxr.resample(x, sr, sr * factor), n_out)
    xp = np.concatenate([np.zeros(tol, np.float32), x, np.zeros(2 * win + 2 * tol, np.float32)])
    window = np.hanning(win + 1)[:win].astype(np.float32)  # periodic: sums to 1 at 50 % overlap
    frames = n_out // hop + 2
    out = np.zeros(frames * hop + win, np.float32)
    wsum = np.zeros_like(out)
    analysis_hop = hop / factor
    last = len(xp) - win - hop - tol  # keeps both the search window and the continuation inside xp
    prev = tol
    for k in range(frames):
        nominal = min(int(round(k * analysis_hop)) + tol, last)
        if k == 0:
            pos = nominal
        else:
            target = xp[prev + hop: prev + hop + win]
            seg = xp[nominal - tol: nominal + tol + win]
            pos = nominal - tol + int(np.argmax(np.correlate(seg, target, "valid")))
        out[k * hop: k * hop + win] += xp[pos: pos + win] * window
        wsum[k * hop: k * hop + win] += window
        prev = pos
    out = np.divide(out, wsum, out=np.zeros_like(out), where=wsum > 1e-3)
    return out[:n_out]


def pitch_shift(x: np.ndarray, semitones: float, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Raise the pitch by ``semitones`` at the same length: stretch by the ratio, then resample (soxr)."""
    x = np.asarray(x, np.float32)
    ratio = 2 ** (semitones / 12)
    y = soxr.resample(time_stretch(x, ratio, sr), sr * ratio, sr)
    return _fit(y, len(x))


def _fit(x: np.ndarray, n: int) -> np.ndarray:
    """Trim or zero-pad at the end to exactly ``n`` samples (resamplers round lengths)."""
    x = np.asarray(x, np.float32)
    if len(x) >= n:
        return x[:n].copy()
    return np.concatenate([x, np.zeros(n - len(x), np.float32)])


def protect(x: np.ndarray, peak: float = 0.99) -> np.ndarray:
    """Finite float32 with ``max|x| ≤ peak``: NaN/inf zeroed, and scaled down only if it peaks above."""
    x = np.asarray(x, np.float32)
    m = float(np.max(np.abs(x))) if len(x) else 0.0
    if not math.isfinite(m):
        x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        m = float(np.max(np.abs(x)))
    if m > peak:
        x = np.clip(x * np.float32(peak / m), -peak, peak)  # clip only absorbs float rounding
    return x
