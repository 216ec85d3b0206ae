"""The ``earwitness`` command: serve, ask, models (and the data/train/eval commands from train/)."""

from __future__ import annotations

import argparse
import json
import sys


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _serve(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C or SIGTERM (``docker stop``, systemd, ``kill``); either shuts Serve, then Ray, down.

    Both handlers are set once Ray has started: Ray's own SIGTERM handler would print a stack trace and exit
    at once, and a shell starts a background job (``earwitness serve &`` in a script) with SIGINT ignored,
    which Python would keep, so ``kill -INT`` would not stop it. Ray's actors run in process groups of their
    own, so a Ctrl-C to the terminal's group reaches only this process: ``stop()`` ends them.
    """
    import signal

    from serving.config import Settings
    from serving.runtime import start, start_ray, stop

    overrides = {k: v for k, v in {"host": args.host, "port": args.port, "direct_port": args.direct_port, "model": args.model, "adapter": args.adapter}.items() if v is not None}
    settings = Settings(**overrides)
    print(f"earwitness: serving {settings.model} on http://{settings.host}:{settings.port} (Ctrl-C or SIGTERM stops)", file=sys.stderr)
    if settings.direct_port is not None:
        print(f"earwitness: and straight from the ingress replica on http://{settings.host}:{settings.direct_port}", file=sys.stderr)
    start_ray(settings)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        start(settings, blocking=True)
    except KeyboardInterrupt:
        print("earwitness: stopping", file=sys.stderr)
    finally:
        stop()
    return 0


def _ask(args: argparse.Namespace) -> int:
    """Answer in-process, no server: the same intake, backend and answer reading as the service."""
    from serving import audio
    from serving.answers import classify
    from serving.backends import AudioPrompt
    from serving.config import Settings
    from serving.errors import ApiError
    from serving.model_server import make_backend

    try:  # the file first: a missing one should not cost a model load
        with open(args.file, "rb") as fh:
            data = fh.read()
    except OSError as err:
        print(f"earwitness ask: cannot read {args.file}: {err.strerror}", file=sys.stderr)
        return 2
    settings = Settings(**{k: v for k, v in {"model": args.model, "adapter": args.adapter}.items() if v is not None})
    backend, _ = make_backend(settings)
    try:
        clip = audio.decode(data, backend.sample_rate, min(settings.max_audio_s, backend.max_audio_s), args.truncate)
    except ApiError as err:
        print(json.dumps(err.body()).replace("truncate=true", "--truncate"), file=sys.stderr)
        return 2
    generation = backend.generate([AudioPrompt(clip.samples, args.question, args.max_tokens)])[0]
    print(json.dumps({"answer": generation.text, "answer_kind": classify(generation.text), "model": backend.model_name}))
    return 0


def _models(_: argparse.Namespace) -> int:
    from models.registry import REGISTRY

    for spec in REGISTRY.values():
        print(f"{spec.name:28} {spec.family:22} {spec.source}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="earwitness", description=__doc__.replace("``", ""))
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the HTTP API with Ray Serve")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--direct-port", type=int, help="also serve straight from the ingress replica here (no proxy hop)")
    serve.add_argument("--model", help="registered name or checkpoint directory")
    serve.add_argument("--adapter", help="LoRA adapter directory")
    serve.set_defaults(func=_serve)

    ask = sub.add_parser("ask", help="answer one question about one file, in-process")
    ask.add_argument("file")
    ask.add_argument("question")
    ask.add_argument("--model")
    ask.add_argument("--adapter")
    ask.add_argument("--max-tokens", type=int, default=32)
    ask.add_argument("--truncate", action="store_true")
    ask.set_defaults(func=_ask)

    models = sub.add_parser("models", help="list registered models")
    models.set_defaults(func=_models)

    try:  # the training commands need the `train` extra
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
