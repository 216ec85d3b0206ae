"""Augmentation against the shift between recording setups (microphone, room, device, channel, codec).

Every source in the corpus comes from a handful of Debian packages, recorded and mastered in a
handful of ways; a model trained on it learns those setups along with the sounds. The
transforms (:mod:`train.data.transforms`) draw other setups: a microphone's tilt and resonances
(EQ), a cheap or band-limited channel (low-/high-pass, telephone band), a room (synthetic reverb),
background noise, a device running at 8–11 kHz, an 8-bit or μ-law ADC, a lossy codec — plus
event-level pitch and tempo.

Two entry points, because strong labels must stay true:

* :func:`augment_scene` — a whole 10 s scene after mixing. Never changes the length and never
  moves an event: filters are causal IIRs (group delay < 1.5 ms above 500 Hz, ≲ 7 ms near a low
  cutoff or resonance), reverb keeps the dry onset and
  only adds a tail after it (events sound up to ~RT60 longer than their labelled offsets, as in
  any reverberant recording), resampling and codecs are delay-compensated and trimmed back.
* :func:`augment_source` — one source excerpt before it is placed.
  :func:`~train.data.transforms.time_stretch` changes its length by the drawn factor, so the
  caller takes ``len(output)`` as the event's length (or passes ``keep_length=True``, which
  applies only the length-preserving transforms). :func:`~train.data.transforms.pitch_shift`
  keeps the length.

A chain is first drawn as a list of :class:`Step` (name + parameters, noise seeds included), then
applied, so an augmented scene can be re-rendered from its record, like the mixer's timelines:
``apply_chain(x, draw_scene_chain(rng, cfg))`` equals ``augment_scene(x, rng, cfg)``. Use an rng
stream of its own (e.g. ``np.random.default_rng([seed, split, index, 1])``) so that turning
augmentation on does not change which scenes the mixer plans.

Output is always finite float32 in [-1, 1]: after each step a clip whose peak exceeds
``cfg.peak`` is scaled down to it (quieter clips keep their level, so relative loudness stays).

Cost (``python -m train.data.augment``, one core of a shared 2-core host): the default scene
chain takes ~5.5 ms per 10 s clip on average (p95 ~24 ms, the codec draws), the source chain
~1.5 ms per 3 s excerpt; per-transform figures are in train/README.md, "Augmentation".
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from train.data.decoding import SAMPLE_RATE
from train.data.transforms import (
    CODECS, EQ_KINDS, add_noise, available_codecs, band_limit, bank_excerpt, coloured_noise, eq, gain, lossy_codec, mu_law,
    pitch_shift, protect, quantize, resample_roundtrip, reverb, time_stretch,
)

Range = tuple[float, float]


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities (``p_*``) and parameter ranges (``(low, high)``) of the chains.

    Scene chain, in signal order: reverb, noise, EQ, band-limit, gain, resample, μ-law or
    bit depth, codec. Source chain: pitch, stretch, EQ. Frequencies and cutoffs are drawn
    log-uniformly, everything else uniformly.
    """

    p_scene: float = 0.8  # the rest stay clean, so the corpus's own setups are still seen
    p_gain: float = 0.7
    gain_db: Range = (-12.0, 6.0)
    p_eq: float = 0.5
    eq_bands: tuple[int, int] = (1, 3)
    eq_gain_db: Range = (-9.0, 9.0)
    eq_q: Range = (0.5, 2.0)
    p_band_limit: float = 0.25
    lowpass_hz: Range = (2500.0, 7000.0)
    highpass_hz: Range = (60.0, 400.0)
    telephone_hz: tuple[Range, Range] = ((250.0, 400.0), (3000.0, 3600.0))
    p_telephone: float = 0.3  # of band-limited scenes: a band-pass instead of one side
    filter_order: int = 6
    p_reverb: float = 0.25
    rt60_s: Range = (0.15, 0.8)
    wet: Range = (0.1, 0.5)
    p_noise: float = 0.4
    snr_db: Range = (5.0, 30.0)
    noise_exponent: Range = (0.0, 2.0)
    p_bank: float = 0.5  # of noisy scenes, when a noise bank is given: a bank recording instead
    p_resample: float = 0.15
    resample_hz: tuple[int, int] = (8000, 11025)
    p_mu_law: float = 0.05
    p_bit_depth: float = 0.1
    bits: tuple[int, int] = (8, 12)
    p_codec: float = 0.1
    codecs: tuple[str, ...] = ("vorbis", "mp3")
    codec_compression: Range = (0.3, 0.9)
    p_pitch: float = 0.3
    semitones: Range = (-2.0, 2.0)
    p_stretch: float = 0.3
    stretch: Range = (0.85, 1.15)
    p_source_eq: float = 0.2
    peak: float = 0.99
    sample_rate: int = SAMPLE_RATE

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if name.startswith("p_") and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value} is not a probability")
            if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
                if value[0] > value[1]:
                    raise ValueError(f"{name}={value}: low > high")
        if self.resample_hz[1] >= self.sample_rate:
            raise ValueError("resample_hz must stay below the sample rate")
        if not 2 <= self.bits[0] <= self.bits[1] <= 16:
            raise ValueError("bits must lie in 2…16")
        if min(self.stretch) <= 0 or not 0 < self.peak <= 1 or min(self.rt60_s) <= 0:
            raise ValueError("stretch and rt60_s must be positive and peak in (0, 1]")
        if max(self.lowpass_hz[1], self.telephone_hz[1][1]) >= self.sample_rate / 2:
            raise ValueError("low-pass cutoffs must stay below Nyquist")
        unknown = set(self.codecs) - set(CODECS)
        if unknown:
            raise ValueError(f"unknown codecs {sorted(unknown)}; known: {sorted(CODECS)}")


