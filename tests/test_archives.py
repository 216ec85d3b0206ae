"""Sounds inside games' archives, and one recording shipped by two packages.

The readers are checked on archives written here in each format's documented layout, and on the
real OpenSFX catalogue and 0 A.D.-style zip paths of the test packages; the duplicate finder on a
real recording against its own cropped, resampled, quieter copy, and against other recordings.
"""

from __future__ import annotations

import gzip
import io
import struct
import zipfile

import numpy as np
import pytest
import soundfile as sf
import soxr

from train.data import archives as A
from train.data import decoding as D
from train.data import sources as S
from train.data import splits as SP


def _wav(seconds: float = 0.5, freq: float = 440.0) -> bytes:
    t = np.arange(int(16000 * seconds)) / 16000
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _c4group(entries: dict[str, bytes | dict]) -> bytes:
    """An uncompressed group: scrambled 204-byte header, 316-byte entries, then the members' bytes."""
    body, table, offset = b"", b"", 0
    for name, value in entries.items():
        data = _c4group(value) if isinstance(value, dict) else value
        table += name.encode().ljust(A.C4_NAME, b"\0") + struct.pack("<5i", 0, isinstance(value, dict), len(data), 0, offset)
        table += b"\0" * (A.C4_ENTRY - A.C4_NAME - 20)
        body += data
        offset += len(data)
    header = A.C4_ID.ljust(28, b"\0") + struct.pack("<iii", 1, 2, len(entries))
    return A.c4_scramble(header.ljust(A.C4_HEADER, b"\0")) + table + body


def test_c4group_reads_a_file_inside_nested_groups(tmp_path):
    wind, bird = _wav(0.3, 300), _wav(0.2, 3000)
    raw = _c4group({"Environment.ocg": {"WindLoop.wav": wind, "Birds.ocg": {"Song.wav": bird}}, "Version.txt": b"8"})
    packed = gzip.compress(raw)
    (tmp_path / "Sound.ocg").write_bytes(A.C4_MAGIC + packed[2:])
    assert A.read_member("c4group:/Sound.ocg!Environment.ocg/WindLoop.wav", tmp_path) == wind
    assert A.read_member("c4group:/Sound.ocg!Environment.ocg/Birds.ocg/Song.wav", tmp_path) == bird
    with pytest.raises(A.ArchiveError):
        A.read_member("c4group:/Sound.ocg!Environment.ocg/Missing.wav", tmp_path)
    (tmp_path / "Plain.ocg").write_bytes(packed)  # a plain gzip is not a C4Group
    with pytest.raises(A.ArchiveError):
        A.read_member("c4group:/Plain.ocg!Version.txt", tmp_path)


def test_opensfx_entry_is_the_riff_after_its_description():
    wavs = [_wav(0.1), _wav(0.2, 880)]
    descriptions = [b'"Horse". Original "neigh.wav". CC-BY 3.0.\0', b'"Wind".\0']
    table_size = 8 * len(wavs)
    body, table = b"", b""
    for d, w in zip(descriptions, wavs):
        table += struct.pack("<II", (table_size + len(body)) | 0x80000000, len(w))
        body += bytes([len(d)]) + d + w
    cat = table + body
    assert A.opensfx_entry(cat, 1) == wavs[1]
    assert A.opensfx_description(cat, 0).startswith('"Horse"')
    with pytest.raises(A.ArchiveError):
        A.opensfx_entry(cat, 2)
    with pytest.raises(A.ArchiveError):  # an entry cut short is refused, not decoded as a shorter sound
        A.opensfx_entry(cat[:-10], 1)


def test_zip_member_and_the_file_a_row_needs_unpacked(tmp_path):
    wav = _wav()
    with zipfile.ZipFile(tmp_path / "public.zip", "w") as z:
        z.writestr("audio/ambient/wind.wav", wav)
    assert A.read_member("zip:/public.zip!audio/ambient/wind.wav", tmp_path) == wav
    with pytest.raises(A.ArchiveError):
        A.read_member("zip:/public.zip!audio/none.wav", tmp_path)
    assert A.archive_file("zip:/usr/share/x/public.zip!audio/a.ogg") == "/usr/share/x/public.zip"
    assert A.archive_file("/usr/share/sounds/a.ogg") == "/usr/share/sounds/a.ogg"


def test_real_opensfx_package_unpacks_only_its_catalogue_and_decodes(small_roots):
    root = small_roots["openttd-opensfx"]
    files = [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert [p.name for p in files] == ["opensfx.cat"]  # the selective unpack took the one file the rows need
    clips, _ = S.labelled_sources(["openttd-opensfx"])
    assert len(clips) >= 20 and len({c.group for c in clips}) == len(clips)  # every entry is its own recording
    paths, skipped, durations = D.decode_sources(clips, small_roots, progress=False, workers=1)
    assert len(paths) == len(clips), skipped
    helicopter = next(c for c in clips if c.path.endswith("!24"))
    assert helicopter.label == "Aircraft" and durations[helicopter.id] == pytest.approx(2.468, abs=0.01)


def test_cross_package_duplicate_found_through_crop_resampling_and_gain(small_roots):
    clips, _ = S.labelled_sources(S.SMALL_PACKAGES)
    paths, _, durations = D.decode_sources(clips, small_roots, progress=False, workers=1)
    long_ones = [c for c in clips if c.id in paths and durations[c.id] >= 4.0 and c.label != "Speech"]
    assert len(long_ones) >= 3
    original = long_ones[0]
    x = np.load(paths[original.id])
    copy = soxr.resample(soxr.resample(x[int(0.8 * 16000):], 16000, 8000), 8000, 16000) * 0.25
    twin = S.SourceClip("other.copy", original.label, original.kind, "another-game", "/copy.wav", "another-game::copy")
    profiles = {c.id: SP.frame_profile(np.load(paths[c.id])) for c in long_ones}
    profiles[twin.id] = SP.frame_profile(copy.astype(np.float32))
    found = SP.cross_package_duplicates([*long_ones, twin], profiles)
    assert [(a, b) for a, b, _ in found if twin.id in (a, b)] == [(original.id, twin.id)]
    # recordings of other packages are not taken for copies, even relabelled as one class (within one
    # package, loops cut from one session may well be one recording: minetest's fire_large and fire_1)
    same_label = [S.SourceClip(c.id, "X", c.kind, c.package + str(i), c.path, c.group) for i, c in enumerate(long_ones)]
    package = {c.id: c.package for c in long_ones}
    assert [(a, b) for a, b, _ in SP.cross_package_duplicates(same_label, profiles) if package[a] != package[b]] == []


def test_recording_components_merge_duplicates_across_groups():
    a = S.SourceClip("a", "Dog", "real", "p1", "/a.wav", "p1::a")
    b = S.SourceClip("b", "Dog", "real", "p2", "/b.wav", "p2::b")
    c = S.SourceClip("c", "Dog", "real", "p2", "/c.wav", "p2::c")
    comp = SP.recording_components([a, b, c], [("p1::a", "p2::b")])
    assert comp["a"] == comp["b"] != comp["c"]
    split = SP.assign_splits([a, b, c], [("p1::a", "p2::b")])
    assert split["a"] == split["b"]
