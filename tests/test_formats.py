"""Readers/writers for AudioCaps, Clotho, AudioSet strong, AudioTime and Qt rcc, on fixtures written here."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from models.audio import decode
from train.data.formats import (
    StrongLabel, read_audiocaps_csv, read_audiotime_json, read_clotho_csv, read_strong_tsv,
    read_timelines, timeline_strong_labels, write_audiocaps_csv, write_audiotime_json, write_clotho_csv, write_strong_tsv,
)
from tests.helpers import write_user_datasets
from train.data.ontology import load_ontology
from train.data.rcc import RccBundle, RccError, write_rcc


def test_audiocaps_csv_roundtrip(tmp_path):
    path = tmp_path / "audiocaps.csv"
    path.write_text(
        "audiocap_id,youtube_id,start_time,caption\n"
        '91139,r1nicOVtvkQ,130,"A woman talks nearby as water pours"\n'
        "58146,UDGBjjwyaqE,20,Multiple clanging and clanking sounds\n",
        encoding="utf-8",
    )
    rows = read_audiocaps_csv(path)
    assert [r.audio_id for r in rows] == ["r1nicOVtvkQ_130", "UDGBjjwyaqE_20"]
    assert rows[0].caption == "A woman talks nearby as water pours" and rows[0].start_time == 130.0
    out = tmp_path / "out.csv"
    write_audiocaps_csv(out, [(1, "abc", 5, "A dog barks, then a door closes.")])
    again = read_audiocaps_csv(out)
    assert again[0].audio_id == "abc_5" and again[0].caption == "A dog barks, then a door closes."


def test_clotho_csv_flattens_five_captions(tmp_path):
    path = tmp_path / "clotho_captions_development.csv"
    path.write_text(
        "file_name,caption_1,caption_2,caption_3,caption_4,caption_5\n"
        'rain.wav,Rain falls on a roof.,"Rain, steady and loud.",Water drips.,A storm.,Rain pours down.\n'
        "dog.wav,A dog barks.,A dog barks twice.,,,\n",
        encoding="utf-8",
    )
    rows = read_clotho_csv(path)
    assert len(rows) == 7
    assert [r.caption for r in rows if r.audio_id == "dog.wav"] == ["A dog barks.", "A dog barks twice."]
    assert rows[1].caption == "Rain, steady and loud."
    out = tmp_path / "w.csv"
    write_clotho_csv(out, {"a.wav": ["one", "two"]})
    assert [r.caption for r in read_clotho_csv(out)] == ["one", "two"]


def test_strong_tsv_roundtrip_and_mid_mapping(tmp_path):
    released = tmp_path / "audioset_eval_strong.tsv"
    released.write_text(
        "segment_id\tstart_time_seconds\tend_time_seconds\tlabel\n"
        "YxAbC_30000\t0.000\t1.250\t/m/0bt9lr\n"
        "YxAbC_30000\t2.000\t10.000\t/m/06mb1\n",
        encoding="utf-8",
    )
    rows = read_strong_tsv(released, mid_to_name={"/m/0bt9lr": "Dog", "/m/06mb1": "Rain"})
    assert rows == [StrongLabel("YxAbC_30000", 0.0, 1.25, "Dog"), StrongLabel("YxAbC_30000", 2.0, 10.0, "Rain")]
    ours = tmp_path / "strong.tsv"
    write_strong_tsv(ours, rows)
    assert read_strong_tsv(ours) == rows
    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tb\n1\t2\n")
    with pytest.raises(ValueError):
        read_strong_tsv(bad)


def test_audiotime_json_roundtrip_and_validation(tmp_path):
    tl = {"s1": {"caption": "A dog barks, then rain falls.", "duration": 10.0,
                 "events": [{"label": "Dog", "onset": 0.5, "offset": 1.2}, {"label": "Dog", "onset": 3.0, "offset": 3.4}],
                 "background": {"label": "Rain"}, "ordering": ["Dog"], "counts": {"Dog": 2}, "durations": {"Dog": 1.1}}}
    path = tmp_path / "timelines.json"
    write_audiotime_json(path, tl)
    assert read_audiotime_json(path) == tl
    strong = timeline_strong_labels("s1", tl["s1"])
    assert [(s.label, s.start, s.end) for s in strong] == [("Rain", 0.0, 10.0), ("Dog", 0.5, 1.2), ("Dog", 3.0, 3.4)]
    tl["s1"]["events"][0]["offset"] = 0.1  # offset before onset
    path.write_text(json.dumps(tl))
    with pytest.raises(ValueError):
        read_audiotime_json(path)


def _wav_bytes(seconds: float = 0.6, sr: int = 22050) -> bytes:  # longer than intake pads a short clip to
    t = np.arange(int(seconds * sr)) / sr
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), sr, format="WAV")
    return buf.getvalue()


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("version", [1, 2])
def test_rcc_reader_reads_what_the_writer_packed(compress, version):
    wav = _wav_bytes()
    blob = write_rcc({"knock.wav": wav, "notes.txt": b"hello"}, compress=compress, version=version)
    bundle = RccBundle(blob)
    entries = {e.path: e for e in bundle.entries()}
    assert set(entries) == {"knock.wav", "notes.txt"}
    assert entries["knock.wav"].compression == ("zlib" if compress else "none")
    assert entries["knock.wav"].read() == wav
    clip = decode(entries["knock.wav"].read(), 16000)  # and it decodes like any upload
    assert abs(clip.duration_s - 0.6) < 0.01 and "padded" not in clip.flags


def test_rcc_rejects_garbage_and_reports_zstd():
    with pytest.raises(RccError):
        RccBundle(b"RIFF" + b"\0" * 40)
    blob = bytearray(write_rcc({"a.wav": b"xyz"}, version=2))
    # flip the entry's flags to "zstd-compressed": tree node 1 starts 22 bytes after the tree offset
    tree = struct.unpack(">I", blob[8:12])[0]
    blob[tree + 22 + 4: tree + 22 + 6] = struct.pack(">H", 0x04)
    entry = next(iter(RccBundle(bytes(blob)).entries()))
    assert entry.compression == "zstd"
    try:
        import zstandard  # noqa: F401
    except ImportError:
        with pytest.raises(RccError, match="zstd"):
            entry.read()
    else:
        with pytest.raises(RccError):
            entry.read()  # b"xyz" is not a zstd frame


# ------------------------------------------------------------------------------------------ a user's AudioCaps / Clotho


@pytest.fixture()
def user_datasets(tmp_path):
    """Tiny AudioCaps and Clotho directories in their published layouts, their audio synthesised (tests/helpers.py)."""
    return write_user_datasets(tmp_path)


def test_a_users_audiocaps_and_clotho_become_a_corpus_the_stages_read(user_datasets, tmp_path):
    """``earwitness data import``: their own splits, every caption, presence questions from the captions' mentions
    mapped onto the ontology, absent sounds outside what is mentioned and related, LISTEN and ACPO pairs (no AHA:
    captions carry no timing), audio decoded to 16 kHz mono; the stages' readers take it."""
    from earwitness.cli import main
    from train.data.prefs import load_pairs
    from train.data.qa import read_qa_rows
    from train.listen import ListenConfig, listen_rows
    from train.stages import corpus_fingerprint

    caps, clotho = user_datasets
    out = tmp_path / "corpus"
    assert main(["data", "import", "--audiocaps", str(caps), "--clotho", str(clotho), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["skipped"]["audio_missing"] == {"audiocaps": 1, "clotho": 0}
    assert {s: d["scenes"] for s, d in report["splits"].items()} == {"train": 3, "validation": 2, "test": 2}

    rows = {s: read_qa_rows(out, s) for s in ("train", "validation", "test")}
    timelines = {s: read_timelines(out, s) for s in rows}
    by_caption = {t["caption"]: t for tl in timelines.values() for t in tl.values()}
    mentioned = {c: sorted(e["label"] for e in t["events"]) for c, t in by_caption.items()}
    assert mentioned["A dog barks while a man speaks"] == ["Dog", "Speech"]
    assert mentioned["Rain falls on a metal roof"] == ["Rain"]
    assert mentioned["A bell rings twice"] == ["Bell"] and by_caption["A bell rings twice"]["captions"] == ["A bell rings twice", "Church bells ringing"]
    assert mentioned["A machine whirs steadily"] == []  # nothing the ontology names
    assert mentioned["Birds chirping in a park."] == ["Bird", "Wind"] and mentioned["A door creaks open."] == ["Door"]
    assert mentioned["Someone typing on a keyboard."] == ["Typing"]
    assert by_caption["Birds chirping in a park."]["audio"].startswith("scenes/train/clotho-")  # development -> train
    assert by_caption["Someone typing on a keyboard."]["audio"].startswith("scenes/test/")  # evaluation -> test

    onto = load_ontology(out / "ontology.json")
    for split, split_rows in rows.items():
        for r in split_rows:
            t = timelines[split][r.scene_id]
            present = {e["label"] for e in t["events"]}
            if r.kind == "caption":
                assert r.answer in t["captions"]
            elif r.sampling == "positive":
                assert r.label in present and r.answer == "Yes"
            else:  # absent: neither mentioned nor confused or heard with what is
                related = present.union(*(set(onto[p].siblings) | set(onto[p].cooccurs) for p in present))
                assert r.answer == "No" and r.label not in related, (r.label, present)
        assert {r.kind for r in split_rows} == {"caption", "presence"}
    assert sum(r.kind == "caption" for r in rows["train"]) == 1 + 1 + 5  # AudioCaps train: 1 caption a clip; Clotho: 5

    for name, t in by_caption.items():
        info = sf.info(out / t["audio"])
        assert (info.samplerate, info.channels) == (16_000, 1) and info.duration == pytest.approx(t["duration"], abs=1e-3)
    assert by_caption["Birds chirping in a park."]["duration"] == pytest.approx(20.0, abs=0.01)

    kinds = {p["kind"] for s in rows for p in load_pairs(out, s)}
    assert {"listen_absent", "acpo_output_contrastive", "acpo_input_contrastive"} <= kinds and not any(k.startswith("aha") for k in kinds)
    listen = listen_rows(out, "train", ListenConfig())
    assert len(listen) == sum(r.kind == "presence" for r in rows["train"]) and all(Path(r["audio"]).is_file() for r in listen)
    assert corpus_fingerprint(out)
