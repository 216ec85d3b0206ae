"""``earwitness data fetch|build|import`` — also runnable alone as ``python -m train.cli data ...``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from train.data.sources import CORE_PACKAGES, EXTRA_PACKAGES, PACKAGES


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``data`` command (with ``fetch``, ``build`` and ``import``) to an existing argparse CLI."""
    data = subparsers.add_parser("data", help="fetch sound sources and build the training corpus")
    sub = data.add_subparsers(dest="data_command", required=True)

    fetch = sub.add_parser("fetch", help="download and unpack the Debian sound packages into the cache")
    fetch.add_argument("--packages", nargs="+", default=None, help="subset of packages, or 'core' / 'extra' (default: all)")
    fetch.add_argument("--cache", type=Path, default=None, help="cache dir (default $EARWITNESS_CACHE or ~/.cache/earwitness)")
    fetch.set_defaults(func=_fetch)

    build = sub.add_parser("build", help="build scenes, questions and preference pairs")
    build.add_argument("--out", type=Path, required=True, help="output directory (replaced)")
    build.add_argument("--scenes", type=int, default=6000, help="training scenes; validation/test get 1/10 and 1/6 of it")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--packages", nargs="+", default=None,
                       help="subset of packages, or 'core' (the original 22, for comparison) / 'extra' (default: all)")
    build.add_argument("--cache", type=Path, default=None)
    build.add_argument("--workers", type=int, default=2, help="processes (capped at 2)")
    build.add_argument("--no-progress", action="store_true")
    build.set_defaults(func=_build)

    imp = sub.add_parser("import", help="a corpus from your own AudioCaps and/or Clotho copy: captions, presence questions "
                                        "from their mentions of the ontology's sounds, LISTEN and ACPO pairs, their own splits")
    imp.add_argument("--out", type=Path, required=True, help="output directory (replaced)")
    imp.add_argument("--audiocaps", type=Path, default=None,
                     help="directory with AudioCaps' train.csv, val.csv, test.csv and the clips you downloaded "
                          "(<youtube_id>_<start>, <youtube_id>, Y<youtube_id> or <audiocap_id>, .wav/.flac/.mp3/.ogg)")
    imp.add_argument("--clotho", type=Path, default=None,
                     help="directory with clotho_captions_{development,validation,evaluation}.csv and the folders "
                          "development/, validation/, evaluation/")
    imp.add_argument("--max-per-split", type=int, default=None, help="only the first N clips of each split and data set")
    imp.add_argument("--seed", type=int, default=0)
    imp.set_defaults(func=_import)


def _packages(names: list[str] | None) -> tuple[str, ...]:
    groups = {"core": CORE_PACKAGES, "extra": EXTRA_PACKAGES, "all": PACKAGES}
    return tuple(p for name in (names or ["all"]) for p in groups.get(name, (name,)))


def _fetch(args: argparse.Namespace) -> int:
    # function-level: the data commands load their builders only when they run
    from train.data.fetching import fetch

    roots, failed = fetch(_packages(args.packages), args.cache, progress=True)
    for pkg, root in roots.items():
        print(f"ok      {pkg:32s} {root}")
    for pkg, why in failed.items():
        print(f"FAILED  {pkg:32s} {why}", file=sys.stderr)
    return 1 if failed and not roots else 0


def _build(args: argparse.Namespace) -> int:
    # function-level: the data commands load their builders only when they run
    from train.data.build import build_corpus

    report = build_corpus(args.out, n_train=args.scenes, seed=args.seed, packages=_packages(args.packages),
                          cache=args.cache, workers=args.workers, progress=not args.no_progress)
    summary = {s: {k: d[k] for k in ("scenes", "hours", "source_clips")} for s, d in report["splits"].items()}
    print(json.dumps({"out": str(args.out), "seconds": report["build_seconds"], "disk_bytes": report["disk_bytes"],
                      "splits": summary, "skipped": report["skipped"]}, indent=1))
    return 0


def _import(args: argparse.Namespace) -> int:
    # function-level: the data commands load their builders only when they run
    from train.data.captions import import_captions

    if args.audiocaps is None and args.clotho is None:
        raise SystemExit("earwitness data import: give --audiocaps DIR and/or --clotho DIR")
    report = import_captions(args.out, audiocaps=args.audiocaps, clotho=args.clotho, seed=args.seed, max_per_split=args.max_per_split)
    print(json.dumps({"out": str(args.out), "seconds": report["build_seconds"], "splits": report["splits"], "skipped": report["skipped"]}, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.cli")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
