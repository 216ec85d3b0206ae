"""Requests per second at concurrency 1, 4 and 8 against a running server, guard off and on, side by side.

    python -m loadtests.bench_concurrency --host http://127.0.0.1:8000

Closed loop: each of c clients sends its next guarded (or unguarded) ``POST /v1/audio/qa`` as soon as the last is
answered, over 16 different 10 s clips. Prints one row per guard policy with req/s per concurrency and the c=8 / c=1
ratio (what batching or more replicas buy on this machine). Loopback hosts only.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import sys
import time

import httpx

from loadtests.equivalence import make_clips
from loadtests.run import is_loopback

QUESTION = "Is there a sound of a dog barking in the audio?"


def rate(host: str, clips: list[bytes], guard: str, concurrency: int, requests: int) -> tuple[float, int]:
    """(requests per second, how many were answered 200)."""
    def client(k: int) -> list[int]:
        with httpx.Client(base_url=host, timeout=120) as c:
            return [c.post("/v1/audio/qa", files={"file": ("c.wav", clips[i % len(clips)])},
                           data={"question": QUESTION, "guard": guard, "max_tokens": "8"}).status_code
                    for i in range(k, requests, concurrency)]

    start = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        codes = [code for codes in pool.map(client, range(concurrency)) for code in codes]
    return requests / (time.perf_counter() - start), codes.count(200)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="http://127.0.0.1:8000")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--per-client", type=int, default=8, help="requests per client at each level (c=1: 12)")
    args = ap.parse_args(argv)
    if not is_loopback(args.host):
        ap.error("loopback hosts only")
    clips = make_clips(16, seed=9, window_s=10.0, short_s=10.0)
    rate(args.host, clips, "off", 2, 4)  # warm up
    print("| guard | " + " | ".join(f"c={c} req/s" for c in args.levels) + f" | c={args.levels[-1]} / c={args.levels[0]} |")
    print("| --- |" + " --- |" * (len(args.levels) + 1))
    for guard in ("off", "annotate"):
        rates = [rate(args.host, clips, guard, c, args.per_client * c if c > 1 else 12)[0] for c in args.levels]
        print(f"| {guard} | " + " | ".join(f"{r:.2f}" for r in rates) + f" | {rates[-1] / rates[0]:.2f}× |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
