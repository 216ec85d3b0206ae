"""Teacher labels for the recordings nobody labelled (noisy student), and the training scenes made of them.

The listed packages hold far more audio files than the labelled file lists name. This module

1. lists every audio file of the unpacked packages that no file list labels (:func:`unlabelled_files`);
2. surveys them once (:func:`survey`): bytes hash, decode through the server's decoder, drop what is shorter than
   :data:`MIN_S`, fingerprint, and keep the decoded clip (resumable shards);
3. drops near-duplicates (:func:`deduplicate`): the same bytes or the same sound (``train.data.splits.fingerprint``)
   as a labelled file or as an earlier unlabelled one, and any take of a validation / test recording group, so
   that nothing held out is heard in training through a copy;
4. labels what is left with the teacher (:func:`label_clips`): YAMNet's 521 AudioSet outputs and the fused
   verifier's calibrated logits, resumable shards of :data:`SHARD` clips; the labelled validation and test files are
   labelled the same way, to set the teacher's weights and confidence threshold on validation
   (:func:`calibrate_teacher`) and to measure its precision there and on test;
5. mixes the confident ones into training scenes of a corpus copy (:func:`build_teacher_corpus`), recorded as
   ``teacher`` labels in the timelines and ``sources.jsonl``; validation and test stay the labelled corpus's own.

The teacher hears each file with the fused verifier's clip-hearing members (the YAMNet and aiSFX heads): the
Whisper member pads every clip to its 10 s window, which would cost more than the other two together on files that
mostly last a second or two.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from models.audio import AudioError, decode
from models.cache import cache_dir
from models.pretrained.parts import part_file
from models.verifier.checkpoint import load_embedded
from train.data import mixer as M
from train.data import sources as S
from train.data import splits as SP
from train.data.decoding import MAX_SOURCE_S, SAMPLE_RATE, active_region
from train.data.archives import is_archived
from train.data.build import BED_MIN_S
from train.data.decoding import read_source_bytes
from train.data.formats import read_timelines, timeline_strong_labels, write_audiotime_json, write_strong_tsv
from train.data.ontology import load_ontology
from train.data.qa import caption
from train.features import aisfx_features, yamnet_features
from train.metrics import fit_platt

AUDIO_SUFFIXES = frozenset({".wav", ".ogg", ".oga", ".flac", ".mp3", ".opus", ".au", ".aiff", ".aif", ".voc"})
MIN_S = 0.3  # shorter files are dropped before the teacher hears them
LABEL_S = 10.0  # the teacher hears at most a file's first 10 s (a scene never uses more of one source)
SHARD = 250
#: The fused verifier's members that hear a clip themselves, with the weights the validation split chose for that pair
#: (``loadtests/results/verifier_fusion_subsets.md``).
TEACHER_MEMBERS = (("models/earwitness-verifier-yamnet", 0.5), ("models/earwitness-verifier-aisfx", 0.5))
TARGET_PRECISION = 0.9  # the confidence threshold is the lowest at which validation files' top labels are this precise
PER_CLASS = 120  # teacher files per class at most in the scenes: breadth, not ten thousand spoken words


@dataclass(frozen=True)
class Candidate:
    """An unlabelled file of a listed package."""
    id: str
    package: str
    path: str
    group: str


def labelled_paths(tables=S.SOURCE_TABLES) -> set[tuple[str, str]]:
    """``(package, path)`` of every file a file list names (labelled or excluded by a label rule alike)."""
    return {(row["package"], row["path"]) for row in S.table_rows(tables)}


def unlabelled_files(roots: dict[str, Path], tables=S.SOURCE_TABLES) -> list[Candidate]:
    """Every plain audio file under the packages' unpacked roots that no file list names."""
    named = labelled_paths(tables)
    out = []
    for package in sorted(roots):
        root = Path(roots[package])
        for f in sorted(root.rglob("*")):
            if f.suffix.lower() not in AUDIO_SUFFIXES or not f.is_file():
                continue
            path = "/" + f.relative_to(root).as_posix()
            if (package, path) not in named:
                out.append(Candidate(S.clip_id(package, path), package, path, S.recording_group(package, path)))
    return out


