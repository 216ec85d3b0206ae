"""A corpus from a user's own copy of AudioCaps or Clotho: their captions, presence questions read from what the
captions mention, and LISTEN / ACPO preference pairs, in the layout the stages read (train/data/build.py).

Layouts read as the data sets publish them:

* AudioCaps: ``train.csv``, ``val.csv``, ``test.csv`` (``audiocap_id,youtube_id,start_time,caption``) anywhere under
  the directory, and the clips the user downloaded anywhere under it, named ``<youtube_id>_<start>``,
  ``<youtube_id>``, ``Y<youtube_id>`` or ``<audiocap_id>`` (``.wav``, ``.flac``, ``.mp3``, ``.ogg``).
* Clotho: ``clotho_captions_{development,validation,evaluation}.csv`` (``file_name,caption_1..caption_5``) and the
  audio folders ``development/``, ``validation/``, ``evaluation/``.

Their own splits are kept (AudioCaps train/val/test, Clotho development/validation/evaluation → train, validation,
test). Captions have no timing: a mentioned sound is a weak label spanning the clip, so only presence and caption
questions are written (no order, count or duration, no AHA timeline counterfactuals). An absent sound is one that no
caption of the clip mentions, nor any sound confused or heard with one it mentions (the ontology's siblings and
co-occurrences): captions leave sounds out, so these negatives are noisier than the mixed scenes'. The shipped models
are trained on the Debian packages only; this is for users' own data.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from models.audio import AudioError, decode
from train.data.decoding import MAX_SOURCE_S, SAMPLE_RATE
from train.data.formats import read_audiocaps_csv, read_clotho_csv, write_audiotime_json, write_strong_tsv, timeline_strong_labels
from train.data.ontology import Ontology, load_ontology
from train.data.prefs import save_pairs, scene_pairs
from train.data.qa import CAPTION_PROMPTS, GENERIC_PHRASES, PRESENCE_TEMPLATES, QARow, popular_classes, write_qa_jsonl
from train.data.splits import SPLITS

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg")
AUDIOCAPS_SPLITS = {"train": "train", "val": "validation", "test": "test"}
CLOTHO_SPLITS = {"development": "train", "validation": "validation", "evaluation": "test"}
# words that name no sound: a phrase's other words must all be in a caption for it to mention the phrase's class
_FILLER = frozenset("a an the of or and in on at to by with from into over its their his her some someone somebody something "
                    "person people being is are be while then many few sound sounds noise audio".split())
_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class CaptionedClip:
    """One audio file of the user's data set and every caption it has."""

    dataset: str  # audiocaps | clotho
    split: str  # train | validation | test
    name: str  # the data set's own id (AudioCaps <youtube_id>_<start>, Clotho's file name)
    audio: Path
    captions: tuple[str, ...]


# ------------------------------------------------------------------------------------------ reading the layouts


def _audio_index(root: Path) -> dict[str, Path]:
    """File stem and file name -> path of every audio file under ``root``."""
    index: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in AUDIO_SUFFIXES and path.is_file():
            index.setdefault(path.name, path)
            index.setdefault(path.stem, path)
    return index


def _find(root: Path, name: str) -> Path | None:
    return next(iter(sorted(root.rglob(name))), None)


def _captioned(root: Path, dataset: str, files: dict[str, str], reader, locate) -> tuple[list[CaptionedClip], list[str]]:
    """The clips of the captions files ``files`` (file name -> split) found under ``root`` whose audio ``locate(csv path,
    audio index)`` finds, and the ids whose audio it does not."""
    index, clips, missing = _audio_index(root), [], []
    for file_name, split in files.items():
        path = _find(root, file_name)
        if path is None:
            continue
        captions: dict[str, list[str]] = defaultdict(list)
        for row in reader(path):
            captions[row.audio_id].append(row.caption)
        audio_of = locate(path, index)
        for audio_id, caps in captions.items():
            found = audio_of(audio_id)
            if found is None:
                missing.append(audio_id)
            else:
                clips.append(CaptionedClip(dataset, split, audio_id, found, tuple(caps)))
    return clips, missing


