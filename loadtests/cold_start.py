"""Cold start of a new model replica, in its parts: the weights' download from the store (once per cache), the
cache hit every later replica pays instead, the load, and the warm-up.

The store is a real S3 server (moto, on a loopback port) reached through s3fs, as a replica reaches S3: the
download's time here is this machine's disk and loopback, not a network's; the load and warm-up are the
transformers engine's on this CPU. A GPU replica's parts (16.8 GB of Qwen2-Audio-7B weights, vLLM's load,
profiling and CUDA graphs) are not measured here.

    python -m loadtests.cold_start [--models earwitness-tiny,earwitness-small] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def measure(name: str, fs, options: dict) -> dict:
    """One cold start of ``name``: upload its checkpoint (not timed), then the parts a new replica pays."""
    from models.loading import checkpoint_source
    from models.registry import resolve
    from models.store import local_copy
    from serving.backends.hf import TransformersBackend
    from tests.test_store import upload

    spec = resolve(name)
    uri = upload(fs, Path(checkpoint_source(spec)), f"cold/{name}")
    with tempfile.TemporaryDirectory(prefix="cold-start-") as cache:
        t0 = time.perf_counter()
        copy = local_copy(uri, options, cache=Path(cache))
        t1 = time.perf_counter()
        assert local_copy(uri, options, cache=Path(cache)) == copy
        t2 = time.perf_counter()
        backend = TransformersBackend.load(dataclasses.replace(spec, source=str(copy)), adapter=spec.adapters.get("default"), device="cpu")
        t3 = time.perf_counter()
        backend.warm_up()
        t4 = time.perf_counter()
        return {"model": name, "mb": _size_mb(copy), "download_s": t1 - t0, "cached_s": t2 - t1, "load_s": t3 - t2, "warm_up_s": t4 - t3}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="earwitness-tiny,earwitness-small")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    from tests.helpers import local_s3
    from tests.test_store import BUCKET

    with local_s3(BUCKET) as (fs, options):
        rows = []
        for name in args.models.split(","):
            runs = [measure(name, fs, options) for _ in range(args.repeats)]
            rows.append({k: (statistics.median(r[k] for r in runs) if k != "model" else name) for k in runs[0]})
    print("| model | weights MB | download once s | later replicas (cache hit) s | load s | warm-up s | cold start, first / later s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        first = r["download_s"] + r["load_s"] + r["warm_up_s"]
        later = r["cached_s"] + r["load_s"] + r["warm_up_s"]
        print(f"| {r['model']} | {r['mb']:.0f} | {r['download_s']:.2f} | {r['cached_s']:.3f} | {r['load_s']:.2f} | {r['warm_up_s']:.2f} | {first:.2f} / {later:.2f} |")
    print(f"(median of {args.repeats}; the store is moto's S3 on loopback; CPU, transformers engine; GPU replicas not measured)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