def survey_one(c: Candidate, root: Path, clips: Path) -> dict:
    """Hash, decode (the server's decoder, cut at ``MAX_SOURCE_S``), length and fingerprint of one file; its clip kept
    under ``clips``. ``reason`` says why it was dropped, if it was."""
    row = {**asdict(c), "sha256": None, "duration": 0.0, "reason": None}
    try:
        data = (Path(root) / c.path.lstrip("/")).read_bytes()
    except OSError:
        return {**row, "reason": "unreadable"}
    row["sha256"] = hashlib.sha256(data).hexdigest()
    try:
        clip = decode(data, SAMPLE_RATE, max_duration_s=MAX_SOURCE_S, truncate=True)
    except AudioError as exc:
        return {**row, "reason": f"decode: {exc.code}"}
    samples = clip.samples.astype(np.float32)
    row["duration"] = round(len(samples) / SAMPLE_RATE, 3)
    region = active_region(samples)
    if "digital_silence" in clip.flags or region is None:
        return {**row, "reason": "silent"}
    if len(samples) < MIN_S * SAMPLE_RATE or region[1] - region[0] < SAMPLE_RATE // 20:
        return {**row, "reason": f"shorter than {MIN_S} s"}
    np.save(clips / f"{c.id}.npy", samples)
    row["fingerprint"] = SP.fingerprint(samples).tolist()
    return row


def survey(cands: list[Candidate], roots: dict[str, Path], out: Path, progress: bool = True) -> list[dict]:
    """:func:`survey_one` of every candidate, in resumable shards (``out/survey/NNNN.jsonl``)."""
    (out / "survey").mkdir(parents=True, exist_ok=True)
    (out / "clips").mkdir(exist_ok=True)
    rows = []
    shard_n = 1000
    with tqdm(total=len(cands), desc="survey", unit="file", disable=not progress, mininterval=10) as bar:
        for k in range(0, len(cands), shard_n):
            path = out / "survey" / f"{k // shard_n:04d}.jsonl"
            if not path.exists():
                part = [survey_one(c, roots[c.package], out / "clips") for c in cands[k:k + shard_n]]
                tmp = path.with_suffix(".tmp")
                tmp.write_text("".join(json.dumps(r) + "\n" for r in part))
                os.replace(tmp, path)
            rows += [json.loads(line) for line in path.read_text().splitlines()]
            bar.update(min(shard_n, len(cands) - k))
    return rows