def audiocaps_clips(root: Path) -> tuple[list[CaptionedClip], list[str]]:
    """The clips of an AudioCaps directory whose audio is there, and the ids (``<youtube_id>_<start>``) whose is not."""

    def locate(path: Path, index: dict[str, Path]):
        with path.open(newline="", encoding="utf-8") as fh:  # the audiocap_id is a name some downloaders give the file
            ids: dict[str, list[str]] = defaultdict(list)  # one clip, one id per caption
            for r in csv.DictReader(fh):
                ids[f"{r['youtube_id']}_{int(float(r['start_time'] or 0))}"].append(r["audiocap_id"])

        def audio_of(audio_id: str) -> Path | None:
            youtube_id = audio_id.rsplit("_", 1)[0]
            return next((index[k] for k in (audio_id, youtube_id, f"Y{youtube_id}", *ids[audio_id]) if k in index), None)
        return audio_of

    return _captioned(root, "audiocaps", {f"{name}.csv": split for name, split in AUDIOCAPS_SPLITS.items()}, read_audiocaps_csv, locate)


def clotho_clips(root: Path) -> tuple[list[CaptionedClip], list[str]]:
    """The clips of a Clotho directory whose audio is there (its split's folder first), and the files that are not."""

    def locate(path: Path, index: dict[str, Path]):
        folder = path.stem.removeprefix("clotho_captions_")
        return lambda name: next((p for p in (path.parent / folder / name, root / folder / name) if p.is_file()), None) or index.get(name)

    return _captioned(root, "clotho", {f"clotho_captions_{name}.csv": split for name, split in CLOTHO_SPLITS.items()}, read_clotho_csv, locate)


# ------------------------------------------------------------------------------------------ captions -> ontology


def _stem(word: str) -> str:
    """A crude English stem, the same for a caption's words and the ontology's phrases: barks, barking, barked -> bark."""
    for suffix, keep in (("ies", "y"), ("ied", "y"), ("ing", ""), ("ed", ""), ("es", ""), ("s", "")):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3 and not (suffix == "s" and word.endswith("ss")):
            word = word[: -len(suffix)] + keep
            break
    if len(word) > 3 and word[-1] == word[-2]:
        word = word[:-1]
    return word[:-1] if len(word) > 3 and word.endswith("e") else word


def _stems(text: str) -> set[str]:
    return {_stem(w) for w in _WORD.findall(text.lower()) if w not in _FILLER}


def class_cues(onto: Ontology) -> dict[str, list[frozenset[str]]]:
    """Each class's phrases as sets of stems, every one of which a caption must contain to mention the class."""
    return {c.name: [cue for cue in (frozenset(_stems(p)) for p in c.phrases) if cue] for c in onto}


def mentioned_classes(cues: dict[str, list[frozenset[str]]], captions: Iterable[str]) -> list[str]:
    """The ontology classes the captions mention: all of one phrase's stems in one caption ("A dog barks" -> Dog); a
    match whose words lie inside another class's longer match is that class's ("birds sing": Bird, not Singing)."""
    found = set()
    for text in captions:
        words = _stems(text)
        best = {name: max((cue for cue in phrases if cue <= words), key=len) for name, phrases in cues.items() if any(cue <= words for cue in phrases)}
        found.update(name for name, cue in best.items() if not any(cue < other for other in best.values()))
    return sorted(found)


def clip_questions(onto: Ontology, scene_id: str, split: str, audio: str, captions: Sequence[str], present: Sequence[str],
                   popular: Sequence[str], rng: np.random.Generator) -> list[QARow]:
    """A clip's questions: each caption as a caption answer, each mentioned class asked as present, and one absent class
    drawn at random and one among the popular (neither mentioned nor related to what is)."""
    rows = [QARow(scene_id, split, audio, CAPTION_PROMPTS[int(rng.integers(len(CAPTION_PROMPTS)))], text, "caption", "positive", None)
            for text in captions]
    related = set(present).union(*(set(onto[p].siblings) | set(onto[p].cooccurs) for p in present)) if present else set()
    for label, sampling in [(p, "positive") for p in present] + [(None, "random"), (None, "popular")]:
        if label is None:
            pool = sorted(set(onto.names if sampling == "random" else popular) - related)
            if not pool:
                continue
            label = pool[int(rng.integers(len(pool)))]
        phrase = onto[label].phrases[int(rng.integers(min(GENERIC_PHRASES, len(onto[label].phrases))))]
        question = PRESENCE_TEMPLATES[int(rng.integers(len(PRESENCE_TEMPLATES)))].format(x=phrase)
        rows.append(QARow(scene_id, split, audio, question, "Yes" if sampling == "positive" else "No", "presence", sampling, label, phrase))
    return rows


# ------------------------------------------------------------------------------------------ the corpus


