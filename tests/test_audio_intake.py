"""Audio intake on real encoded files: every container, every way a file can be bad."""

from __future__ import annotations

import numpy as np
import pytest

from models.audio import AudioError, decode
from tests.helpers import FORMATS, encode, tone


@pytest.mark.parametrize("ext", sorted(FORMATS))
def test_decodes_each_container_to_mono_16k(ext):
    data = encode(tone(2.0, 44_100, channels=2), 44_100, ext)
    clip = decode(data, 16_000, max_duration_s=30)
    assert clip.sample_rate == 16_000 and clip.samples.ndim == 1 and clip.samples.dtype == np.float32
    assert clip.duration_s == pytest.approx(2.0, abs=0.06)
    assert clip.source_channels == 2 and clip.source_sample_rate == 44_100
    assert clip.source_format == FORMATS[ext][0]
    # the tone survives decoding and resampling: energy near the original RMS (0.3/sqrt 2)
    assert np.sqrt(np.mean(clip.samples**2)) == pytest.approx(0.212, rel=0.15)


def test_downmix_averages_channels():
    left = tone(1.0, 16_000, channels=1)
    stereo = np.stack([left, -left], axis=1)  # opposite phase cancels in a true mean
    clip = decode(encode(stereo, 16_000, "wav", "FLOAT"), 16_000)
    assert np.abs(clip.samples).max() < 1e-6


def _code(data: bytes, **kw) -> tuple[int, str]:
    with pytest.raises(AudioError) as err:
        decode(data, 16_000, **kw)
    return err.value.status, err.value.code


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: b"", (400, "empty_audio")),
        (lambda: b"this is plainly not audio" * 40, (415, "unsupported_audio_format")),
        (lambda: b"RIFF\x24\x00\x00\x00WAVEfmt ", (415, "unsupported_audio_format")),
        (lambda: encode(tone(2.0, 16_000, 1), 16_000, "wav")[:20_000], (400, "corrupt_audio")),
        (lambda: encode(tone(2.0, 16_000, 1), 16_000, "flac")[:3_000], (400, "corrupt_audio")),
        (lambda: encode(np.array([0.1, np.nan, 0.2] * 500, np.float32), 16_000, "wav", "FLOAT"), (422, "invalid_samples")),
        (lambda: encode(np.array([0.1, np.inf] * 500, np.float32), 16_000, "wav", "FLOAT"), (422, "invalid_samples")),
        (lambda: encode(np.zeros(0, np.float32), 16_000, "wav"), (400, "empty_audio")),
    ],
    ids=["empty", "text", "header-only", "wav-cut", "flac-cut", "nan", "inf", "no-frames"],
)
def test_bad_files_name_their_problem(make, expected):
    assert _code(make(), max_duration_s=30) == expected


def test_cut_mp3_is_heard_for_what_decodes():
    # MP3 carries no exact length (its header's count is an estimate), so a cut stream is the shorter clip
    data = encode(tone(2.0, 16_000, 1), 16_000, "mp3")
    clip = decode(data[: len(data) // 3], 16_000)
    assert 0.1 < clip.duration_s < 1.5


def test_lying_extension_is_judged_by_content():
    # FLAC bytes that a client calls .wav still decode as what they are
    clip = decode(encode(tone(1.0, 22_050, 1), 22_050, "flac"), 16_000)
    assert clip.source_format == "FLAC"


def test_too_long_is_refused_unless_truncation_is_asked():
    data = encode(tone(3.0, 16_000, 1), 16_000, "ogg")
    assert _code(data, max_duration_s=1.0) == (413, "audio_too_long")
    clip = decode(data, 16_000, max_duration_s=1.0, truncate=True)
    assert clip.duration_s == pytest.approx(1.0, abs=0.01) and "truncated" in clip.flags


def test_digital_silence_is_accepted_but_flagged():
    clip = decode(encode(np.zeros(16_000, np.float32), 16_000, "wav"), 16_000)
    assert clip.flags == ("digital_silence",)
    quiet = decode(encode(tone(1.0, 16_000, 1) * 0.01, 16_000, "wav"), 16_000)
    assert "digital_silence" not in quiet.flags


@pytest.mark.parametrize("frames", [1, 100, 3_840])
def test_very_short_clips_are_padded_to_the_minimum_and_flagged(frames):
    from models.audio import MIN_AUDIO_S

    clip = decode(encode(tone(1.0, 16_000, 1)[:frames], 16_000, "wav"), 16_000)
    assert clip.duration_s == MIN_AUDIO_S and "padded" in clip.flags
    assert np.all(clip.samples[frames + 16:] == 0)  # trailing silence, the heard part first


def test_more_channels_than_surround_are_refused():
    from models.audio import MAX_CHANNELS

    ok = decode(encode(np.full((16_000, MAX_CHANNELS), 0.1, np.float32), 16_000, "flac"), 16_000)
    assert ok.source_channels == MAX_CHANNELS
    assert _code(encode(np.full((16_000, MAX_CHANNELS + 1), 0.1, np.float32), 16_000, "wav")) == (422, "too_many_channels")


@pytest.mark.parametrize("rate", [16_000, 22_050, 44_100])
def test_huge_finite_samples_are_refused_before_they_turn_into_nan(rate):
    assert _code(encode(np.full(rate, 3.4e38, np.float32), rate, "wav", "FLOAT")) == (422, "invalid_samples")
    loud = decode(encode(np.full(rate, 1.5, np.float32), rate, "wav", "FLOAT"), 16_000)  # past full scale, but a signal
    assert np.isfinite(loud.samples).all() and np.abs(loud.samples).max() <= 1.0


def test_damaged_headers_are_a_4xx_whatever_the_decoder_raises():
    rng = np.random.default_rng(0)
    for ext in ("wav", "flac", "ogg", "mp3"):
        data = encode(tone(0.5, 16_000, 1), 16_000, ext)
        for _ in range(60):  # single bit flips in the first 64 bytes: the headers
            flipped = bytearray(data)
            pos = int(rng.integers(0, min(64, len(data))))
            flipped[pos] ^= 1 << int(rng.integers(0, 8))
            try:
                decode(bytes(flipped), 16_000, max_duration_s=30)
            except AudioError as exc:
                assert 400 <= exc.status < 500