@dataclass(frozen=True)
class Step:
    """One drawn transform: its name in :data:`TRANSFORMS` and its keyword parameters (JSON-able)."""

    name: str
    params: Mapping[str, object] = field(default_factory=dict)


def _log_uniform(rng: np.random.Generator, r: Range) -> float:
    return float(math.exp(rng.uniform(math.log(r[0]), math.log(r[1]))))


def _uniform(rng: np.random.Generator, r: Range) -> float:
    return float(rng.uniform(r[0], r[1]))


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(2**31))


def _eq_bands(rng: np.random.Generator, cfg: AugmentConfig) -> list[list]:
    bands = []
    for _ in range(int(rng.integers(cfg.eq_bands[0], cfg.eq_bands[1] + 1))):
        kind = EQ_KINDS[int(rng.integers(len(EQ_KINDS)))]
        freq = _log_uniform(rng, {"peaking": (100.0, 6000.0), "low_shelf": (80.0, 500.0),
                                  "high_shelf": (1500.0, 6000.0)}[kind])
        q = _log_uniform(rng, cfg.eq_q) if kind == "peaking" else 0.707
        bands.append([kind, round(freq, 1), round(_uniform(rng, cfg.eq_gain_db), 2), round(q, 3)])
    return bands


def draw_scene_chain(rng: np.random.Generator, cfg: AugmentConfig = AugmentConfig(),
                     bank_size: int = 0) -> list[Step]:
    """Draw the scene transforms (none with probability 1 − ``p_scene``), in signal order."""
    if rng.random() >= cfg.p_scene:
        return []
    steps: list[Step] = []
    if rng.random() < cfg.p_reverb:
        steps.append(Step("reverb", {"rt60": round(_uniform(rng, cfg.rt60_s), 3),
                                     "wet": round(_uniform(rng, cfg.wet), 3), "seed": _seed(rng)}))
    if rng.random() < cfg.p_noise:
        snr = round(_uniform(rng, cfg.snr_db), 2)
        if bank_size and rng.random() < cfg.p_bank:
            steps.append(Step("bank_noise", {"index": int(rng.integers(bank_size)), "offset": _seed(rng),
                                             "snr_db": snr}))
        else:
            steps.append(Step("noise", {"snr_db": snr, "exponent": round(_uniform(rng, cfg.noise_exponent), 3),
                                        "seed": _seed(rng)}))
    if rng.random() < cfg.p_eq:
        steps.append(Step("eq", {"bands": _eq_bands(rng, cfg)}))
    if rng.random() < cfg.p_band_limit:
        if rng.random() < cfg.p_telephone:
            low, high = _log_uniform(rng, cfg.telephone_hz[0]), _log_uniform(rng, cfg.telephone_hz[1])
        elif rng.random() < 0.6:
            low, high = None, _log_uniform(rng, cfg.lowpass_hz)
        else:
            low, high = _log_uniform(rng, cfg.highpass_hz), None
        steps.append(Step("band_limit", {"low_hz": low and round(low, 1), "high_hz": high and round(high, 1),
                                         "order": cfg.filter_order}))
    if rng.random() < cfg.p_gain:
        steps.append(Step("gain", {"db": round(_uniform(rng, cfg.gain_db), 2)}))
    if rng.random() < cfg.p_resample:
        steps.append(Step("resample", {"rate": int(rng.integers(cfg.resample_hz[0], cfg.resample_hz[1] + 1))}))
    if rng.random() < cfg.p_mu_law:
        steps.append(Step("mu_law", {"bits": 8}))
    elif rng.random() < cfg.p_bit_depth:
        steps.append(Step("quantize", {"bits": int(rng.integers(cfg.bits[0], cfg.bits[1] + 1))}))
    codecs = [c for c in cfg.codecs if c in available_codecs()]
    if codecs and rng.random() < cfg.p_codec:
        steps.append(Step("codec", {"codec": codecs[int(rng.integers(len(codecs)))],
                                    "compression": round(_uniform(rng, cfg.codec_compression), 3)}))
    return steps


