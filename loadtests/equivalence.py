"""Every response is its own request's: the same requests alone, then all at once, must get the same answers.

    python -m loadtests.equivalence --host http://127.0.0.1:8000 --requests 1000 --concurrency 4 16 --out loadtests/results

Different clips (each its own chirp over noise; some fill the model's 10 s window, so a model whose tower is the
verifier's hands its layers over, some are shorter, so the verifier encodes them itself) are asked several
questions on each endpoint that depends on the audio: ``/v1/audio/verify``, guarded ``/v1/audio/qa`` and
``/v1/chat/completions``. Each probe is sent alone first (its reference); then ``--requests`` probes drawn
from them are sent in shuffled order, ``--concurrency`` at a time, and every answer is compared with its
reference in everything that depends on the audio and the text (:func:`content`: the answer, the verdict,
every claim and its verifier score, every verify probability; floats to 4 decimals). A mismatch is counted
and written as a reproducer (``equivalence-repro/NNNN.json``). Load shed is counted apart, not compared: a 503
with Retry-After, and an answer the guard marks ``unverified`` because the verifier could not answer within
``verifier_timeout_s`` (neither claims anything about the audio). A server whose verifier keeps results
(``verifier_cache_size``) answers a repeated clip from them: start it with ``EARWITNESS_VERIFIER_CACHE_SIZE=0``
to make every concurrent request run the encoder. Loopback hosts only.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures as cf
import io
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf

from loadtests.run import is_loopback

SR = 16_000
PHRASES = ("a dog barking", "speech", "a piano", "footsteps")
QUESTIONS = ("Is there a sound of a dog barking in the audio?", "Is there a sound of speech in the audio?",
             "Is there a sound of footsteps in the audio?")
KINDS = ("verify", "qa", "chat")
#: Keys whose values are about the request's handling, not its audio and text.
VOLATILE = {"timing", "request_id", "id", "created", "system_fingerprint"}


def clip(seconds: float, seed: int) -> bytes:
    """A 16-bit WAV no two seeds share: a chirp under an amplitude wobble, over noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    f0, f1 = rng.uniform(150, 600), rng.uniform(800, 4000)
    chirp = np.sin(2 * np.pi * (f0 + (f1 - f0) * t / (2 * seconds)) * t) * (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.2, 2) * t))
    wave = (0.25 * chirp + 0.05 * rng.standard_normal(len(t))).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, wave, SR, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def make_clips(count: int, seed: int = 0, window_s: float = 10.0, short_s: float = 4.0) -> list[bytes]:
    """``count`` distinct clips, alternately filling the window and shorter than it."""
    return [clip(window_s if i % 2 == 0 else short_s, seed * 1000 + i) for i in range(count)]


@dataclass(frozen=True)
class Probe:
    kind: str  # verify | qa | chat
    clip: int
    question: int  # index into QUESTIONS (qa, chat) or the phrase rotation (verify)


def probes(n_clips: int, questions: int = 2) -> list[Probe]:
    return [Probe(k, c, q) for c in range(n_clips) for k in KINDS for q in range(questions)]


