"""The ``earwitness`` command: serve, ask, models (from serving/) and data, train, eval, export (from train/).

The one module that imports both halves: serving/ never imports train/, and train/ imports serving/ only for the
evaluation engine. ``python -m earwitness`` runs it too.
"""

from __future__ import annotations

import argparse
import sys

from serving.cli import register as register_serving


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="earwitness", description=__doc__.split("\n")[0].replace("``", ""))
    sub = parser.add_subparsers(dest="command", required=True)
    register_serving(sub)
    try:  # function-level: the training commands need the `train` extra, which a serving image lacks
        from train.cli import register as register_data
        from train.commands import register as register_training
    except ImportError:
        return parser
    register_data(sub)
    register_training(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