def _write_audio(clip: CaptionedClip, out: Path, rel: str) -> tuple[float | None, str | None]:
    """The clip decoded as the server decodes (16 kHz mono, at most 30 s) into ``out/rel``; (seconds, skip reason)."""
    try:
        decoded = decode(clip.audio.read_bytes(), SAMPLE_RATE, max_duration_s=MAX_SOURCE_S, truncate=True)
    except AudioError as exc:
        return None, exc.code
    sf.write(out / rel, decoded.samples, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return decoded.duration_s, None


def import_captions(out: str | Path, audiocaps: Path | None = None, clotho: Path | None = None, seed: int = 0,
                    max_per_split: int | None = None) -> dict:
    """Write a corpus from AudioCaps and/or Clotho directories into ``out`` (replaced); returns its report.

    ``max_per_split``: the first N clips of each split and data set (a quick look before the whole import)."""
    started, out = time.time(), Path(out)
    clips, missing = [], {}
    for name, root, reader in (("audiocaps", audiocaps, audiocaps_clips), ("clotho", clotho, clotho_clips)):
        if root is not None:
            found, missing[name] = reader(Path(root))
            if not found and not missing[name]:
                raise SystemExit(f"{root}: no {name} captions file found (see `earwitness data import --help` for the layout)")
            for split in SPLITS:
                clips += [c for c in found if c.split == split][:max_per_split]
    if out.exists():
        shutil.rmtree(out)
    onto = load_ontology()
    cues = class_cues(onto)
    (out / "qa").mkdir(parents=True)
    (out / "ontology.json").write_text(json.dumps(onto.to_json(), indent=1, ensure_ascii=False), encoding="utf-8")
    timelines: dict[str, dict[str, dict]] = {split: {} for split in SPLITS}
    skipped, sources = Counter(), []
    for split in SPLITS:
        (out / "scenes" / split).mkdir(parents=True)
        for i, clip in enumerate(c for c in clips if c.split == split):
            sid = f"{clip.dataset}-{split}-{i:05d}"
            rel = f"scenes/{split}/{sid}.flac"
            seconds, why = _write_audio(clip, out, rel)
            if why:
                skipped[why] += 1
                continue
            present = mentioned_classes(cues, clip.captions)
            timelines[split][sid] = {"scene_id": sid, "audio": rel, "duration": round(seconds, 3), "caption": clip.captions[0],
                                     "captions": list(clip.captions), "background": {"label": None}, "weak": True,
                                     "events": [{"label": p, "onset": 0.0, "offset": round(seconds, 3)} for p in present]}
            sources.append({"scene_id": sid, "dataset": clip.dataset, "name": clip.name, "split": split})
        write_audiotime_json(out / "scenes" / split / "timelines.json", timelines[split])
        write_strong_tsv(out / "scenes" / split / "strong.tsv", [s for sid, t in timelines[split].items() for s in timeline_strong_labels(sid, t)])
    with (out / "sources.jsonl").open("w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in sources)
    popular = popular_classes(timelines["train"].values()) or popular_classes(t for tl in timelines.values() for t in tl.values())
    report = {"imported_from": {k: str(v) for k, v in (("audiocaps", audiocaps), ("clotho", clotho)) if v is not None},
              "seed": seed, "popular_classes": popular, "skipped": {"audio_missing": {k: len(v) for k, v in missing.items()},
                                                                    "decode_skipped": dict(skipped)}, "splits": {}}
    for split in SPLITS:
        rows, pairs = [], []
        others = [(sid, t["audio"], frozenset(e["label"] for e in t["events"])) for sid, t in timelines[split].items()]
        for i, (sid, t) in enumerate(timelines[split].items()):
            rng = np.random.default_rng([seed, SPLITS.index(split), i])
            present = [e["label"] for e in t["events"]]
            mine = clip_questions(onto, sid, split, t["audio"], t["captions"], present, popular, rng)
            rows += mine
            pairs += scene_pairs(onto, t, mine, t["audio"], split, others, rng, timed=False)
        write_qa_jsonl(out / "qa" / f"{split}.jsonl", rows)
        save_pairs(pairs, out / "prefs" / split)
        tl = timelines[split]
        report["splits"][split] = {"scenes": len(tl), "hours": round(sum(t["duration"] for t in tl.values()) / 3600, 3),
                                   "source_clips": len(tl), "clips_with_mentions": sum(1 for t in tl.values() if t["events"]),
                                   "qa_rows": dict(sorted(Counter(f"{r.kind}/{r.sampling}" for r in rows).items())),
                                   "pairs": dict(sorted(Counter(p.kind for p in pairs).items()))}
    report["mentions"] = dict(Counter(e["label"] for tl in timelines.values() for t in tl.values() for e in t["events"]).most_common())
    report["build_seconds"] = round(time.time() - started, 1)
    report["disk_bytes"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    (out / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    return report
