"""How the guard tests' clips were chosen (kept for provenance; needs data/corpus and the shipped verifier).

Two scenes of the corpus test split (recordings never seen in training): one where a sound is
present and the shipped verifier judges it present, one where the same sound is absent and the
verifier judges it absent, for a class asked about by its generic phrase.

    python tests/data/guard/pick_clips.py data/corpus
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import soundfile as sf

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from serving.guard.verifier import load_verifier  # noqa: E402
from train.ontology import load_ontology  # noqa: E402
from train.verifier import load_timelines, scene_labels  # noqa: E402

PREFERRED = ["Dog", "Siren", "Knock", "Door", "Bell", "Cat", "Speech", "Piano", "Water", "Rain"]


def main(corpus: Path) -> None:
    verifier, onto = load_verifier(), load_ontology()
    cal = verifier.calibration
    timelines = load_timelines(corpus, "test")
    ids = sorted(timelines)[:500]
    probs = {sid: verifier.class_probabilities(sf.read(corpus / "scenes" / "test" / f"{sid}.flac", dtype="float32")[0]) for sid in ids}
    for cls in PREFERRED:
        phrase = onto[cls].phrases[0]
        if verifier.match([phrase])[0].event != cls:
            continue
        pos = sorted((probs[s][cls], s) for s in ids if cls in scene_labels(timelines[s]))
        neg = sorted((probs[s][cls], s) for s in ids if cls not in scene_labels(timelines[s]))
        if pos and neg and pos[-1][0] >= cal.present_above + 0.05 and neg[0][0] < cal.absent_below - 0.05:
            out = Path(__file__).resolve().parent
            doc = {}
            for kind, (p, sid) in (("present", pos[-1]), ("absent", neg[0])):
                shutil.copy(corpus / "scenes" / "test" / f"{sid}.flac", out / f"{kind}.flac")
                doc[kind] = {"clip": kind, "scene_id": sid, "event": cls, "phrase": phrase, "probability_at_pick": round(p, 4),
                             "labels": sorted(scene_labels(timelines[sid]))}
            doc["source"] = "Earwitness corpus test split (seed 0), scenes mixed from Debian sound packages' recordings"
            (out / "clips.json").write_text(json.dumps(doc, indent=1) + "\n")
            print(json.dumps(doc, indent=1))
            return
    raise SystemExit("no class has a confidently present and a confidently absent test scene")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "data/corpus"))