def draw_source_chain(rng: np.random.Generator, cfg: AugmentConfig = AugmentConfig(),
                      keep_length: bool = False) -> list[Step]:
    """Draw the event-level transforms; ``stretch`` (the one that changes length) only if not ``keep_length``."""
    steps: list[Step] = []
    if rng.random() < cfg.p_pitch:
        steps.append(Step("pitch", {"semitones": round(_uniform(rng, cfg.semitones), 3)}))
    if rng.random() < cfg.p_stretch and not keep_length:
        steps.append(Step("stretch", {"factor": round(_uniform(rng, cfg.stretch), 4)}))
    if rng.random() < cfg.p_source_eq:
        steps.append(Step("eq", {"bands": _eq_bands(rng, cfg)}))
    return steps


def _bank_noise(x: np.ndarray, index: int, offset: int, snr_db: float,
                noise_bank: Sequence[np.ndarray] | None) -> np.ndarray:
    if not noise_bank:
        raise ValueError("a bank_noise step needs the noise bank it was drawn for")
    return add_noise(x, bank_excerpt(noise_bank[index], len(x), offset), snr_db)


# name → how a Step is applied: (samples, sample rate, noise bank, **params) → samples
TRANSFORMS = {
    "gain": lambda x, sr, bank, db: gain(x, db),
    "eq": lambda x, sr, bank, bands: eq(x, bands, sr),
    "band_limit": lambda x, sr, bank, low_hz, high_hz, order: band_limit(x, low_hz, high_hz, order, sr),
    "reverb": lambda x, sr, bank, rt60, wet, seed: reverb(x, rt60, wet, seed, sr=sr),
    "noise": lambda x, sr, bank, snr_db, exponent, seed: add_noise(x, coloured_noise(len(x), exponent, seed), snr_db),
    "bank_noise": lambda x, sr, bank, index, offset, snr_db: _bank_noise(x, index, offset, snr_db, bank),
    "resample": lambda x, sr, bank, rate: resample_roundtrip(x, rate, sr),
    "mu_law": lambda x, sr, bank, bits: mu_law(x, bits),
    "quantize": lambda x, sr, bank, bits: quantize(x, bits),
    "codec": lambda x, sr, bank, codec, compression: lossy_codec(x, codec, compression, sr),
    "pitch": lambda x, sr, bank, semitones: pitch_shift(x, semitones, sr),
    "stretch": lambda x, sr, bank, factor: time_stretch(x, factor, sr),
}


