"""Phrases from neither vocabulary, on clips anyone can make: where each lands (the ontology, AudioSet's classes, or
nowhere) and what the verifier says about it.

    python -m loadtests.open_vocabulary --verifier models/earwitness-verifier-tagger [--corpus data/corpus]

Clips: a 440 Hz tone, an espeak-ng sentence (when espeak-ng is installed), white noise, and (with ``--corpus``)
the first test scene holding a dog. Prints a table per clip: phrase → class, vocabulary, similarity,
probability, judgement.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from loadtests.bench_guard import SERVED_VERIFIER, judged, table
from loadtests.clips import spoken

PHRASES = ("a dial tone", "a phone's busy signal", "a chainsaw", "someone vacuuming the floor", "a motorbike revving",
           "music", "a man talking", "a dog barking", "quantum entanglement")
SR = 16_000


def clips(corpus: Path | None) -> dict[str, np.ndarray]:
    t = np.arange(2 * SR) / SR
    out = {"440 Hz tone, 2 s": (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32),
           "white noise, 2 s": (0.1 * np.random.default_rng(0).standard_normal(2 * SR)).astype(np.float32)}
    speech = spoken("Hello, this is a short test of what the verifier hears.", SR)
    if speech is not None:
        out["espeak-ng sentence"] = speech
    if corpus is not None:
        import json

        import soundfile as sf

        for line in (corpus / "qa" / "test.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r["kind"] == "presence" and r["sampling"] == "positive" and r["label"] == "Dog":
                out[f"corpus test scene {r['scene_id']} (holds a dog)"] = sf.read(corpus / r["audio"], dtype="float32")[0]
                break
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--verifier", default=SERVED_VERIFIER, help="default: the served default")
    ap.add_argument("--corpus", type=Path, default=None)
    args = ap.parse_args(argv)
    from models.verifier.checkpoint import load_verifier

    verifier = load_verifier(args.verifier)
    print(f"verifier {verifier.name}: absent below {verifier.calibration.absent_below:.3f}, present from "
          f"{verifier.calibration.present_above:.3f}\n")
    for name, samples in clips(args.corpus).items():
        rows = [[e.text, e.event or f"(none; nearest {e.nearest})", e.vocabulary or "-", e.similarity, e.probability,
                 judged(e.present, e.reason)]
                for e in verifier.verify(samples, list(PHRASES))]
        print(f"### {name}\n\n" + table(["phrase", "class", "vocabulary", "similarity", "probability", "judged"], rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