def send(client: httpx.Client, probe: Probe, clips: list[bytes], model: str, policy: str = "annotate") -> tuple[int, dict]:
    data = clips[probe.clip]
    if probe.kind == "verify":
        events = [PHRASES[(probe.question + i) % len(PHRASES)] for i in range(3)]
        r = client.post("/v1/audio/verify", files={"file": ("clip.wav", data)}, data={"events": ",".join(events)})
    elif probe.kind == "qa":
        r = client.post("/v1/audio/qa", files={"file": ("clip.wav", data)},
                        data={"question": QUESTIONS[probe.question], "guard": policy, "max_tokens": "8"})
    else:
        audio = {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": "wav"}}
        body = {"model": model, "max_tokens": 8, "earwitness": {"guard": policy},
                "messages": [{"role": "user", "content": [audio, {"type": "text", "text": QUESTIONS[probe.question]}]}]}
        r = client.post("/v1/chat/completions", json=body)
    try:
        return r.status_code, r.json()
    except ValueError:
        return r.status_code, {"raw": r.text[:500]}


def content(value):
    """What a response says about its audio and text: volatile keys dropped, floats to 4 decimals."""
    if isinstance(value, dict):
        return {k: content(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [content(v) for v in value]
    if isinstance(value, float):
        return round(value, 4)
    return value


def references(base: str, clips: list[bytes], todo: list[Probe], model: str, timeout_s: float = 120) -> dict[Probe, tuple[int, dict]]:
    """Each probe alone, one after another."""
    with httpx.Client(base_url=base, timeout=timeout_s) as client:
        return {p: (lambda s, b: (s, content(b)))(*send(client, p, clips, model)) for p in todo}


def burst(base: str, clips: list[bytes], todo: list[Probe], model: str, concurrency: int, timeout_s: float = 120) -> list[tuple[Probe, int, dict]]:
    """``todo`` in its order, ``concurrency`` in flight at once (one client per worker thread)."""
    def run(chunk: list[Probe]) -> list[tuple[Probe, int, dict]]:
        with httpx.Client(base_url=base, timeout=timeout_s) as client:
            return [(p, *(lambda s, b: (s, content(b)))(*send(client, p, clips, model))) for p in chunk]

    # worker i takes probes i, i + c, ...: all c workers are busy from the first request to the last
    chunks = [todo[i::concurrency] for i in range(concurrency)]
    with cf.ThreadPoolExecutor(concurrency) as pool:
        return [row for rows in pool.map(run, chunks) for row in rows]


def _guard(body: dict) -> dict:
    return body.get("guard") or (body.get("earwitness") or {}).get("guard") or {}


def shed(status: int, body: dict) -> bool:
    """Load shed, as documented: a 503 with Retry-After, or an answer the guard marks ``unverified`` because the
    verifier could not answer in time (``verifier_timeout_s``). Neither claims anything about the audio."""
    return status == 503 or _guard(body).get("verdict") == "unverified"


def mismatches(refs: dict[Probe, tuple[int, dict]], answers: list[tuple[Probe, int, dict]]) -> list[dict]:
    """Every answer that differs from its probe's reference (load shed is not an answer: skipped, counted apart)."""
    out = []
    for probe, status, body in answers:
        if shed(status, body):
            continue
        ref_status, ref = refs[probe]
        if status != ref_status or body != ref:
            out.append({"probe": probe.__dict__, "status": status, "reference_status": ref_status, "answer": body, "reference": ref})
    return out


def campaign(base: str, clips: list[bytes], model: str, n_requests: int, concurrency: list[int], seed: int = 0,
             questions: int = 2, progress: bool = False) -> dict:
    """References, then ``n_requests`` shuffled probes per concurrency level: counts per level and the mismatches."""
    todo = probes(len(clips), questions)
    t0 = time.monotonic()
    refs = references(base, clips, todo, model)
    bad_refs = {p: s for p, (s, _) in refs.items() if s != 200}
    if bad_refs:
        raise RuntimeError(f"references not answered 200: {list(bad_refs.items())[:3]}")
    rng = random.Random(seed)
    levels, found = [], []
    for c in concurrency:
        draw = [rng.choice(todo) for _ in range(n_requests)] if n_requests > len(todo) else rng.sample(todo, n_requests)
        start = time.monotonic()
        answers = burst(base, clips, draw, model, c)
        wall = time.monotonic() - start
        diff = mismatches(refs, answers)
        found += [{**m, "concurrency": c} for m in diff]
        levels.append({"concurrency": c, "requests": len(answers), "answered": sum(not shed(s, b) for _, s, b in answers),
                       "differ": len(diff), "req_per_s": len(answers) / wall})
        if progress:
            print(f"c={c}: {len(answers)} requests, {len(diff)} differ, {len(answers) / wall:.1f} req/s", file=sys.stderr)
    return {"clips": len(clips), "probes": len(todo), "levels": levels, "mismatches": found, "seconds": time.monotonic() - t0}


def report(result: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# Equivalence: concurrent answers against alone-references", "",
             f"{result['clips']} clips, {result['probes']} probes (verify, guarded qa, chat), each sent alone first.", "",
             "| concurrency | requests | answered (not shed: 503 or unverified) | differ from reference | req/s |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {lv['concurrency']} | {lv['requests']} | {lv['answered']} | {lv['differ']} | {lv['req_per_s']:.1f} |" for lv in result["levels"]]
    repro = out / "equivalence-repro"
    for i, m in enumerate(result["mismatches"]):
        repro.mkdir(exist_ok=True)
        (repro / f"{i:04d}.json").write_text(json.dumps(m, indent=1))
    if result["mismatches"]:
        lines += ["", f"Reproducers: `{repro.name}/` ({len(result['mismatches'])})."]
    path = out / "equivalence.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="http://127.0.0.1:8000")
    ap.add_argument("--clips", type=int, default=8)
    ap.add_argument("--requests", type=int, default=1000, help="per concurrency level")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("loadtests/results"))
    args = ap.parse_args(argv)
    if not is_loopback(args.host):
        ap.error("loopback hosts only")
    model = httpx.get(f"{args.host}/v1/models", timeout=30).json()["data"][0]["id"]
    result = campaign(args.host, make_clips(args.clips, args.seed), model, args.requests, args.concurrency, args.seed, progress=True)
    print(report(result, args.out).read_text())
    return 1 if result["mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
