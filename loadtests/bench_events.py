"""What ``POST /v1/audio/events`` costs next to ``POST /v1/audio/verify`` on the same clips.

    python -m loadtests.bench_events --corpus data/corpus --clips 12 --rounds 3
    python -m loadtests.bench_events --host http://127.0.0.1:8000 ...   # a running server started with
                                                                         # EARWITNESS_VERIFIER_CACHE_SIZE=0

Each clip (corpus test scenes, 10 s) is posted to both endpoints one request at a time, the order alternating per
clip, so that all see the same machine load; verify asks about three phrases (two ontology classes and "music", which
the AudioSet vocabulary judges), and again about the two ontology phrases only. By default the real ingress app and verifier deployment class run in this process
with no kept results (``verifier_cache_size=0``): every request is heard anew, which is what the ratio compares.
Prints p50/p90 latency of each and the events/verify p50 ratios (target ≤ 1.2).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import httpx
import numpy as np

# what each verify call asks: three phrases, one of them judged by the AudioSet vocabulary (a second pass of the tagger
# over the clip), and two ontology phrases only (the cheapest verify: one pass of each member)
REQUESTS = {"verify": ["a dog barking", "music", "someone speaking"], "verify (ontology phrases)": ["a dog barking", "someone speaking"],
            "events": None}


def _clips(corpus: Path | None, n: int) -> list[bytes]:
    if corpus is not None:
        return [p.read_bytes() for p in sorted((corpus / "scenes" / "test").glob("*.flac"))[:n]]
    from tests.helpers import encode

    rng = np.random.default_rng(0)
    return [encode((0.05 * rng.standard_normal(160_000)).astype(np.float32), 16_000, "wav") for _ in range(n)]


async def _run(client: httpx.AsyncClient, clips: list[bytes], rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in REQUESTS}
    kinds = list(REQUESTS)
    for r in range(rounds):
        for i, clip in enumerate(clips):
            shift = (i + r) % len(kinds)
            for kind in kinds[shift:] + kinds[:shift]:  # each endpoint first as often as the others
                phrases = REQUESTS[kind]
                start = time.perf_counter()
                resp = await client.post("/v1/audio/events" if phrases is None else "/v1/audio/verify", files={"file": ("c.flac", clip)},
                                         data={} if phrases is None else {"events": ",".join(phrases)})
                elapsed = time.perf_counter() - start
                resp.raise_for_status()
                if r > 0 or i > 0:  # the first clip warms up
                    times[kind].append(elapsed)
    return times


def _in_process_client() -> httpx.AsyncClient:
    from serving.config import Settings
    from serving.ingress import Service, create_app
    from serving.model_client import InProcess
    from serving.verifier_server import VerifierServer

    settings = Settings(_env_file=None, guard_policy="off", verifier_cache_size=0, verifier_timeout_s=300)

    class NoModel:  # the verifier-only endpoints never call the model
        def close(self) -> None:
            pass

    service = Service(NoModel(), settings, InProcess(VerifierServer.func_or_class(settings.model_dump())))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(service)), base_url="http://bench", timeout=300)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=None, help="corpus with scenes/test/*.flac (default: noise clips made here)")
    ap.add_argument("--clips", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--host", default=None, help="a running server (its verifier_cache_size should be 0); default: in process")
    args = ap.parse_args(argv)
    clips = _clips(args.corpus, args.clips)
    client = httpx.AsyncClient(base_url=args.host, timeout=300) if args.host else _in_process_client()

    async def go():
        async with client:
            return await _run(client, clips, args.rounds)

    times = asyncio.run(go())
    p50 = {k: statistics.median(v) for k, v in times.items()}
    p90 = {k: float(np.percentile(v, 90)) for k, v in times.items()}
    print(f"{len(clips)} clips x {args.rounds} rounds, {'server ' + args.host if args.host else 'in process'}, one request at a time\n")
    print("| request | n | p50 ms | p90 ms | p50 / events p50 |\n| --- | --- | --- | --- | --- |")
    for k, phrases in REQUESTS.items():
        name = "/v1/audio/events" if phrases is None else f"/v1/audio/verify ({len(phrases)} phrases: {', '.join(phrases)})"
        print(f"| {name} | {len(times[k])} | {p50[k] * 1000:.0f} | {p90[k] * 1000:.0f} | {p50[k] / p50['events']:.2f} |")
    for k in ("verify", "verify (ontology phrases)"):
        print(f"\nevents / {k} p50: {p50['events'] / p50[k]:.2f}x (target <= 1.2x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
