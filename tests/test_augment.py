"""train/data/augment.py: each transform does what it claims, measured on signals whose answer is known."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from scipy import signal

from train.data import augment as A
from train.data import transforms as T

SR = 16_000
# every transform on, so a few seeds exercise the whole chain
ALL = A.AugmentConfig(p_scene=1, p_gain=1, p_eq=1, p_band_limit=1, p_reverb=1, p_noise=1, p_resample=1,
                      p_mu_law=0.3, p_bit_depth=1, p_codec=1, p_pitch=1, p_stretch=1, p_source_eq=1)


def white(n: int, seed: int = 0, level: float = 0.1) -> np.ndarray:
    return (level * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)


def tone(freq: float, seconds: float, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(seconds * SR)) / SR)).astype(np.float32)


def burst_scene(onset_s: float = 3.0, seconds: float = 10.0) -> np.ndarray:
    """Silence with one 200 ms 1 kHz burst: its onset must survive scene augmentation."""
    x = np.zeros(int(seconds * SR), np.float32)
    b = tone(1000.0, 0.2)
    x[int(onset_s * SR): int(onset_s * SR) + len(b)] = b
    return x


def onset(x: np.ndarray, rel_db: float = -20.0) -> float:
    """Seconds to the first 2 ms frame whose energy is within ``rel_db`` of the loudest frame."""
    frames = x[: len(x) // 32 * 32].astype(np.float64).reshape(-1, 32)
    e = np.mean(frames**2, axis=1)
    return float(np.argmax(e > e.max() * 10 ** (rel_db / 10)) * 32 / SR)


def band_db(x: np.ndarray, lo: float, hi: float) -> float:
    """Mean power spectral density (Welch) in [lo, hi) Hz, dB."""
    f, p = signal.welch(x.astype(np.float64), SR, nperseg=1024)
    return float(10 * np.log10(np.mean(p[(f >= lo) & (f < hi)]) + 1e-30))


def snr_db(clean: np.ndarray, degraded: np.ndarray) -> float:
    c = clean.astype(np.float64)
    return float(10 * np.log10(np.mean(c**2) / np.mean((degraded.astype(np.float64) - c) ** 2)))


def peak_hz(x: np.ndarray) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x)), 8 * len(x)))
    return float(np.argmax(spec) * SR / (8 * len(x)))


# ---------------------------------------------------------------- chains


@pytest.mark.parametrize("fn", [A.augment_scene, A.augment_source])
def test_same_seed_same_output_and_seeds_differ(fn):
    x = white(3 * SR)
    outs = [fn(x, np.random.default_rng(s), ALL) for s in (1, 1, 2)]
    assert np.array_equal(outs[0], outs[1])
    assert not (len(outs[0]) == len(outs[2]) and np.allclose(outs[0], outs[2]))


def test_scene_chain_is_finite_bounded_same_length_and_leaves_input_alone():
    loud = np.clip(white(10 * SR, level=0.7), -1, 1)  # peaks at 1: every boost must be caught
    bank = [white(SR // 2, seed=9), T.coloured_noise(12 * SR, 2.0, 3) * 0.05]
    before = loud.copy()
    for s in range(12):
        for cfg in (ALL, A.AugmentConfig()):
            y = A.augment_scene(loud, np.random.default_rng(s), cfg, noise_bank=bank)
            assert y.dtype == np.float32 and len(y) == len(loud)
            assert np.all(np.isfinite(y)) and np.max(np.abs(y)) <= 1.0
    assert np.array_equal(loud, before)
    bad = loud.copy()
    bad[[5, 50]] = [np.nan, np.inf]
    assert np.all(np.isfinite(A.augment_scene(bad, np.random.default_rng(0), ALL)))


def test_quiet_scene_keeps_its_level_when_nothing_peaks():
    x = white(10 * SR, level=0.01)
    y = A.apply_chain(x, [A.Step("eq", {"bands": [["peaking", 1000.0, 3.0, 1.0]]})])
    assert abs(10 * np.log10(np.mean(y.astype(float) ** 2) / np.mean(x.astype(float) ** 2))) < 2.0
    assert np.max(np.abs(y)) < 0.2  # not peak-normalised up


def test_scene_chain_keeps_event_onsets():
    x = burst_scene(3.0)
    cfg = dataclasses.replace(ALL, p_noise=0.0, p_telephone=0.5)
    for s in range(10):
        steps = A.draw_scene_chain(np.random.default_rng(s), cfg)
        y = A.apply_chain(x, steps, cfg)
        assert abs(onset(y) - 3.0) <= 0.01, [st.name for st in steps]


def test_drawn_chain_replays_to_the_same_audio():
    x = white(2 * SR)
    steps = A.draw_scene_chain(np.random.default_rng(5), ALL)
    assert {"reverb", "noise", "eq", "band_limit", "gain", "resample", "codec"} <= {s.name for s in steps}
    assert np.array_equal(A.apply_chain(x, steps, ALL), A.augment_scene(x, np.random.default_rng(5), ALL))
    record = json.loads(json.dumps([dataclasses.asdict(s) for s in steps]))  # as a timeline would store it
    assert np.array_equal(A.apply_chain(x, [A.Step(**d) for d in record], ALL), A.apply_chain(x, steps, ALL))


def test_source_chain_changes_length_only_by_stretch():
    x = white(2 * SR)
    cfg = dataclasses.replace(ALL, p_pitch=0.0)
    rng = np.random.default_rng(3)
    steps = A.draw_source_chain(np.random.default_rng(3), cfg)
    factor = next(s.params["factor"] for s in steps if s.name == "stretch")
    assert len(A.augment_source(x, rng, cfg)) == round(len(x) * factor) != len(x)
    for s in range(5):
        assert len(A.augment_source(x, np.random.default_rng(s), ALL, keep_length=True)) == len(x)


def test_config_rejects_bad_values_and_describe_follows_it():
    with pytest.raises(ValueError):
        A.AugmentConfig(p_noise=1.5)
    with pytest.raises(ValueError):
        A.AugmentConfig(snr_db=(20.0, 5.0))
    with pytest.raises(ValueError):
        A.AugmentConfig(resample_hz=(8000, 16000))
    with pytest.raises(ValueError):
        A.AugmentConfig(codecs=("aac",))
    text = A.describe(A.AugmentConfig(p_reverb=0.35, rt60_s=(0.2, 0.6)))
    assert "reverb p=0.35 RT60 0.2–0.6 s" in text and "changes length" in text


# ---------------------------------------------------------------- transforms


def test_band_limit_removes_energy_beyond_the_cutoffs():
    x = white(4 * SR)
    ref = band_db(x, 100, 7900)
    lp = T.band_limit(x, None, 3000.0)
    assert band_db(lp, 6000, 8000) < ref - 30
    assert abs(band_db(lp, 100, 2400) - band_db(x, 100, 2400)) < 1.0
    hp = T.band_limit(x, 400.0, None)
    assert band_db(hp, 20, 200) < ref - 30
    assert abs(band_db(hp, 600, 7000) - band_db(x, 600, 7000)) < 1.0
    tel = T.band_limit(x, 300.0, 3400.0)
    assert band_db(tel, 7000, 8000) < ref - 40 and band_db(tel, 20, 120) < ref - 40


def test_resample_to_8k_and_back_removes_energy_above_4k():
    x = white(4 * SR)
    y = T.resample_roundtrip(x, 8000)
    assert len(y) == len(x)
    assert band_db(y, 4100, 8000) < band_db(x, 4100, 8000) - 50
    assert abs(band_db(y, 100, 3000) - band_db(x, 100, 3000)) < 1.0
    assert abs(onset(T.resample_roundtrip(burst_scene(1.0, 2.0), 11025)) - 1.0) <= 0.002


@pytest.mark.parametrize("bits", [8, 10, 12])
def test_bit_depth_snr_follows_6db_per_bit(bits):
    x = tone(440.3, 1.0, amp=0.5)  # -6 dB re full scale: SNR = 6.02 b + 1.76 - 6.02
    assert abs(snr_db(x, T.quantize(x, bits)) - (6.02 * bits - 4.26)) < 1.5


def test_mu_law_snr_is_about_38db_at_any_level_unlike_linear_8_bit():
    for amp in (0.5, 0.05, 0.01):
        x = tone(440.3, 1.0, amp=amp)
        assert 33.0 < snr_db(x, T.mu_law(x, 8)) < 41.0
    quiet = tone(440.3, 1.0, amp=0.01)
    assert snr_db(quiet, T.quantize(quiet, 8)) < 15.0


def test_reverb_adds_a_decaying_tail_with_the_drawn_rt60():
    x = np.zeros(2 * SR, np.float32)
    x[SR // 2: SR // 2 + 800] = white(800, level=0.3)  # 50 ms burst ending at 0.55 s
    end = SR // 2 + 800
    burst = np.mean(x[SR // 2:end].astype(float) ** 2)
    y = T.reverb(x, rt60=0.5, wet=0.3, seed=1)
    assert len(y) == len(x) and onset(y) == onset(x)

    def after(a, b):
        return 10 * np.log10(np.mean(y[end + int(a * SR): end + int(b * SR)].astype(float) ** 2) / burst)

    assert np.all(x[end:] == 0)
    assert after(0.02, 0.1) > -40  # the tail is there …
    assert after(0.25, 0.35) < after(0.02, 0.1) - 10  # … and decays (≈ 60 dB per 0.5 s)
    impulse = np.zeros(2 * SR, np.float32)
    impulse[0] = 1.0
    h = T.reverb(impulse, rt60=0.5, wet=1.0, seed=2).astype(float)
    edc = 10 * np.log10(np.cumsum((h**2)[::-1])[::-1] / np.sum(h**2))  # Schroeder decay curve
    rt60 = (np.argmax(edc < -35) - np.argmax(edc < -5)) / SR * 2  # T30 extrapolated to 60 dB
    assert abs(rt60 - 0.5) < 0.05


@pytest.mark.parametrize("snr", [0.0, 10.0, 25.0])
@pytest.mark.parametrize("exponent", [0.0, 1.0, 2.0])
def test_coloured_noise_lands_at_the_requested_snr(snr, exponent):
    x = tone(700.0, 2.0, amp=0.1)
    y = T.add_noise(x, T.coloured_noise(len(x), exponent, seed=4), snr)
    assert abs(snr_db(x, y) - snr) < 1.0


def test_noise_bank_recording_lands_at_the_drawn_snr():
    x = tone(700.0, 3.0, amp=0.05)
    bank = [white(SR // 3, seed=7, level=0.2)]  # shorter than the clip: looped
    steps = [A.Step("bank_noise", {"index": 0, "offset": 123, "snr_db": 12.0})]
    assert abs(snr_db(x, A.apply_chain(x, steps, noise_bank=bank)) - 12.0) < 1.0
    with pytest.raises(ValueError):
        A.apply_chain(x, steps)


@pytest.mark.parametrize("exponent", [0.0, 1.0, 2.0])
def test_coloured_noise_has_the_requested_spectral_slope(exponent):
    n = T.coloured_noise(8 * SR, exponent, seed=1)
    f, p = signal.welch(n.astype(np.float64), SR, nperseg=4096)
    keep = (f > 50) & (f < 6000)
    slope = np.polyfit(np.log10(f[keep]), np.log10(p[keep]), 1)[0]
    assert abs(slope + exponent) < 0.15
    assert abs(np.sqrt(np.mean(n.astype(float) ** 2)) - 1.0) < 1e-3


def test_eq_biquads_reach_their_gains():
    def response_db(kind, freq, g, q, at):
        _, h = signal.sosfreqz(T.biquad(kind, freq, g, q), worN=np.asarray(at, float), fs=SR)
        return 20 * np.log10(np.abs(h))

    pk = response_db("peaking", 1000.0, 6.0, 1.0, [1000.0, 50.0, 7500.0])
    assert abs(pk[0] - 6.0) < 0.05 and np.all(np.abs(pk[1:]) < 0.5)
    lo = response_db("low_shelf", 300.0, -6.0, 0.707, [5.0, 7000.0])
    assert abs(lo[0] + 6.0) < 0.1 and abs(lo[1]) < 0.3
    hi = response_db("high_shelf", 3000.0, 4.0, 0.707, [7999.0, 50.0])
    assert abs(hi[0] - 4.0) < 0.2 and abs(hi[1]) < 0.1
    with pytest.raises(ValueError):
        T.biquad("notch", 1000.0, 0.0, 1.0)


@pytest.mark.parametrize("semitones", [3.0, -2.0])
def test_pitch_shift_moves_a_sine_by_the_ratio_and_keeps_length(semitones):
    x = tone(440.0, 1.0)
    y = T.pitch_shift(x, semitones)
    assert len(y) == len(x)
    assert abs(peak_hz(y) / (440.0 * 2 ** (semitones / 12)) - 1) < 0.003
    assert abs(onset(T.pitch_shift(burst_scene(1.0, 2.0), semitones)) - 1.0) < 0.02  # tempo kept, not tape speed


@pytest.mark.parametrize("factor", [0.85, 1.15])
def test_time_stretch_changes_length_and_timing_by_the_factor_not_pitch(factor):
    x = tone(440.0, 1.0)
    y = T.time_stretch(x, factor)
    assert len(y) == round(len(x) * factor)
    assert abs(peak_hz(y) / 440.0 - 1) < 0.003
    z = T.time_stretch(burst_scene(1.0, 2.0), factor)
    assert abs(onset(z) - factor * 1.0) < 0.02


@pytest.mark.parametrize("codec", T.available_codecs())
def test_lossy_codec_degrades_but_keeps_length_and_alignment(codec):
    x = burst_scene(1.0, 2.0) + white(2 * SR, level=0.01)
    y = T.lossy_codec(x, codec, 0.8)
    assert len(y) == len(x) and np.all(np.isfinite(y))
    assert abs(onset(y) - 1.0) <= 0.002
    assert 3.0 < snr_db(x, y) < 60.0  # lossy, but still the same signal


def test_the_default_codecs_are_writable_here():
    # libsndfile ≥ 1.1 writes Vorbis and MP3; if this fails the default chain silently loses its codec step
    assert set(A.AugmentConfig().codecs) <= set(T.available_codecs())
