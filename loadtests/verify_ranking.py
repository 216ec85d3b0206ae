"""The verifier's ranking of the corpus test split's presence questions, through the API and in this process.

    python -m loadtests.verify_ranking --corpus data/corpus --host http://127.0.0.1:8000 --concurrency 4

Each test scene is posted to ``/v1/audio/verify`` with the phrases its presence questions ask about,
``--concurrency`` scenes in flight; the same verifier (``--verifier``) scores the same decoded samples here,
one at a time. Prints the ROC-AUC of both rankings per negative sampling and the largest difference
between any probability the API returned and the one computed here (the API rounds to 4 decimals): with
each request its own, the two rankings are the same numbers (the in-process probabilities rounded to 4
decimals as the API's are, so that both rank the same ties).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import sys
from collections import defaultdict
from pathlib import Path

import httpx
import numpy as np

from loadtests.bench_guard import SERVED_VERIFIER, presence_rows, table
from loadtests.run import is_loopback
from train.data.qa import NEGATIVE_SAMPLINGS as NEGATIVES


def api_scores(host: str, corpus: Path, phrases_by_audio: dict[str, list[str]], concurrency: int) -> dict[tuple[str, str], float]:
    def one(item: tuple[str, list[str]]) -> dict[tuple[str, str], float]:
        audio, phrases = item
        with httpx.Client(base_url=host, timeout=120) as client:
            r = client.post("/v1/audio/verify", files={"file": (Path(audio).name, (corpus / audio).read_bytes())},
                            data={"events": ",".join(phrases)})
        r.raise_for_status()
        return {(audio, e["text"]): e["probability"] for e in r.json()["events"]}

    out: dict[tuple[str, str], float] = {}
    with cf.ThreadPoolExecutor(concurrency) as pool:
        for part in pool.map(one, sorted(phrases_by_audio.items())):
            out.update(part)
    return out


def local_scores(verifier_name: str, corpus: Path, phrases_by_audio: dict[str, list[str]]) -> dict[tuple[str, str], float]:
    from models.audio import decode
    from models.verifier.checkpoint import load_verifier

    verifier = load_verifier(verifier_name)
    out = {}
    for audio, phrases in sorted(phrases_by_audio.items()):
        samples = decode((corpus / audio).read_bytes(), verifier.sample_rate).samples  # as the server decodes it
        out.update({(audio, e.text): round(e.probability, 4) for e in verifier.verify(samples, phrases)})  # as the API rounds
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    ap.add_argument("--host", default="http://127.0.0.1:8000")
    ap.add_argument("--verifier", default=SERVED_VERIFIER, help="the verifier the server runs (default: the served default)")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--per-sampling", type=int, default=0, help="questions per sampling (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not is_loopback(args.host):
        ap.error("loopback hosts only")
    from train.metrics import roc_auc

    rows = presence_rows(args.corpus, args.per_sampling, args.seed)
    phrases: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        if r["phrase"] not in phrases[r["audio"]]:
            phrases[r["audio"]].append(r["phrase"])
    remote = api_scores(args.host, args.corpus, phrases, args.concurrency)
    local = local_scores(args.verifier, args.corpus, phrases)
    diff = max(abs(remote[k] - local[k]) for k in local)
    y = np.array([r["sampling"] == "positive" for r in rows])
    smp = np.array([r["sampling"] for r in rows])
    s_api = np.array([remote[(r["audio"], r["phrase"])] for r in rows])
    s_local = np.array([local[(r["audio"], r["phrase"])] for r in rows])
    out = []
    for name, keep in [("all negatives", np.ones(len(y), bool)), *[(k, (smp == "positive") | (smp == k)) for k in NEGATIVES]]:
        out.append([name, int(keep.sum()), roc_auc(y[keep], s_api[keep]), roc_auc(y[keep], s_local[keep])])
    print(f"{len(rows)} presence questions on {len(phrases)} test scenes; API {args.concurrency} in flight vs in process one at a time\n")
    print(table(["negatives", "questions", f"ROC-AUC via API (c={args.concurrency})", "ROC-AUC in process"], out))
    print(f"\nlargest |API - in process| probability: {diff:.6f}")
    return 0 if diff < 1e-9 else 1


if __name__ == "__main__":
    sys.exit(main())