def labelled_prints(corpus: Path, roots: dict[str, Path], clips16k: Path) -> list[dict]:
    """The corpus's labelled sources with their split, group, bytes hash (plain files) and fingerprint."""
    out = []
    for line in (corpus / "sources.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["package"] == "synthetic":
            continue
        plain = not (r["path"].startswith(("rcc:", "cat:")) or is_archived(r["path"]))
        sha = None
        if plain and r["package"] in roots:
            try:
                sha = hashlib.sha256(read_source_bytes(S.SourceClip(r["id"], r["label"], r["kind"], r["package"], r["path"], r["group"]),
                                                       roots[r["package"]])).hexdigest()
            except OSError:
                sha = None
        fp = SP.fingerprint(np.load(clips16k / f"{r['id']}.npy")) if (clips16k / f"{r['id']}.npy").exists() else None
        out.append({**r, "sha256": sha, "fingerprint": fp})
    return out


def _near(fps_a: np.ndarray, dur_a: np.ndarray, fps_b: np.ndarray, dur_b: np.ndarray, threshold: float = 0.97,
          chunk: int = 1024) -> list[np.ndarray]:
    """Per row of ``a``, the rows of ``b`` that sound the same (``train.data.splits.same_sound``), computed in chunks."""
    out = []
    for i in range(0, len(fps_a), chunk):
        hit = SP.same_sound(fps_a[i:i + chunk], dur_a[i:i + chunk], fps_b, dur_b, threshold)
        out += [np.flatnonzero(h) for h in hit]
    return out


def deduplicate(rows: list[dict], labelled: list[dict]) -> tuple[list[dict], Counter]:
    """The surveyed files that are no copy of anything else: not the same bytes or sound as a labelled file or an
    earlier unlabelled one, and no take of a validation / test recording group. Returns them and the drop counts."""
    dropped: Counter = Counter()
    lab_sha = {r["sha256"] for r in labelled if r["sha256"]}
    held_groups = {r["group"] for r in labelled if r["split"] != "train"}
    lab = [r for r in labelled if r["fingerprint"] is not None]
    lab_fp = np.stack([np.asarray(r["fingerprint"], np.float32) for r in lab])
    lab_dur = np.array([r["duration"] for r in lab], np.float64)
    seen_sha, first = set(), []
    for r in rows:
        if r["reason"]:
            dropped[r["reason"]] += 1
        elif r["sha256"] in lab_sha:
            dropped["same bytes as a labelled file"] += 1
        elif r["sha256"] in seen_sha:
            dropped["same bytes as another unlabelled file"] += 1
        elif r["group"] in held_groups:
            dropped["a take of a validation/test recording"] += 1
        else:
            seen_sha.add(r["sha256"])
            first.append(r)
    if not first:
        return [], dropped
    fps = np.stack([np.asarray(r["fingerprint"], np.float32) for r in first])
    dur = np.array([r["duration"] for r in first], np.float64)
    like_labelled = _near(fps, dur, lab_fp, lab_dur)
    like_other = _near(fps, dur, fps, dur)
    kept, gone = [], np.zeros(len(first), bool)
    for i, r in enumerate(first):
        if len(like_labelled[i]):
            held = any(lab[j]["split"] != "train" for j in like_labelled[i])
            dropped["sounds like a labelled " + ("validation/test" if held else "train") + " file"] += 1
            gone[i] = True
        elif any(j < i and not gone[j] for j in like_other[i]):
            dropped["sounds like another unlabelled file"] += 1
            gone[i] = True
        else:
            kept.append(r)
    return kept, dropped


# --------------------------------------------------------------------------- the teacher


def audioset_columns(classes: list[str], onto) -> np.ndarray:
    """Per ontology class, the YAMNet output of its AudioSet id (-1: none)."""


    with open(part_file("yamnet", "class_map.csv"), newline="") as fh:
        mids = [row["mid"] for row in csv.DictReader(fh)]
    col = {m: i for i, m in enumerate(mids)}
    return np.array([col.get(onto[c].mid or "", -1) for c in classes])


class Teacher:
    """The fused verifier's clip-hearing members (:data:`TEACHER_MEMBERS`): per clip, each member's calibrated logit of
    every ontology class, and YAMNet's own 521 AudioSet logits (the maximum over its patches) from the same forward."""
    def __init__(self, members=TEACHER_MEMBERS):
        import torch


        self.verifiers = [load_embedded(Path(d)) for d, _ in members]
        self.weights = np.array([w for _, w in members])
        self.texts = [v.class_texts() for v in self.verifiers]
        self.classes = self.verifiers[0].index.classes

    @staticmethod
    def class_names(members=TEACHER_MEMBERS) -> list[str]:
        """The ontology classes of the teacher's outputs (its first member's), without loading a network."""
        return json.loads((Path(members[0][0]) / "verifier.json").read_text())["classes"]

    def __call__(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(member logits [members, C], AudioSet logits [521])`` of one clip."""
        logits, audioset = [], None
        for v, texts in zip(self.verifiers, self.texts):
            fs = v.scorer.score_frames(samples, texts)
            raw = fs.clip + (v.class_offsets if v.class_offsets is not None else 0)
            logits.append(v.calibration.a * raw + v.calibration.b)
            if fs.audioset is not None:
                audioset = fs.audioset.max(1)
        return np.stack(logits).astype(np.float32), audioset.astype(np.float32)


def label_clips(ids: list[str], clip_path, out: Path, name: str, progress: bool = True) -> dict[str, np.ndarray]:
    """The teacher's outputs for every clip (``clip_path(id)`` → its ``.npy``), in resumable shards
    ``out/<name>-NNNN.npz``; returns ``ids``, ``members [N, m, C]`` and ``audioset [N, 521]`` in ``ids``' order."""
    out.mkdir(parents=True, exist_ok=True)
    teacher = None
    parts = []
    with tqdm(total=len(ids), desc=f"teacher {name}", unit="file", disable=not progress, mininterval=10) as bar:
        for k in range(0, len(ids), SHARD):
            path = out / f"{name}-{k // SHARD:04d}.npz"
            chunk = ids[k:k + SHARD]
            if not path.exists():
                teacher = teacher or Teacher()
                got = [teacher(np.load(clip_path(i))[: int(LABEL_S * SAMPLE_RATE)]) for i in chunk]
                tmp = path.with_suffix(".tmp.npz")
                np.savez(tmp, ids=np.array(chunk), members=np.stack([g[0] for g in got]), audioset=np.stack([g[1] for g in got]))
                os.replace(tmp, path)
            parts.append(np.load(path))
            bar.update(len(chunk))
    if not parts:
        return {"ids": np.array([]), "members": np.zeros((0, len(TEACHER_MEMBERS), 0)), "audioset": np.zeros((0, 521))}
    return {k: np.concatenate([p[k] for p in parts]) for k in ("ids", "members", "audioset")}


@dataclass
class TeacherCalibration:
    """How the teacher reads: ``Σ wᵢ·memberᵢ + alpha·AudioSet`` logit per class; the top class is kept when its
    Platt-calibrated confidence (``a·top + b``) is at least ``threshold`` (chosen on validation files)."""
    alpha: float
    a: float
    b: float
    threshold: float
    weights: list[float]

    def scores(self, members: np.ndarray, audioset: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """``[N, C]`` teacher logits."""
        fused = np.einsum("m,nmc->nc", np.asarray(self.weights), members)
        a = np.where(columns >= 0, audioset[:, np.maximum(columns, 0)], 0.0)
        return fused + self.alpha * a

    def read(self, members, audioset, columns) -> tuple[np.ndarray, np.ndarray]:
        """``(top class index [N], confidence [N])``."""
        s = self.scores(members, audioset, columns)
        top = s.argmax(1)
        return top, 1 / (1 + np.exp(-(self.a * s[np.arange(len(s)), top] + self.b)))


def calibrate_teacher(members: np.ndarray, audioset: np.ndarray, labels: np.ndarray, columns: np.ndarray,
                      weights: list[float], target: float = TARGET_PRECISION) -> TeacherCalibration:
    """On labelled validation files (``labels``: their class indices): ``alpha`` by top-1 accuracy on a 0.1 grid, the
    confidence Platt-fitted to "the top class is the file's label", and the threshold: the lowest confidence at
    which the files above it are ``target`` precise (the highest confidence if none is)."""
    def accuracy(alpha):
        return float((TeacherCalibration(alpha, 1, 0, 0, weights).scores(members, audioset, columns).argmax(1) == labels).mean())

    alpha = max(np.round(np.arange(0, 1.01, 0.1), 2), key=accuracy)
    s = TeacherCalibration(float(alpha), 1, 0, 0, weights).scores(members, audioset, columns)
    top = s.argmax(1)
    correct = (top == labels).astype(np.float32)
    a, b = fit_platt(s[np.arange(len(s)), top], correct)
    conf = 1 / (1 + np.exp(-(a * s[np.arange(len(s)), top] + b)))
    order = np.argsort(-conf)
    precision = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    ok = np.flatnonzero(precision >= target)
    threshold = float(conf[order][ok[-1]]) if len(ok) else float(conf.max())
    return TeacherCalibration(float(alpha), float(a), float(b), threshold, list(weights))


def precision_at(cal: TeacherCalibration, members, audioset, labels, columns) -> dict:
    """Top-1 accuracy, and precision and coverage of the kept (confident) files."""
    top, conf = cal.read(members, audioset, columns)
    keep = conf >= cal.threshold
    return {"files": int(len(labels)), "top1": round(float((top == labels).mean()), 4), "kept": int(keep.sum()),
            "coverage": round(float(keep.mean()), 4), "precision": round(float((top[keep] == labels[keep]).mean()) if keep.any() else float("nan"), 4)}


# --------------------------------------------------------------------------- selection and scenes


def select(calibration: TeacherCalibration, labelled: dict[str, np.ndarray], candidates: dict[str, dict], classes: list[str],
           columns: np.ndarray, per_class: int = PER_CLASS) -> list[dict]:
    """The confident files (at the calibrated threshold), at most ``per_class`` per teacher class (the most confident),
    each with its teacher class, confidence and the teacher's five next classes (its soft label)."""
    top, conf = calibration.read(labelled["members"], labelled["audioset"], columns)
    scores = calibration.scores(labelled["members"], labelled["audioset"], columns)
    by_class: dict[int, list[int]] = defaultdict(list)
    for i in np.flatnonzero(conf >= calibration.threshold):
        by_class[int(top[i])].append(int(i))
    out = []
    for c, rows in sorted(by_class.items()):
        for i in sorted(rows, key=lambda i: -conf[i])[:per_class]:
            soft = np.argsort(-scores[i])[:5]
            out.append({**candidates[str(labelled["ids"][i])], "label": classes[c], "teacher_p": round(float(conf[i]), 4),
                        "teacher_top5": [[classes[k], round(float(scores[i, k]), 3)] for k in soft]})
    return out


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists() and not dst.is_symlink():
        dst.symlink_to(src.resolve())


def build_teacher_corpus(corpus: Path, out: Path, chosen: list[dict], clips: Path, scenes: int, seed: int = 0,
                         cache: Path | None = None, progress: bool = True) -> dict:
    """A copy of ``corpus`` (links) whose train split also holds ``scenes`` new scenes ``train-tNNNNN``: their events
    drawn from the ``chosen`` teacher files (pooled per teacher class; each marked ``"teacher": <confidence>``), over
    the labelled train split's ambience beds, the scenes marked ``"labels": "teacher"``. Validation, test, their questions and
    every other split file are the labelled corpus's own (links); ``sources.jsonl`` adds the teacher files
    (``"teacher": true``, split train), so that leave-one-package-out leaves their package out too."""


    cache = cache or cache_dir()
    onto = load_ontology(corpus / "ontology.json")
    for name in ("ontology.json", "qa", "prefs", "report.json", "report.md", "scenes/validation", "scenes/test"):
        if (corpus / name).exists():
            _link(corpus / name, out / name)
    sources = [json.loads(line) for line in (corpus / "sources.jsonl").read_text().splitlines()]
    train = [r for r in sources if r["split"] == "train"]
    paths = {r["id"]: cache / "clips16k" / f"{r['id']}.npy" for r in train if r["package"] != "synthetic"}
    paths |= {r["id"]: clips / f"{r['id']}.npy" for r in chosen}
    pool: dict[str, list[str]] = defaultdict(list)
    beds: dict[str, list[str]] = defaultdict(list)
    for r in train:
        if onto[r["label"]].bed and r["duration"] >= BED_MIN_S:
            beds[r["label"]].append(r["id"])
    for r in chosen:
        pool[r["label"]].append(r["id"])
    teacher_p = {r["id"]: r["teacher_p"] for r in chosen}
    store = M.ClipStore(paths, M.synthetic_beeps())
    scene_dir = out / "scenes" / "train"
    scene_dir.mkdir(parents=True, exist_ok=True)
    timelines = read_timelines(corpus, "train")
    for sid in timelines:
        _link(corpus / "scenes" / "train" / f"{sid}.flac", scene_dir / f"{sid}.flac")
    made = {}
    for i in tqdm(range(scenes), desc="teacher scenes", unit="scene", disable=not progress, mininterval=10):
        sid = f"train-t{i:05d}"
        scene = M.plan_scene(sid, "train", dict(pool), dict(beds), store, np.random.default_rng([seed, 45, i]))
        rel = f"scenes/train/{sid}.flac"
        if not (out / rel).exists():
            sf.write(out / rel, np.clip(M.render(scene, store), -1.0, 1.0), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        t = M.scene_to_json(scene)
        for e in t["events"]:
            if e["source_id"] in teacher_p:
                e["teacher"] = teacher_p[e["source_id"]]
        t |= {"audio": rel, "labels": "teacher", "caption": caption(onto, t)}
        made[sid] = t
    write_audiotime_json(scene_dir / "timelines.json", {**timelines, **made})
    write_strong_tsv(scene_dir / "strong.tsv", [s for sid, t in {**timelines, **made}.items() for s in timeline_strong_labels(sid, t)])
    with (out / "sources.jsonl").open("w", encoding="utf-8") as fh:
        for r in sources:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        for r in chosen:
            fh.write(json.dumps({"id": r["id"], "label": r["label"], "kind": onto[r["label"]].kind, "package": r["package"],
                                 "path": r["path"], "group": r["group"], "split": "train", "duration": r["duration"],
                                 "teacher": True, "teacher_p": r["teacher_p"], "teacher_top5": r["teacher_top5"]}, ensure_ascii=False) + "\n")
    used = {e["source_id"] for t in made.values() for e in t["events"]}
    events = [e for t in made.values() for e in t["events"]]
    return {"scenes": len(made), "events": len(events), "teacher_events": sum("teacher" in e for e in events),
            "teacher_files_used": len(used & set(teacher_p)), "hours": round(len(made) * M.SCENE_S / 3600, 3)}


def join_feature_caches(labelled: Path, teacher_only: Path, out: Path, tags: list[tuple[str, int]]) -> None:
    """``out``'s feature caches: validation and test linked from ``labelled``; train the labelled rows then the
    teacher scenes' (computed on a corpus holding only them), rows renumbered, in the sorted order the cache readers
    use (``train-NNNNN`` before ``train-tNNNNN``)."""
    for tag, view in tags:
        src = labelled / "features" / tag
        for split in ("validation", "test"):
            for f in src.glob(f"{split}.v0.*"):
                _link(f, out / "features" / tag / f.name)
        rows_a = json.loads((src / f"train.v{view}.json").read_text())
        rows_b = json.loads((teacher_only / "features" / tag / f"train.v{view}.json").read_text())
        n = len(rows_a["rows"])
        for part in ("last", "middle"):
            a_path = src / f"train.v{view}.{part}.npy"
            if not a_path.exists():
                continue
            a, b = np.load(a_path, mmap_mode="r"), np.load(teacher_only / "features" / tag / f"train.v{view}.{part}.npy", mmap_mode="r")
            dst = out / "features" / tag / f"train.v{view}.{part}.npy"
            dst.parent.mkdir(parents=True, exist_ok=True)
            joined = np.lib.format.open_memmap(dst.with_suffix(".tmp.npy"), mode="w+", dtype=a.dtype, shape=(n + len(b), *a.shape[1:]))
            joined[:n], joined[n:] = a, b
            joined.flush()
            del joined
            dst.with_suffix(".tmp.npy").replace(dst)
        rows = {**rows_a["rows"], **{k: n + v for k, v in rows_b["rows"].items()}}
        if list(rows) != sorted(rows):
            raise ValueError("the joined rows are not in the cache readers' sorted order")
        (out / "features" / tag / f"train.v{view}.json").write_text(json.dumps({**rows_a, "rows": rows}))


# --------------------------------------------------------------------------- the run


def package_roots(cache: Path | None = None) -> dict[str, Path]:
    """The listed packages already unpacked in the cache (``train.data.fetching``; an extra package holds only the
    files its file list names)."""
    base = (cache or cache_dir()) / "unpacked"
    return {p: base / p for p in S.PACKAGES if (base / p / ".complete").exists()}


def heldout_files(corpus: Path) -> list[dict]:
    """The corpus's labelled validation and test sources (real ones): the teacher's calibration and its check."""
    rows = [json.loads(line) for line in (corpus / "sources.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] in ("validation", "test") and r["package"] != "synthetic"]


def interleave(rows: list[dict]) -> list[dict]:
    """Rows in package round-robin order (each package's in its own order): every shard the teacher finishes covers
    every package, so a run stopped early is still a fair sample."""
    rank: Counter = Counter()
    keyed = []
    for r in rows:
        keyed.append((rank[r["package"]], r["package"], r))
        rank[r["package"]] += 1
    return [r for *_, r in sorted(keyed, key=lambda k: k[:2])]


def run_labelling(corpus: Path, out: Path, cache: Path | None = None, progress: bool = True) -> dict:
    """Stages 1-4: list, survey, deduplicate, and label (held-out files first, then the kept ones); writes
    ``out/candidates.jsonl`` (the kept files with their survey) and ``out/found.json`` (the counts)."""
    t0 = time.time()
    cache = cache or cache_dir()
    roots = package_roots(cache)
    cands = unlabelled_files(roots)
    rows = survey(cands, roots, out, progress)
    labelled = labelled_prints(corpus, roots, cache / "clips16k")
    kept, dropped = deduplicate(rows, labelled)
    with (out / "candidates.jsonl").open("w") as fh:
        for r in kept:
            fh.write(json.dumps({k: v for k, v in r.items() if k != "fingerprint"}) + "\n")
    found = {"packages_unpacked": len(roots), "files_found": len(cands), "kept_after_dedup": len(kept),
             "hours_after_dedup": round(sum(r["duration"] for r in kept) / 3600, 3), "dropped": dict(dropped.most_common()),
             "survey_seconds": round(time.time() - t0, 1)}
    (out / "found.json").write_text(json.dumps(found, indent=1))
    print(json.dumps(found), flush=True)
    held = heldout_files(corpus)
    label_clips([r["id"] for r in held], lambda i: cache / "clips16k" / f"{i}.npy", out / "teacher", "heldout", progress)
    label_clips([r["id"] for r in interleave(kept)], lambda i: out / "clips" / f"{i}.npy", out / "teacher", "unlabelled", progress)
    return found


def teacher_features(labelled: Path, teacher_corpus: Path, encoders: list[str], progress: bool = True) -> None:
    """The teacher corpus's feature caches for ``encoders`` (``yamnet``, ``aisfx``): the teacher scenes alone are heard
    (a staging corpus under ``teacher_corpus/teacher-only`` links them), then joined after the labelled corpus's own
    train rows (:func:`join_feature_caches`), which must be cached already."""
    staging = teacher_corpus / "teacher-only"
    for f in sorted((teacher_corpus / "scenes" / "train").glob("train-t*.flac")):
        _link(f, staging / "scenes" / "train" / f.name)
    read = {"yamnet": yamnet_features, "aisfx": aisfx_features}
    for enc in encoders:  # the teacher scenes first: the labelled corpus's own may still be computing
        read[enc](staging, "train", progress=progress)
    for enc in encoders:
        if not (labelled / "features" / enc / "train.v0.json").exists():
            raise FileNotFoundError(f"{labelled}: the labelled train split's {enc} features are not cached yet")
        join_feature_caches(labelled, staging, teacher_corpus, [(enc, 0)])


def calibrated_teacher(corpus: Path, out: Path) -> tuple[TeacherCalibration, dict, list[str], np.ndarray]:
    """The teacher's calibration on the labelled validation files, and its precision there and on the test files."""
    onto = load_ontology(corpus / "ontology.json")

    held = label_clips([r["id"] for r in heldout_files(corpus)], lambda i: cache_dir() / "clips16k" / f"{i}.npy", out / "teacher", "heldout",
                       progress=False)
    info = {r["id"]: r for r in heldout_files(corpus)}
    classes = Teacher.class_names()
    columns = audioset_columns(classes, onto)
    ci = {c: i for i, c in enumerate(classes)}
    labels = np.array([ci[info[str(i)]["label"]] for i in held["ids"]])
    split = np.array([info[str(i)]["split"] for i in held["ids"]])
    weights = [w for _, w in TEACHER_MEMBERS]
    v, t = split == "validation", split == "test"
    cal = calibrate_teacher(held["members"][v], held["audioset"][v], labels[v], columns, weights)
    checks = {name: precision_at(cal, held["members"][m], held["audioset"][m], labels[m], columns) for name, m in (("validation", v), ("test", t))}
    return cal, checks, classes, columns


def run_scenes(corpus: Path, out: Path, teacher_corpus: Path, scenes: int, per_class: int = PER_CLASS, seed: int = 0,
               limit: int | None = None, progress: bool = True) -> dict:
    """Stage 5: calibrate the teacher, keep the confident files and mix them into ``teacher_corpus``; writes
    ``out/teacher.json`` (the teacher-data table: found, deduplicated, kept, hours; the teacher's precision).
    ``limit``: only the first that many files of the labelling order (:func:`interleave`: a fair sample of every
    package) are read."""
    found = json.loads((out / "found.json").read_text())
    cal, checks, classes, columns = calibrated_teacher(corpus, out)
    candidates = {r["id"]: r for r in map(json.loads, (out / "candidates.jsonl").read_text().splitlines())}
    labelled = label_clips([r["id"] for r in interleave(list(candidates.values()))][:limit], lambda i: out / "clips" / f"{i}.npy",
                           out / "teacher", "unlabelled", progress=False)
    top, conf = cal.read(labelled["members"], labelled["audioset"], columns)
    confident = conf >= cal.threshold
    chosen = select(cal, labelled, candidates, classes, columns, per_class)
    mixed = build_teacher_corpus(corpus, teacher_corpus, chosen, out / "clips", scenes, seed, progress=progress)
    report = {**found, "labelled_by_teacher": int(len(labelled["ids"])),
              "confident": int(confident.sum()),
              "confident_hours": round(sum(candidates[str(i)]["duration"] for i in labelled["ids"][confident]) / 3600, 3),
              "confident_by_class": dict(Counter(classes[k] for k in top[confident]).most_common()),
              "kept": len(chosen), "kept_hours": round(sum(r["duration"] for r in chosen) / 3600, 3),
              "kept_classes": len({r["label"] for r in chosen}), "per_class": per_class,
              "calibration": asdict(cal), "precision": checks, "scenes": mixed}
    (out / "teacher.json").write_text(json.dumps(report, indent=1))
    (out / "chosen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chosen))
    return report


def teacher_table(corpus: Path, out: Path) -> dict:
    """The teacher-data table over every file the teacher has labelled so far (``out/teacher/unlabelled-*``): files
    found, left after deduplication, labelled, confident at the validation threshold (files, hours, classes)."""
    found = json.loads((out / "found.json").read_text())
    cal, checks, classes, columns = calibrated_teacher(corpus, out)
    candidates = {r["id"]: r for r in map(json.loads, (out / "candidates.jsonl").read_text().splitlines())}
    order = [r["id"] for r in interleave(list(candidates.values()))]
    done = len(list((out / "teacher").glob("unlabelled-*.npz")))
    labelled = label_clips(order[: min(len(order), done * SHARD)], None, out / "teacher", "unlabelled", progress=False)
    top, conf = cal.read(labelled["members"], labelled["audioset"], columns)
    keep = conf >= cal.threshold
    return {"files_found": found["files_found"], "after_dedup": found["kept_after_dedup"], "hours_after_dedup": found["hours_after_dedup"],
            "labelled_by_teacher": int(len(keep)),
            "labelled_hours": round(sum(candidates[str(i)]["duration"] for i in labelled["ids"]) / 3600, 3),
            "confident": int(keep.sum()), "confident_hours": round(sum(candidates[str(i)]["duration"] for i in labelled["ids"][keep]) / 3600, 3),
            "confident_classes": len(set(top[keep].tolist())),
            "confident_by_class": dict(Counter(classes[k] for k in top[keep]).most_common()), "precision": checks}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Teacher labels for the listed packages' unlabelled recordings.")
    ap.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    ap.add_argument("--out", type=Path, default=Path("runs/teacher"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--scenes", type=int, default=0, help="then mix this many teacher scenes into --teacher-corpus")
    ap.add_argument("--teacher-corpus", type=Path, default=Path("data/corpus-teacher"))
    ap.add_argument("--per-class", type=int, default=PER_CLASS)
    ap.add_argument("--limit", type=int, default=None, help="read only the first N files of the labelling order")
    ap.add_argument("--table", action="store_true", help="print the teacher-data table over every file labelled so far")
    ap.add_argument("--features", nargs="*", default=[], choices=["yamnet", "aisfx"],
                    help="then cache these encoders' features of the teacher corpus (its scenes heard, the labelled rows joined)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.scenes:
        print(json.dumps(run_scenes(args.corpus, args.out, args.teacher_corpus, args.scenes, args.per_class, limit=args.limit), indent=1))
    if args.features:
        teacher_features(args.corpus, args.teacher_corpus, args.features)
    if args.table:
        print(json.dumps(teacher_table(args.corpus, args.out), indent=1))
    if not args.scenes and not args.features and not args.table:
        run_labelling(args.corpus, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
