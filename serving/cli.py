"""Serving's commands of ``earwitness`` (:mod:`earwitness.cli` joins them with train's): serve, ask, models.

``python -m serving.cli`` runs these three alone (an image without train/ still serves); the training commands
(data, train, eval, export) are ``earwitness`` / ``python -m earwitness``."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from serving import intake
from serving.config import Settings, scaled_to_cores, usable_cores
from serving.errors import ApiError
from serving.schemas import AudioInfo, DetectedEvent, GuardInfo


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

    import torch

    from serving.runtime import start, start_ray, stop  # function-level: Ray loads only for the command that serves

    given = {"host": args.host, "port": args.port, "direct_port": args.direct_port, "model": args.model, "adapter": args.adapter, "ray_address": args.address}
    overrides = {k: v for k, v in given.items() if v is not None}
    settings = scaled_to_cores(Settings(**overrides), usable_cores(), gpu=torch.cuda.is_available())
    print(f"earwitness: serving {settings.model} on http://{settings.host}:{settings.port} (Ctrl-C or SIGTERM stops)", file=sys.stderr)
    print(f"earwitness: {settings.model_replicas} model replica(s) (EARWITNESS_MODEL_REPLICAS sets the count)", file=sys.stderr)
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
    """Answer in-process, no server, as ``POST /v1/audio/qa`` would: the same checks and errors (printed as the
    API's JSON body, exit 2), the same model, guard and response fields. The file and the question are checked
    before the model loads."""
    import asyncio

    settings = Settings(**{k: v for k, v in {"model": args.model, "adapter": args.adapter}.items() if v is not None})
    try:
        with open(args.file, "rb") as fh:
            data = fh.read()
    except OSError as err:
        print(f"earwitness ask: cannot read {args.file}: {err.strerror}", file=sys.stderr)
        return 2
    try:
        question = intake.check_question(args.question, settings)
        max_tokens = intake.check_max_tokens(args.max_tokens, settings)
        policy = args.guard or settings.guard_policy  # None: the model's own default, known once it is loaded
        asyncio.run(intake.decode_upload(data, settings, 16_000, truncate=args.truncate))  # a bad file fails before the model loads
        body = asyncio.run(_answer(settings, data, question, max_tokens, policy, args.truncate, args.events))
    except ApiError as err:
        print(json.dumps(err.body()).replace("truncate=true", "--truncate"), file=sys.stderr)
        return 2
    print(json.dumps(body))
    return 0


@contextlib.contextmanager
def in_process_service(settings, guarded: bool = True):
    """The service ``earwitness serve`` runs, in this process: the model (its batcher included) and, when ``guarded``,
    the verifier, called as the deployments are; the model is closed on exit."""
    # function-level: the model, the verifier and Ray load only for the command that answers
    from serving.ingress import Service
    from serving.model_client import InProcess, LocalModel

    verifier = None
    if guarded and settings.verifier:
        from serving.verifier_server import VerifierServer  # function-level: the verifier's networks load only when asked for

        verifier = InProcess(VerifierServer.func_or_class(settings.model_dump()))
    model = LocalModel(settings, multiplexed=False)
    try:
        yield Service(model, settings, verifier)
    finally:
        model.close()


async def _answer(settings, data: bytes, question: str, max_tokens: int, policy: str | None, truncate: bool, events: bool = False) -> dict:
    """The QA endpoint's answer, computed by the service in this process (model and, unless the policy is 'off' and no
    ``events`` are asked for, verifier; ``policy`` None: the model's own default, never 'off'); ``events``: with the
    verifier's detections, as ``POST /v1/audio/events`` lists them."""
    with in_process_service(settings, guarded=policy != "off" or events) as service:
        model_id, info = await service.resolve_model(None)
        clip = await intake.decode_upload(data, settings, info["sample_rate"], info["max_audio_s"], truncate)
        outcome = (await service.hear("cli", clip, question, max_tokens, service.guard.policy_for(policy, info), model_id)).outcome
        report = await service.events(clip) if events else None
    return {"answer": outcome.answer, "answer_kind": outcome.kind, "original_answer": outcome.original_answer,
            "guard": GuardInfo(**outcome.guard_dict()).model_dump(), "model": info["model"],
            "audio": AudioInfo.from_clip(clip).model_dump()} | (
            {"events": [DetectedEvent(**d.to_dict()).model_dump() for d in report.detections]} if report is not None else {})


def _models(_: argparse.Namespace) -> int:
    from models.registry import REGISTRY  # function-level: the registry's families load torch, which --help need not

    for spec in REGISTRY.values():
        print(f"{spec.name:28} {spec.family:22} {spec.source}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``serve``, ``ask`` and ``models`` to an argparse CLI."""
    serve = sub.add_parser("serve", help="serve the HTTP API with Ray Serve")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    serve.add_argument("--port", type=int, help="HTTP port (default 8000)")
    serve.add_argument("--direct-port", type=int, help="also serve straight from the ingress replica here (no proxy hop)")
    serve.add_argument("--model", help="registered name or checkpoint directory")
    serve.add_argument("--adapter", help="LoRA adapter directory")
    serve.add_argument("--address", help="deploy onto this running Ray cluster (`ray start --head` prints it) instead of starting one")
    serve.set_defaults(func=_serve)

    ask = sub.add_parser("ask", help="answer one question about one file, in-process",
                         description="Answer one question about one audio file in this process, as POST /v1/audio/qa would "
                         "(same checks, model, guard and JSON fields); errors print the API's JSON error and exit 2.")
    ask.add_argument("file", help="the audio file (WAV, FLAC, OGG/Vorbis or MP3)")
    ask.add_argument("question", help='a question about it, e.g. "Is there a dog barking?"')
    ask.add_argument("--model", help="registered model name or checkpoint directory (default: the served default)")
    ask.add_argument("--adapter", help="LoRA adapter directory (default: the model's shipped adapter)")
    ask.add_argument("--max-tokens", type=int, default=None, help="most tokens to generate (default: the server's default_max_tokens)")
    ask.add_argument("--guard", choices=["off", "annotate", "abstain", "correct"], default=None,
                     help="absent-sound guard policy (default: EARWITNESS_GUARD_POLICY, else the model's own default)")
    ask.add_argument("--truncate", action="store_true", help="cut audio longer than the limit instead of refusing it")
    ask.add_argument("--events", action="store_true", help="also list the sounds the verifier hears, with their times (as POST /v1/audio/events)")
    ask.set_defaults(func=_ask)

    models = sub.add_parser("models", help="list registered models")
    models.set_defaults(func=_models)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.cli", description=__doc__.replace("``", ""))
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
