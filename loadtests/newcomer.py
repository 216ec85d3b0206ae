"""What a newcomer meets: known clips, everyday phrasings, the answers and verdicts a person reads.

    python -m loadtests.newcomer --host http://127.0.0.1:8000 [--sounds DIR ...]

Clips, made here: an espeak-ng sentence (synthetic speech), a 440 Hz tone, digital silence, the sentence over the
tone; and from ``--sounds`` directories (unpacked Debian packages, ``apt-get download PKG && dpkg-deb -x PKG.deb
DIR``): from ``megaglest-data``, which the project does not train on, bird song (2 s of a forest's day ambience),
crickets (2.5 s of its night ambience) and hammering (its four anvil strikes, joined); from ``sound-icons`` (one of the
training packages) a canary and a trumpet. Each request is a row: clip, question (or verify phrase), policy → answer,
answer kind, verdict, the claims' judgements. A row whose policy is ``default`` sends no ``guard``: it gets the served
model's own default, as a newcomer's request does. Loopback hosts only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import httpx
import numpy as np

from loadtests.bench_guard import judged, table
from loadtests.clips import encode, spoken
from loadtests.run import is_loopback

SR = 16_000
SENTENCE = "Hello, this is a short test of what the guard hears."
DEFAULT = "default"  # no 'guard' in the request
QUESTIONS = [
    ("bird song", "Is there a bird singing?", DEFAULT),
    ("bird song", "Is there a bird singing?", "annotate"),
    ("bird song", "What do you hear?", DEFAULT),
    ("speech", "Is there speech?", DEFAULT),
    ("speech", "Is someone talking?", DEFAULT),
    ("speech", "Is someone talking?", "annotate"),
    ("speech", "What do you hear?", DEFAULT),
    ("speech", "Do you hear a dog barking?", DEFAULT),
    ("speech", "Describe the audio.", DEFAULT),
    ("crickets", "Describe the audio.", DEFAULT),
    ("crickets", "Describe the audio.", "annotate"),
    ("crickets", "Is a car passing?", DEFAULT),
    ("crickets", "Any crickets or birds?", DEFAULT),
    ("hammering", "Do you hear hammering?", DEFAULT),
    ("hammering", "Is someone hammering?", DEFAULT),
    ("tone", "Did you hear rain?", DEFAULT),
    ("tone", "Is a beep audible in this clip?", DEFAULT),
    ("silence", "Is there a sound of speech in the audio?", DEFAULT),
    ("speech + tone", "Are there any beeps?", DEFAULT),
    ("canary", "Is there a bird singing?", DEFAULT),
    ("trumpet", "Can you hear a trumpet?", DEFAULT),
]
VERIFY = [("speech", ["speech", "music", "a dial tone"]), ("tone", ["a dial tone", "speech"]), ("bird song", ["a bird", "crickets"]),
          ("crickets", ["crickets", "a car passing"]), ("hammering", ["hammering", "metal clanging"])]
# name → (file pattern under a --sounds directory, seconds kept from the start; None: every match, joined)
RECORDINGS = {
    "bird song": ("tilesets/forest/sounds/day.ogg", 2.0),
    "crickets": ("tilesets/forest/sounds/night.ogg", 2.5),
    "hammering": ("anvil*.wav", None),
    "canary": ("canary*.wav", None),
    "trumpet": ("trumpet*.wav", None),
}


def clips(sounds: list[Path]) -> dict[str, np.ndarray]:
    t = np.arange(3 * SR) / SR
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    out = {"tone": tone, "silence": np.zeros(2 * SR, np.float32)}
    speech = spoken(SENTENCE, SR)
    if speech is not None:
        out["speech"] = speech
        n = min(len(speech), len(tone))
        out["speech + tone"] = (speech[:n] + 0.3 * tone[:n]).astype(np.float32)
    from models.audio import decode

    for root in sounds:
        for name, (pattern, seconds) in RECORDINGS.items():
            found = sorted(root.rglob(pattern))
            if not found or name in out:
                continue
            if seconds is not None:
                out[name] = decode(found[0].read_bytes(), SR).samples[: int(seconds * SR)]
            elif name in ("canary", "trumpet"):
                out[name] = decode(found[0].read_bytes(), SR).samples
            else:
                out[name] = np.concatenate([decode(f.read_bytes(), SR).samples for f in found])
    return out


def claims(guard: dict | None) -> str:
    if not guard:
        return "-"
    parts = [f"{c['event']}{' (denied)' if c.get('denied') else ''}: {c.get('verifier_score')} → {judged(c.get('present'))}"
             f"{', unconfirmed' if c.get('unconfirmed') else ''}"
             for c in guard.get("claims", [])]
    return "; ".join(parts) or "none"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="http://127.0.0.1:8000")
    ap.add_argument("--sounds", type=Path, action="append", default=[], help="an unpacked package (megaglest-data, sound-icons); repeatable")
    args = ap.parse_args(argv)
    if not is_loopback(args.host):
        raise SystemExit("loopback hosts only")
    audio = {name: encode(samples, SR, "wav") for name, samples in clips(args.sounds).items()}
    rows, verify_rows = [], []
    with httpx.Client(base_url=args.host, timeout=120) as client:
        for clip, question, policy in QUESTIONS:
            if clip not in audio:
                continue
            fields = {"question": question} | ({} if policy == DEFAULT else {"guard": policy})
            r = client.post("/v1/audio/qa", files={"file": ("clip.wav", audio[clip])}, data=fields)
            body = r.json()
            if r.status_code != 200:
                rows.append([clip, question, policy, f"HTTP {r.status_code}", body.get("error", {}).get("code", ""), "-", "-"])
                continue
            guard = body.get("guard") or {}
            answer = body["answer"] + (f" (model: {body['original_answer']})" if body.get("original_answer") else "")
            served = guard.get("policy", "-") + (" (default)" if policy == DEFAULT else "")
            rows.append([clip, question, served, answer, body["answer_kind"], guard.get("verdict", "-"), claims(guard)])
        for clip, phrases in VERIFY:
            if clip not in audio:
                continue
            r = client.post("/v1/audio/verify", files={"file": ("clip.wav", audio[clip])}, data={"events": phrases})
            for e in r.json().get("events", []):
                verify_rows.append([clip, e["text"], e["event"], e.get("vocabulary") or "-", e["probability"], judged(e["present"])])
    print(table(["clip", "question", "guard", "answer", "kind", "verdict", "claims"], rows))
    print("\n`POST /v1/audio/verify`:\n")
    print(table(["clip", "phrase", "class", "vocabulary", "probability", "judged"], verify_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