def apply_chain(samples: np.ndarray, steps: Sequence[Step], cfg: AugmentConfig = AugmentConfig(),
                noise_bank: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """Apply drawn steps in order, keeping the signal finite and within ``±cfg.peak`` after each."""
    x = np.array(samples, dtype=np.float32)  # a copy: the caller's array is never returned or changed
    if x.ndim != 1:
        raise ValueError(f"expected mono 1-D samples, got shape {x.shape}")
    x = protect(x, cfg.peak)
    if not len(x):
        return x
    for step in steps:
        x = protect(TRANSFORMS[step.name](x, cfg.sample_rate, noise_bank, **step.params), cfg.peak)
    return x


def augment_scene(samples: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig = AugmentConfig(),
                  noise_bank: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """A mixed scene as another recording setup would have captured it: same length, events unmoved.

    ``noise_bank``: optional recordings to use as background noise (looped/cut to length, mixed at
    a drawn SNR). They must not contain labelled classes, or the scene's labels stop being true.
    """
    steps = draw_scene_chain(rng, cfg, len(noise_bank) if noise_bank is not None else 0)
    return apply_chain(samples, steps, cfg, noise_bank)


def augment_source(samples: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig = AugmentConfig(),
                   keep_length: bool = False) -> np.ndarray:
    """A source excerpt before placement: pitch, tempo (length × the drawn factor) and colouration.

    The output length differs from the input's when a stretch was drawn; use ``len(output)`` as the
    event's length, or ``keep_length=True`` to draw only length-preserving transforms.
    """
    return apply_chain(samples, draw_source_chain(rng, cfg, keep_length), cfg)


def describe(cfg: AugmentConfig = AugmentConfig()) -> str:
    """The configuration in one paragraph, for the build report."""
    codecs = [c for c in cfg.codecs if c in available_codecs()] or ["none available"]
    tl, th = cfg.telephone_hz
    return (
        f"scene (p={cfg.p_scene:g}; length and event times kept): "
        f"reverb p={cfg.p_reverb:g} RT60 {cfg.rt60_s[0]:g}–{cfg.rt60_s[1]:g} s wet {cfg.wet[0]:g}–{cfg.wet[1]:g}; "
        f"noise p={cfg.p_noise:g} SNR {cfg.snr_db[0]:g}–{cfg.snr_db[1]:g} dB, spectrum f^-β β "
        f"{cfg.noise_exponent[0]:g}–{cfg.noise_exponent[1]:g} (noise bank p={cfg.p_bank:g} when given); "
        f"EQ p={cfg.p_eq:g} {cfg.eq_bands[0]}–{cfg.eq_bands[1]} biquads {cfg.eq_gain_db[0]:+g}…{cfg.eq_gain_db[1]:+g} dB; "
        f"band-limit p={cfg.p_band_limit:g} (low-pass {cfg.lowpass_hz[0]:g}–{cfg.lowpass_hz[1]:g} Hz, high-pass "
        f"{cfg.highpass_hz[0]:g}–{cfg.highpass_hz[1]:g} Hz, telephone {tl[0]:g}–{tl[1]:g}/{th[0]:g}–{th[1]:g} Hz "
        f"p={cfg.p_telephone:g}, order {cfg.filter_order}); "
        f"gain p={cfg.p_gain:g} {cfg.gain_db[0]:+g}…{cfg.gain_db[1]:+g} dB; "
        f"resample p={cfg.p_resample:g} to {cfg.resample_hz[0]}–{cfg.resample_hz[1]} Hz and back; "
        f"μ-law p={cfg.p_mu_law:g}, else bit depth p={cfg.p_bit_depth:g} {cfg.bits[0]}–{cfg.bits[1]} bits; "
        f"codec p={cfg.p_codec:g} {'/'.join(codecs)} compression {cfg.codec_compression[0]:g}–"
        f"{cfg.codec_compression[1]:g}. "
        f"source: pitch p={cfg.p_pitch:g} {cfg.semitones[0]:+g}…{cfg.semitones[1]:+g} semitones (length kept); "
        f"stretch p={cfg.p_stretch:g} ×{cfg.stretch[0]:g}–{cfg.stretch[1]:g} (changes length and timing); "
        f"EQ p={cfg.p_source_eq:g}. Peak kept ≤ {cfg.peak:g}."
    )


# --------------------------------------------------------------------------- cost


def _timings_ms(fn, n: int) -> np.ndarray:
    """Wall-clock milliseconds of ``n`` calls of ``fn()``."""
    out = np.empty(n)
    for i in range(n):
        t = time.perf_counter()
        fn()
        out[i] = 1e3 * (time.perf_counter() - t)
    return out


def benchmark(n_chains: int = 200, seed: int = 0, cfg: AugmentConfig = AugmentConfig()) -> dict[str, float]:
    """Milliseconds: each transform alone on a 10 s clip (median of 5), the drawn scene chain on it
    (mean, p95) and the drawn source chain on a 3 s excerpt (mean)."""
    sr = cfg.sample_rate
    x = 0.1 * coloured_noise(int(10 * sr), 1.0, seed)
    always = {"gain": {"db": -3.0}, "eq": {"bands": [["peaking", 1000.0, 6.0, 1.0], ["low_shelf", 200.0, -4.0, 0.707],
                                                   ["high_shelf", 4000.0, 3.0, 0.707]]},
              "band_limit": {"low_hz": 300.0, "high_hz": 3400.0, "order": cfg.filter_order},
              "reverb": {"rt60": cfg.rt60_s[1], "wet": 0.3, "seed": 1},
              "noise": {"snr_db": 10.0, "exponent": 1.0, "seed": 1},
              "resample": {"rate": 8000}, "mu_law": {"bits": 8}, "quantize": {"bits": 8},
              **{f"codec:{c}": {"codec": c, "compression": 0.6} for c in available_codecs()},
              "pitch": {"semitones": 1.5}, "stretch": {"factor": 1.1}}
    out: dict[str, float] = {}
    for name, params in always.items():
        steps = [Step(name.split(":")[0], params)]
        out[name] = float(np.median(_timings_ms(lambda: apply_chain(x, steps, cfg), 5)))
    rng = np.random.default_rng(seed)
    scene = _timings_ms(lambda: augment_scene(x, rng, cfg), n_chains)
    out["scene chain mean"] = float(np.mean(scene))
    out["scene chain p95"] = float(np.percentile(scene, 95))
    excerpt = x[: 3 * sr]  # source excerpts are 1.5–5 s
    out["source chain mean (3 s)"] = float(np.mean(_timings_ms(lambda: augment_source(excerpt, rng, cfg), n_chains)))
    return out


if __name__ == "__main__":
    print(describe())
    for k, v in benchmark().items():
        print(f"{k:24s} {v:7.2f} ms")
