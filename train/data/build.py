"""Build the whole corpus: sources → splits → scenes → questions → preference pairs → report.

Layout under ``out`` (all paths inside files are relative to ``out`` so a corpus can move):
``ontology.json``, ``sources.jsonl``, ``scenes/<split>/<scene_id>.flac``,
``scenes/<split>/strong.tsv``, ``scenes/<split>/timelines.json``, ``qa/<split>.jsonl``,
``prefs/<split>/`` (HF dataset) and ``report.{json,md}``.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from train.data import mixer as M
from train.data import sources as S
from train.data import splits as SP
from train.data.decoding import SAMPLE_RATE, decode_sources
from train.data.fetching import fetch
from train.data.formats import timeline_strong_labels, write_audiotime_json, write_strong_tsv
from train.data.ontology import load_ontology
from train.data.prefs import KINDS as PAIR_KINDS
from train.data.prefs import QuestionWriter, save_pairs, scene_pairs, template_writer
from train.data.qa import caption, popular_classes, scene_questions, write_qa_jsonl

BED_MIN_S = 3.0
SPLIT_INDEX = {s: i for i, s in enumerate(SP.SPLITS)}

# worker state (one ClipStore per process)
_STORE: M.ClipStore | None = None


def _init_worker(paths: dict[str, str]) -> None:
    global _STORE
    _STORE = M.ClipStore(paths, M.synthetic_beeps())


def _scene_id(split: str, i: int) -> str:
    return f"{split}-{i:05d}"


def _make_scene(args: tuple[str, int, int, dict, dict, str]) -> dict:
    """Plan, render and write one scene; its RNG depends only on (seed, split, index)."""
    split, i, seed, pool, beds, out = args
    assert _STORE is not None
    rng = np.random.default_rng([seed, SPLIT_INDEX[split], i])
    sid = _scene_id(split, i)
    scene = M.plan_scene(sid, split, pool, beds, _STORE, rng)
    audio = np.clip(M.render(scene, _STORE), -1.0, 1.0)
    rel = f"scenes/{split}/{sid}.flac"
    sf.write(Path(out) / rel, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    t = M.scene_to_json(scene)
    t["audio"] = rel
    return t


def _disk_usage(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@dataclass
class SourceSet:
    """The source clips a build uses, their splits, and what was left out on the way (for the report)."""

    usable: list[S.SourceClip]
    paths: dict[str, Path]
    durations: dict[str, float]
    split_of: dict[str, str]
    dups: list[tuple[str, str]]  # group pairs that are one recording
    cross: list[tuple[str, str, float]]  # clip pairs of different packages that are one recording
    fetch_failed: dict[str, str]
    excluded: Counter
    skipped: Counter


def build_corpus(
    out: str | Path,
    n_train: int = 6000,
    n_validation: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    packages: Sequence[str] = S.PACKAGES,
    cache: Path | None = None,
    workers: int = 2,
    progress: bool = True,
    writer: QuestionWriter = template_writer,
) -> dict:
    """Build a corpus into ``out`` and return the report dict (also written as report.json/md).

    Validation and test default to 10 % and 1/6 of the training scenes (600 / 1,000 for 6,000).
    """
    t0 = time.time()
    workers = max(1, min(workers, 2))
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    onto = load_ontology()
    (out / "ontology.json").write_text(json.dumps(onto.to_json(), indent=1, ensure_ascii=False), encoding="utf-8")
    sizes = {"train": n_train, "validation": n_validation if n_validation is not None else max(1, n_train // 10),
             "test": n_test if n_test is not None else max(1, n_train // 6)}

    src = prepare_sources(out, packages, cache, workers, progress)
    pools, bed_pools = split_pools(onto, src)
    timelines = render_scenes(out, onto, pools, bed_pools, sizes, seed, src.paths, workers, progress)
    popular, qa_counts, pair_counts, examples = write_questions_and_pairs(out, onto, timelines, seed, writer, progress)

    by_id = {c.id: c for c in src.usable}
    recordings = recording_table(src.usable, SP.recording_components(src.usable, src.dups), src.durations)
    report = _report(onto, src.usable, src.split_of, src.durations, timelines, sizes, qa_counts, pair_counts, src.fetch_failed,
                     src.excluded, src.skipped, popular, examples, packages, seed, time.time() - t0, out)
    report["recordings"] = recordings
    report["cross_package_duplicates"] = [
        {"a": f"{by_id[a].package}:{by_id[a].path}", "b": f"{by_id[b].package}:{by_id[b].path}", "similarity": sim}
        for a, b, sim in src.cross]
    _write_report(report, out)
    return report


def prepare_sources(out: Path, packages: Sequence[str], cache: Path | None, workers: int, progress: bool) -> SourceSet:
    """Fetch, label and decode the sources, add the synthetic beeps, find duplicate recordings and split by
    recording; writes ``sources.jsonl``."""
    roots, fetch_failed = fetch(packages, cache, progress=progress)
    clips, excluded = S.labelled_sources(packages)
    paths, skipped, durations = decode_sources(clips, roots, cache, workers=workers, progress=progress)
    beeps = M.synthetic_beeps()
    beep_clips = [S.SourceClip(cid, "Beep, bleep", "synthetic", "synthetic", f"numpy:{cid.split('.', 1)[1]}", f"synthetic:{cid}")
                  for cid in sorted(beeps)]
    usable = [c for c in clips if c.id in paths] + beep_clips
    for c in beep_clips:
        durations[c.id] = len(beeps[c.id]) / SAMPLE_RATE
    store = M.ClipStore(paths, beeps)
    ids = [c.id for c in usable]
    fps = np.stack([SP.fingerprint(store.get(i)) for i in ids])
    dur_arr = np.array([durations[i] for i in ids])
    by_id = {c.id: c for c in usable}
    dups = [(by_id[ids[a]].group, by_id[ids[b]].group) for a, b in SP.duplicate_pairs(fps, dur_arr)]
    profiles = {i: SP.frame_profile(store.get(i)) for i in ids if by_id[i].package != "synthetic"}
    cross = SP.cross_package_duplicates(usable, profiles)
    dups += [(by_id[a].group, by_id[b].group) for a, b, _ in cross]
    split_of = SP.assign_splits(usable, dups)
    with (out / "sources.jsonl").open("w", encoding="utf-8") as fh:
        for c in sorted(usable, key=lambda c: c.id):
            fh.write(json.dumps(SP.source_record(c, split_of[c.id], durations[c.id]), ensure_ascii=False) + "\n")
    return SourceSet(usable, paths, durations, split_of, dups, cross, fetch_failed, excluded, skipped)


def split_pools(onto, src: SourceSet) -> tuple[dict[str, dict[str, list[str]]], dict[str, dict[str, list[str]]]]:
    """Per split, class → source ids for events, and the same for background beds (ambience at least
    :data:`BED_MIN_S` long)."""
    pools: dict[str, dict[str, list[str]]] = {s: defaultdict(list) for s in SP.SPLITS}
    for c in sorted(src.usable, key=lambda c: c.id):
        pools[src.split_of[c.id]][c.label].append(c.id)
    bed_pools = {
        s: {k: [i for i in v if onto[k].bed and src.durations[i] >= BED_MIN_S] for k, v in pools[s].items()}
        for s in SP.SPLITS
    }
    return pools, {s: {k: v for k, v in b.items() if v} for s, b in bed_pools.items()}


def render_scenes(out: Path, onto, pools, bed_pools, sizes: dict[str, int], seed: int, paths: dict[str, Path], workers: int,
                  progress: bool) -> dict[str, dict[str, dict]]:
    """Plan, render and write every split's scenes (``scenes/<split>/``: audio, strong labels, timelines);
    returns split → scene id → timeline (with its caption)."""
    from tqdm import tqdm

    timelines: dict[str, dict[str, dict]] = {}
    str_paths = {k: str(v) for k, v in paths.items()}
    pool_ctx = ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=(str_paths,)) if workers > 1 else None
    if pool_ctx is None:
        _init_worker(str_paths)
    try:
        for split in SP.SPLITS:
            (out / "scenes" / split).mkdir(parents=True, exist_ok=True)
            if not pools[split]:
                timelines[split] = {}
                continue
            jobs = [(split, i, seed, dict(pools[split]), bed_pools[split], str(out)) for i in range(sizes[split])]
            it = pool_ctx.map(_make_scene, jobs, chunksize=32) if pool_ctx else map(_make_scene, jobs)
            tl = {}
            for t in tqdm(it, total=len(jobs), desc=f"scenes {split}", unit="scene", disable=not progress):
                t["caption"] = caption(onto, t)
                tl[t["scene_id"]] = t
            timelines[split] = tl
            write_audiotime_json(out / "scenes" / split / "timelines.json", tl)
            write_strong_tsv(out / "scenes" / split / "strong.tsv",
                             [s for sid, t in tl.items() for s in timeline_strong_labels(sid, t)])
    finally:
        if pool_ctx:
            pool_ctx.shutdown()
    return timelines


def write_questions_and_pairs(out: Path, onto, timelines: dict[str, dict[str, dict]], seed: int, writer: QuestionWriter,
                              progress: bool) -> tuple[list[str], dict[str, Counter], dict[str, Counter], list[dict]]:
    """Every scene's questions (``qa/<split>.jsonl``) and preference pairs (``prefs/<split>/``); returns the popular
    classes, the counts of both per split, and a few test scenes as examples for the report."""
    from tqdm import tqdm

    popular = popular_classes(timelines["train"].values()) or popular_classes(
        t for tl in timelines.values() for t in tl.values())
    available = onto.names
    qa_counts: dict[str, Counter] = {}
    pair_counts: dict[str, Counter] = {}
    examples: list[dict] = []
    (out / "qa").mkdir(exist_ok=True)
    for split in SP.SPLITS:
        tl = timelines[split]
        others = [(sid, t["audio"], frozenset(e["label"] for e in t["events"]) | (
            frozenset([t["background"]["label"]]) if t["background"]["label"] else frozenset())) for sid, t in tl.items()]
        all_rows, all_pairs = [], []
        for i, (sid, t) in enumerate(tqdm(tl.items(), desc=f"qa+pairs {split}", unit="scene", disable=not progress)):
            rng = np.random.default_rng([seed, SPLIT_INDEX[split], i, 1])
            rows = scene_questions(onto, sid, split, t["audio"], t, popular, available, rng)
            pairs = scene_pairs(onto, t, rows, t["audio"], split, others, rng, writer)
            all_rows.extend(rows)
            all_pairs.extend(pairs)
            if split == "test" and len(examples) < 3 and len(t["events"]) >= 2:
                examples.append({"scene_id": sid, "audio": t["audio"], "caption": t["caption"],
                                 "events": [(e["label"], e["onset"], e["offset"]) for e in t["events"]],
                                 "background": t["background"]["label"],
                                 "pairs": [p.__dict__ for p in pairs]})
        write_qa_jsonl(out / "qa" / f"{split}.jsonl", all_rows)
        save_pairs(all_pairs, out / "prefs" / split)
        qa_counts[split] = Counter(f"{r.kind}/{r.sampling}" for r in all_rows)
        pair_counts[split] = Counter(p.kind for p in all_pairs)
    return popular, qa_counts, pair_counts, examples


def _report(onto, usable, split_of, durations, timelines, sizes, qa_counts, pair_counts, fetch_failed, excluded,
            skipped, popular, examples, packages, seed, elapsed, out: Path) -> dict:
    src_per = {s: Counter() for s in SP.SPLITS}
    src_hours = Counter()
    for c in usable:
        src_per[split_of[c.id]][c.label] += 1
        src_hours[split_of[c.id]] += durations[c.id] / 3600
    ev_per = {s: Counter(e["label"] for t in tl.values() for e in t["events"]) for s, tl in timelines.items()}
    classes = []
    for c in onto:
        classes.append({"name": c.name, "mid": c.mid, "kind": c.kind, "group": c.group,
                        "sources": {s: src_per[s][c.name] for s in SP.SPLITS},
                        "events": {s: ev_per[s][c.name] for s in SP.SPLITS}})
    report = {
        "seed": seed, "packages": list(packages), "build_seconds": round(elapsed, 1),
        "splits": {s: {"scenes": len(timelines[s]), "requested": sizes[s],
                       "hours": round(len(timelines[s]) * M.SCENE_S / 3600, 3),
                       "source_clips": sum(src_per[s].values()), "source_hours": round(src_hours[s], 3),
                       "classes_with_sources": sum(1 for v in src_per[s].values() if v),
                       "qa_rows": dict(sorted(qa_counts[s].items())), "pairs": dict(sorted(pair_counts[s].items()))}
                   for s in SP.SPLITS},
        "classes": classes,
        "classes_used": sum(1 for c in classes if any(c["sources"].values())),
        "popular_classes": popular,
        "skipped": {"packages_not_fetched": fetch_failed, "excluded_by_label_rules": dict(excluded),
                    "decode_skipped": dict(skipped)},
        "split_method": "union of (package + directory + normalized stem) groups and audio-fingerprint "
                        "duplicates (cosine >= 0.97 on 32x24 log band-energy grids, durations within 10%)",
        "examples": examples,
        "pair_kinds": list(PAIR_KINDS),
    }
    return report


def _write_report(report: dict, out: Path) -> None:
    report["disk_bytes"] = _disk_usage(out)
    (out / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    (out / "report.md").write_text(_markdown(report), encoding="utf-8")
    report["disk_bytes"] = _disk_usage(out)


def recording_table(clips: Sequence[S.SourceClip], component: dict[str, str], durations: dict[str, float]) -> dict[str, dict]:
    """Per class: distinct source recordings and hours from the core packages alone and from all used.

    Files are not recordings: one session's takes, and one recording shipped by two games, count once.
    """
    out: dict[str, dict] = {}
    for scope, keep in (("core", lambda c: c.package in S.CORE_PACKAGES), ("all", lambda c: True)):
        recs: dict[str, set[str]] = defaultdict(set)
        hours: Counter = Counter()
        for c in clips:
            if keep(c) and c.package != "synthetic":
                recs[c.label].add(component[c.id])
                hours[c.label] += durations[c.id] / 3600
        for label in set(recs) | set(out):
            out.setdefault(label, {})[scope] = {"recordings": len(recs.get(label, ())), "hours": round(hours[label], 4)}
    for row in out.values():
        row.setdefault("core", {"recordings": 0, "hours": 0.0})
    return dict(sorted(out.items()))

def _markdown(r: dict) -> str:
    lines = [f"# Earwitness corpus build (seed {r['seed']})", "",
             f"Built in {r['build_seconds']:.0f} s; {r['disk_bytes'] / 1e9:.2f} GB on disk; "
             f"{r['classes_used']} classes with audio.", "",
             "| split | scenes | hours | source clips | source hours | classes | QA rows | pairs |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s, d in r["splits"].items():
        lines.append(f"| {s} | {d['scenes']} | {d['hours']} | {d['source_clips']} | {d['source_hours']} | "
                     f"{d['classes_with_sources']} | {sum(d['qa_rows'].values())} | {sum(d['pairs'].values())} |")
    lines += ["", "## Pairs by kind", "", "| kind | " + " | ".join(r["splits"]) + " |", "| --- |" + " --- |" * len(r["splits"])]
    for k in r["pair_kinds"]:
        lines.append(f"| {k} | " + " | ".join(str(d["pairs"].get(k, 0)) for d in r["splits"].values()) + " |")
    lines += ["", "## Questions by kind/sampling", "", "| kind/sampling | " + " | ".join(r["splits"]) + " |",
              "| --- |" + " --- |" * len(r["splits"])]
    keys = sorted({k for d in r["splits"].values() for k in d["qa_rows"]})
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(str(d["qa_rows"].get(k, 0)) for d in r["splits"].values()) + " |")
    lines += ["", "## Classes", "", "| class | MID | kind | sources train/val/test | events train/val/test |",
              "| --- | --- | --- | --- | --- |"]
    for c in r["classes"]:
        src = "/".join(str(c["sources"][s]) for s in r["splits"])
        ev = "/".join(str(c["events"][s]) for s in r["splits"])
        lines.append(f"| {c['name']} | {c['mid'] or '—'} | {c['kind']} | {src} | {ev} |")
    if r.get("recordings"):
        lines += ["", "## Distinct source recordings and hours per class: core packages → all packages", "",
                  "| class | recordings | hours |", "| --- | --- | --- |"]
        for name, row in r["recordings"].items():
            lines.append(f"| {name} | {row['core']['recordings']} → {row['all']['recordings']} | "
                         f"{row['core']['hours']:.3f} → {row['all']['hours']:.3f} |")
        tot = {k: sum(row[k]["recordings"] for row in r["recordings"].values()) for k in ("core", "all")}
        hrs = {k: sum(row[k]["hours"] for row in r["recordings"].values()) for k in ("core", "all")}
        lines.append(f"| **all classes** | {tot['core']} → {tot['all']} | {hrs['core']:.2f} → {hrs['all']:.2f} |")
    if r.get("cross_package_duplicates") is not None:
        lines += ["", f"Cross-package duplicates found (one recording in two packages, same split): "
                      f"{len(r['cross_package_duplicates'])}", ""]
        lines += [f"- `{d['a']}` = `{d['b']}` ({d['similarity']:.3f})" for d in r["cross_package_duplicates"][:40]]
    lines += ["", "## Skipped", ""]
    for what, d in r["skipped"].items():
        lines.append(f"- **{what}**: " + (", ".join(f"{k}: {v}" for k, v in d.items()) if d else "none"))
    lines += ["", f"Split method: {r['split_method']}.", "", f"Popular classes (for 'popular' negatives): {', '.join(r['popular_classes'])}.", ""]
    lines += ["## Example scenes", ""]
    for ex in r["examples"]:
        lines.append(f"- `{ex['audio']}`: {ex['caption']}")
    return "\n".join(lines) + "\n"
