"""Teacher labels for unlabelled recordings: listing, deduplication, calibration, and the teacher scenes' corpus."""

from __future__ import annotations

import csv
import json

import numpy as np
import soundfile as sf

from train import teacher as T
from train.data import splits as SP


def _table(path, rows):
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["label", "kind", "package", "path", "duration_s", "sample_rate"])
        w.writeheader()
        for pkg, p in rows:
            w.writerow({"label": "Dog", "kind": "real", "package": pkg, "path": p, "duration_s": 1, "sample_rate": 16000})


def test_unlabelled_files_are_the_audio_files_no_list_names(tmp_path):
    root = tmp_path / "pkg"
    for rel in ("usr/share/a/bark.wav", "usr/share/a/meow.OGG", "usr/share/a/icon.png", "usr/share/b/bark2.wav"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    table = tmp_path / "t.csv"
    _table(table, [("pkg", "/usr/share/a/bark.wav"), ("other", "/usr/share/b/bark2.wav")])
    found = T.unlabelled_files({"pkg": root}, tables=(table,))
    assert sorted(c.path for c in found) == ["/usr/share/a/meow.OGG", "/usr/share/b/bark2.wav"]
    assert all(c.package == "pkg" and c.id.startswith("pkg.") for c in found)


def _noise(seed, n=16000):
    rng = np.random.default_rng(seed)
    return (rng.normal(0, 0.1, n) * np.hanning(n)).astype(np.float32)


def _row(i, samples, sha, group, reason=None):
    return {"id": f"u{i}", "package": "p", "path": f"/u{i}.wav", "group": group, "sha256": sha, "reason": reason,
            "duration": len(samples) / 16000, "fingerprint": SP.fingerprint(samples).tolist()}


def test_deduplicate_drops_copies_of_labelled_held_out_and_earlier_files():
    train_clip, test_clip = _noise(1), _noise(2)
    labelled = [{"id": "l1", "split": "train", "group": "g-train", "sha256": "A", "duration": 1.0, "fingerprint": SP.fingerprint(train_clip)},
                {"id": "l2", "split": "test", "group": "g-test", "sha256": "B", "duration": 1.0, "fingerprint": SP.fingerprint(test_clip)}]
    fresh = _noise(3)
    rows = [
        _row(0, fresh, "C", "g0"),                  # kept
        _row(1, fresh * 0.5, "D", "g1"),            # the same sound at another gain as row 0
        _row(2, _noise(4), "A", "g2"),              # the bytes of a labelled file
        _row(3, test_clip * 2, "E", "g3"),          # sounds like a labelled test file
        _row(4, _noise(5), "F", "g-test"),          # a take of a held-out recording group
        _row(5, _noise(6), "C", "g5"),              # the bytes of row 0
        _row(6, _noise(7), None, "g6", reason="shorter than 0.3 s"),
        _row(7, _noise(8), "G", "g7"),              # kept
    ]
    kept, dropped = T.deduplicate(rows, labelled)
    assert [r["id"] for r in kept] == ["u0", "u7"]
    assert dropped == {"sounds like another unlabelled file": 1, "same bytes as a labelled file": 1,
                       "sounds like a labelled validation/test file": 1, "a take of a validation/test recording": 1,
                       "same bytes as another unlabelled file": 1, "shorter than 0.3 s": 1}


def test_teacher_calibration_keeps_confident_tops_at_the_target_precision():
    rng = np.random.default_rng(0)
    n, c = 400, 6
    labels = rng.integers(0, c, n)
    members = rng.normal(0, 1, (n, 2, c)).astype(np.float32)
    margin = rng.uniform(0, 4, n)  # a clear top where the margin is large; noise decides where it is small
    members[np.arange(n), :, labels] += margin[:, None]
    audioset = rng.normal(0, 1, (n, 10)).astype(np.float32)
    columns = np.array([0, 1, -1, 3, 4, -1])
    cal = T.calibrate_teacher(members, audioset, labels, columns, [0.5, 0.5], target=0.95)
    got = T.precision_at(cal, members, audioset, labels, columns)
    assert got["precision"] >= 0.95 and 0.1 < got["coverage"] < 1.0
    assert got["top1"] < got["precision"]  # the threshold buys precision with coverage
    _, conf = cal.read(members, audioset, columns)
    assert np.corrcoef(conf, margin)[0, 1] > 0.5  # confidence follows how clear the top class is


def test_join_feature_caches_appends_teacher_rows_in_reader_order(tmp_path):
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    for base, names, value in ((a, ["train-00000", "train-00001"], 1.0), (b, ["train-t00000"], 2.0)):
        d = base / "features" / "yamnet"
        d.mkdir(parents=True)
        np.save(d / "train.v0.last.npy", np.full((len(names), 3, 4), value, np.float16))
        (d / "train.v0.json").write_text(json.dumps({"rows": {k: i for i, k in enumerate(names)}, "encoder": "yamnet"}))
    np.save(a / "features" / "yamnet" / "test.v0.last.npy", np.zeros((1, 3, 4), np.float16))
    T.join_feature_caches(a, b, out, [("yamnet", 0)])
    joined = np.load(out / "features" / "yamnet" / "train.v0.last.npy")
    rows = json.loads((out / "features" / "yamnet" / "train.v0.json").read_text())
    assert rows["rows"] == {"train-00000": 0, "train-00001": 1, "train-t00000": 2} and rows["encoder"] == "yamnet"
    assert joined.shape == (3, 3, 4) and joined[2].min() == 2 and joined[:2].max() == 1
    assert (out / "features" / "yamnet" / "test.v0.last.npy").is_symlink()


def test_teacher_corpus_adds_marked_train_scenes_and_keeps_held_out_splits(corpus, tmp_path):
    from train.data.formats import read_timelines

    clips = tmp_path / "clips"
    clips.mkdir()
    chosen = []
    for i, label in enumerate(["Dog", "Dog", "Speech"]):
        np.save(clips / f"t{i}.npy", _noise(10 + i, 24000))
        chosen.append({"id": f"t{i}", "package": "minetest-data", "path": f"/t{i}.ogg", "group": f"g{i}", "duration": 1.5,
                       "label": label, "teacher_p": 0.95, "teacher_top5": [[label, 3.0]]})
    out = tmp_path / "ct"
    mixed = T.build_teacher_corpus(corpus, out, chosen, clips, scenes=6, seed=1, progress=False)
    assert mixed["scenes"] == 6 and mixed["teacher_events"] >= 1
    tl = read_timelines(out, "train")
    base = read_timelines(corpus, "train")
    assert set(base) < set(tl) and len(tl) == len(base) + 6
    made = {k: v for k, v in tl.items() if k.startswith("train-t")}
    assert all(t["labels"] == "teacher" for t in made.values())
    marked = [e for t in made.values() for e in t["events"] if "teacher" in e]
    assert marked and all(e["source_id"] in {"t0", "t1", "t2"} and e["teacher"] == 0.95 for e in marked)
    assert all(sf.info(out / t["audio"]).duration == 10.0 for t in made.values())
    assert read_timelines(out, "test") == read_timelines(corpus, "test")
    assert (out / "scenes" / "test").is_symlink() and (out / "qa").is_symlink()
    sources = [json.loads(line) for line in (out / "sources.jsonl").read_text().splitlines()]
    teacher_rows = [r for r in sources if r.get("teacher")]
    assert {r["id"] for r in teacher_rows} == {"t0", "t1", "t2"} and {r["split"] for r in teacher_rows} == {"train"}


def test_held_out_packages_are_chosen_by_labelled_sources_only(tmp_path):
    from train.frozen_features import held_out_packages

    rows = [{"package": "a", "label": "Dog"}, {"package": "a", "label": "Cat"}, {"package": "b", "label": "Dog"}]
    rows += [{"package": "b", "label": c, "teacher": True} for c in ("Bell", "Rain", "Wind")]  # teacher labels add no class
    (tmp_path / "sources.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert held_out_packages(tmp_path, count=1) == ["a"]
