"""What a newcomer meets: known clips, everyday phrasings, the answers and verdicts a person reads.

    python -m loadtests.newcomer --host http://127.0.0.1:8000 [--sounds DIR]

Clips, made here: an espeak-ng sentence, a 440 Hz tone, digital silence, the sentence over the tone, and (from
``--sounds``, e.g. the unpacked Debian ``sound-icons`` package: ``apt-get download sound-icons``) a canary and a
trumpet. Each request is a row: clip, question (or verify phrase), policy → answer, answer kind, verdict, the
claims' judgements. Loopback hosts only.
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
QUESTIONS = [
    ("speech", "Is there speech?", "annotate"),
    ("speech", "Can you hear someone talking?", "annotate"),
    ("speech", "Do you hear a dog barking?", "correct"),
    ("speech", "What do you hear?", "annotate"),
    ("speech", "Describe the audio.", "annotate"),
    ("tone", "Did you hear rain?", "annotate"),
    ("tone", "Is a beep audible in this clip?", "annotate"),
    ("tone", "Is there a sound of a dial tone in the audio?", "annotate"),
    ("silence", "Is there a sound of speech in the audio?", "correct"),
    ("silence", "Is there a sound of a dog barking in the audio?", "correct"),
    ("speech + tone", "Are there any beeps?", "annotate"),
    ("canary", "Is there a bird singing?", "correct"),
    ("trumpet", "Can you hear a trumpet?", "correct"),
]
VERIFY = [("speech", ["speech", "music", "a dial tone"]), ("tone", ["a dial tone", "speech"]), ("canary", ["a bird", "a trumpet"])]


def clips(sounds: Path | None) -> dict[str, np.ndarray]:
    t = np.arange(3 * SR) / SR
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    out = {"tone": tone, "silence": np.zeros(2 * SR, np.float32)}
    speech = spoken(SENTENCE, SR)
    if speech is not None:
        out["speech"] = speech
        n = min(len(speech), len(tone))
        out["speech + tone"] = (speech[:n] + 0.3 * tone[:n]).astype(np.float32)
    if sounds is not None:
        from models.audio import decode

        for name, pattern in (("canary", "canary*.wav"), ("trumpet", "trumpet*.wav")):
            found = sorted(sounds.rglob(pattern))
            if found:
                out[name] = decode(found[0].read_bytes(), SR).samples
    return out


def claims(guard: dict | None) -> str:
    if not guard:
        return "-"
    parts = [f"{c['event']}{' (denied)' if c.get('denied') else ''}: {c.get('verifier_score')} → {judged(c.get('present'))}"
             for c in guard.get("claims", [])]
    return "; ".join(parts) or "none"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="http://127.0.0.1:8000")
    ap.add_argument("--sounds", type=Path, default=None, help="a directory holding canary*.wav and trumpet*.wav (sound-icons)")
    args = ap.parse_args(argv)
    if not is_loopback(args.host):
        raise SystemExit("loopback hosts only")
    audio = {name: encode(samples, SR, "wav") for name, samples in clips(args.sounds).items()}
    rows, verify_rows = [], []
    with httpx.Client(base_url=args.host, timeout=120) as client:
        for clip, question, policy in QUESTIONS:
            if clip not in audio:
                continue
            r = client.post("/v1/audio/qa", files={"file": ("clip.wav", audio[clip])}, data={"question": question, "guard": policy})
            body = r.json()
            if r.status_code != 200:
                rows.append([clip, question, policy, f"HTTP {r.status_code}", body.get("error", {}).get("code", ""), "-", "-"])
                continue
            guard = body.get("guard") or {}
            answer = body["answer"] + (f" (model: {body['original_answer']})" if body.get("original_answer") else "")
            rows.append([clip, question, policy, answer, body["answer_kind"], guard.get("verdict", "-"), claims(guard)])
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
