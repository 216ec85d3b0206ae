"""End-to-end corpus build on a real small subset (minetest-data, bucklespring-data, scratch).

The packages are fetched with apt-get into $EARWITNESS_CACHE (or ~/.cache/earwitness); the
build, its labels, splits, pairs and determinism are then checked against the audio itself.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from models.cache import cache_dir
from train.data import decoding as D
from train.data import fetching as F
from train.data import mixer as M
from train.data import sources as S
from train.data import splits as SP
from train.data.build import build_corpus
from train.data.formats import read_audiotime_json, read_strong_tsv
from train.data.ontology import load_ontology
from train.data.prefs import COLUMNS, KINDS, load_pairs
from train.data.qa import GENERIC_PHRASES, read_qa_rows

from tests.conftest import N_TRAIN, SEED, fetchable


pytestmark = pytest.mark.skipif(not fetchable(), reason="apt-get/dpkg-deb unavailable and no cached packages")


@pytest.fixture(scope="session")
def corpus_again(small_roots, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus2") / "c"
    build_corpus(out, n_train=N_TRAIN, seed=SEED, packages=S.SMALL_PACKAGES, progress=False, workers=1)
    return out


@pytest.fixture(scope="session")
def store(corpus) -> M.ClipStore:
    paths = {}
    for line in (corpus / "sources.jsonl").read_text().splitlines():
        d = json.loads(line)
        p = cache_dir() / "clips16k" / f"{d['id']}.npy"
        if p.exists():
            paths[d["id"]] = p
    return M.ClipStore(paths, M.synthetic_beeps())


def _sources(corpus: Path) -> list[dict]:
    return [json.loads(line) for line in (corpus / "sources.jsonl").read_text().splitlines()]


def _timelines(corpus: Path, split: str) -> dict[str, dict]:
    return read_audiotime_json(corpus / "scenes" / split / "timelines.json")


def test_fetch_unpacks_real_audio(small_roots):
    for pkg, root in small_roots.items():
        assert (root / ".complete").exists()
        # OpenTTD ships its sounds inside one catalogue (train/data/archives.py reads it)
        audio = [p for p in root.rglob("*") if p.suffix.lower() in (".wav", ".ogg", ".mp3", ".cat")]
        assert audio, f"{pkg} unpacked without audio files"


def test_layout_and_relative_paths(corpus):
    for rel in ("ontology.json", "sources.jsonl", "report.json", "report.md"):
        assert (corpus / rel).is_file(), rel
    for split in SP.SPLITS:
        tl = _timelines(corpus, split)
        assert tl, f"no scenes in {split}"
        for sid, t in tl.items():
            assert not Path(t["audio"]).is_absolute()
            assert (corpus / t["audio"]).is_file()
            assert t["caption"].endswith(".")
        for row in read_qa_rows(corpus, split):
            assert not Path(row.audio).is_absolute() and (corpus / row.audio).is_file()
    report = json.loads((corpus / "report.json").read_text())
    assert report["splits"]["train"]["scenes"] == N_TRAIN
    labelled, _ = S.labelled_sources(S.SMALL_PACKAGES)
    decoded = len([s for s in _sources(corpus) if s["package"] != "synthetic"])
    assert decoded + sum(report["skipped"]["decode_skipped"].values()) == len(labelled)


def test_events_sit_where_the_labels_say(corpus, store):
    """Re-render each event alone: all of its energy lies inside [onset, offset], and both edges are live."""
    frame = 160
    checked = 0
    for split in SP.SPLITS:
        tl = _timelines(corpus, split)
        strong = read_strong_tsv(corpus / "scenes" / split / "strong.tsv")
        for sid, t in list(tl.items())[:12]:
            scene = M.scene_from_json(t)
            mine = sorted((s.start, s.end, s.label) for s in strong if s.segment_id == sid and s.end - s.start < 10.0)
            assert mine == sorted((round(e.onset, 3), round(e.offset, 3), e.label) for e in scene.events) or all(
                abs(a[0] - b[0]) < 1e-3 and abs(a[1] - b[1]) < 1e-3 and a[2] == b[2]
                for a, b in zip(mine, sorted((e.onset, e.offset, e.label) for e in scene.events)))
            full = M.render(scene, store)
            flac, sr = sf.read(corpus / t["audio"], dtype="float32")
            assert sr == D.SAMPLE_RATE and len(flac) == len(full)
            assert np.max(np.abs(flac - np.clip(full, -1, 1))) < 3 / 32768, "file differs from its timeline"
            for i, e in enumerate(scene.events):
                alone = M.render(scene, store, only=[i]).astype(np.float64)
                a, b = e.onset_sample, e.onset_sample + e.length
                assert np.sum(alone[:a] ** 2) == 0 and np.sum(alone[b:] ** 2) == 0
                inside = np.sum(alone[a:b] ** 2)
                assert inside > 0
                # trimmed to activity: the edge frames (past the 5 ms fade) carry energy
                edge_in = np.sqrt(np.mean(alone[a + 80:a + 80 + frame] ** 2))
                edge_out = np.sqrt(np.mean(alone[b - 80 - frame:b - 80] ** 2))
                peak_rms = max(np.sqrt(np.mean(alone[k:k + frame] ** 2)) for k in range(a, b - frame + 1, frame))
                assert edge_in > peak_rms * 10 ** (-46 / 20) and edge_out > peak_rms * 10 ** (-46 / 20)
                # and in the real mix, a clearly audible event raises the energy where it is labelled
                if e.snr_db >= 12 and len(scene.events) == 1:
                    bed_only = np.concatenate([flac[:a], flac[b:]]).astype(np.float64)
                    assert np.mean(flac[a:b].astype(np.float64) ** 2) > 2 * np.mean(bed_only**2)
                checked += 1
    assert checked >= 20


def test_splits_are_disjoint_by_recording(corpus, store):
    src = _sources(corpus)
    split_of = {s["id"]: s["split"] for s in src}
    groups: dict[str, set[str]] = {}
    for s in src:
        groups.setdefault(s["group"], set()).add(s["split"])
    assert all(len(v) == 1 for v in groups.values()), "a recording group spans splits"
    # no audio near-duplicate crosses a split either
    ids = [s["id"] for s in src]
    fps = np.stack([SP.fingerprint(store.get(i)) for i in ids])
    durs = np.array([s["duration"] for s in src])
    for a, b in SP.duplicate_pairs(fps, durs):
        assert split_of[ids[a]] == split_of[ids[b]], (ids[a], ids[b])
    # scenes only use their own split's sources
    for split in SP.SPLITS:
        for t in _timelines(corpus, split).values():
            used = [e["source_id"] for e in t["events"]] + ([t["background"]["source_id"]] if t["background"]["source_id"] else [])
            assert all(split_of[u] == split for u in used)
    # every source keeps its provenance
    assert all(s["package"] and s["path"] for s in src)


def _phrase_label(onto) -> dict[str, str]:
    return {p: c.name for c in onto for p in c.phrases}


def test_pairs_complete_and_well_formed(corpus):
    onto = load_ontology()
    by_phrase = _phrase_label(onto)
    ds = load_pairs(corpus, "train", absolute_audio=False)
    assert set(COLUMNS) <= set(ds.column_names)
    rows = ds.to_list()
    assert {r["kind"] for r in rows} == set(KINDS), "a pair kind is missing"
    tl = {**_timelines(corpus, "train")}
    by_audio = {t["audio"]: t for t in tl.values()}

    def labels(t):
        return {e["label"] for e in t["events"]} | ({t["background"]["label"]} if t["background"]["label"] else set())

    for r in rows:
        assert r["split"] == "train" and r["scene_id"] in tl and r["prompt"]
        assert (corpus / r["audio"]).is_file() and tl[r["scene_id"]]["audio"] == r["audio"]
        if r["kind"] == "acpo_input_contrastive":
            assert r["chosen"] == r["rejected"] and r["rejected_audio"] and r["rejected_audio"] != r["audio"]
            phrase = next(p for p in sorted(by_phrase, key=len, reverse=True) if p in r["prompt"])
            label = by_phrase[phrase]
            assert label in labels(tl[r["scene_id"]]) and label not in labels(by_audio[r["rejected_audio"]])
        else:
            assert r["chosen"] != r["rejected"] and r["rejected_audio"] is None
        if r["kind"] == "listen_absent":
            phrase = next(p for p in sorted(by_phrase, key=len, reverse=True) if p in r["prompt"])
            assert by_phrase[phrase] not in labels(tl[r["scene_id"]])
            assert r["chosen"].startswith("No") and r["rejected"].startswith("Yes")
        if r["kind"].startswith("aha_") and r["prompt"].startswith("Describe"):
            assert r["chosen"] == tl[r["scene_id"]]["caption"]


def test_qa_answers_match_timelines(corpus):
    onto = load_ontology()
    tl = _timelines(corpus, "train")
    rows = read_qa_rows(corpus, "train")
    assert {r.sampling for r in rows if r.kind == "presence"} == {"positive", "random", "popular", "adversarial"}
    assert {"presence", "order", "count", "duration", "caption"} <= {r.kind for r in rows}
    for r in rows:
        t = tl[r.scene_id]
        present = {e["label"] for e in t["events"]} | ({t["background"]["label"]} if t["background"]["label"] else set())
        if r.kind == "presence":
            assert (r.answer == "Yes") == (r.label in present) == (r.sampling == "positive")
            # present or absent, the same generic wording: the phrase must not give the answer away
            assert r.phrase in onto[r.label].phrases[:GENERIC_PHRASES] and r.phrase in r.question
            if r.sampling == "adversarial":
                related = set().union(*({*onto[p].siblings, *onto[p].cooccurs} for p in present))
                assert r.label in related
        elif r.kind == "count":
            assert int(r.answer) == sum(e["label"] == r.label for e in t["events"])
        elif r.kind == "order" and r.question.startswith("Which"):
            first = min((e for e in t["events"] if e["label"] in (r.label, r.other_label)), key=lambda e: e["onset"])
            assert first["label"] == r.label
        elif r.kind == "duration":
            e = next(e for e in t["events"] if e["label"] == r.label)
            assert abs(float(r.answer) - (e["offset"] - e["onset"])) <= 0.051


def _digest(root: Path, pattern: str) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.glob(pattern))}


def test_same_seed_same_corpus(corpus, corpus_again):
    """Two builds (2 workers vs 1) with one seed give identical audio, labels, questions and pairs."""
    for pattern in ("scenes/*/*.flac", "scenes/*/*.tsv", "scenes/*/*.json", "qa/*.jsonl", "sources.jsonl"):
        a, b = _digest(corpus, pattern), _digest(corpus_again, pattern)
        assert a and a == b, pattern
    for split in SP.SPLITS:
        assert load_pairs(corpus, split, False).to_list() == load_pairs(corpus_again, split, False).to_list()


def test_other_seed_other_scenes_same_splits(small_roots, corpus, tmp_path):
    out = tmp_path / "c3"
    build_corpus(out, n_train=8, n_validation=2, n_test=2, seed=SEED + 1, packages=S.SMALL_PACKAGES, progress=False)
    assert (out / "sources.jsonl").read_text() == (corpus / "sources.jsonl").read_text()
    a = _timelines(corpus, "train")
    b = _timelines(out, "train")
    assert [t["events"] for t in list(a.values())[:8]] != [t["events"] for t in b.values()]


def test_cli_register_and_build(small_roots, tmp_path):
    import argparse

    from train import cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "build", "--out", str(tmp_path / "x"), "--scenes", "4", "--seed", "3"])
    assert args.command == "data" and args.data_command == "build" and args.scenes == 4 and args.seed == 3
    rc = cli.main(["data", "build", "--out", str(tmp_path / "x"), "--scenes", "4", "--seed", "3", "--no-progress",
                   "--packages", *S.SMALL_PACKAGES])
    assert rc == 0 and (tmp_path / "x" / "report.md").is_file()
    assert len(list((tmp_path / "x" / "scenes" / "train").glob("*.flac"))) == 4


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for apt-get update fallback")
def test_fetch_refuses_unlisted_packages(tmp_path):
    with pytest.raises(F.FetchError):
        F.fetch_package("cowsay", tmp_path)
