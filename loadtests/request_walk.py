"""Which of Earwitness' files a guarded ``POST /v1/audio/qa`` passes through, in order.

    python -m loadtests.request_walk [--model earwitness-tiny-or-dir] [--question "Describe what you hear."]

The request runs in this process through the fused composition (the ingress's Service over the model server
and the verifier, as ``topology: fused`` builds them; ``split`` adds the two Serve hops and nothing else), and
every Python call is traced. The traced request's clip is fresh (the warm-up request's differs in every sample), so
the verifier hears it rather than answering from its kept results. Printed: the walk (each file once, in the order it
is first entered), the number of files, the re-entries (a file left and entered again later, at the request's top
level of calls), and the calls the request made of the model and verifier deployments, in order: in ``split`` each is
one process hop, and a verifier call after "(the answer)" is a serial one.
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ("earwitness", "serving", "models", "train")


def _ours(filename: str) -> str | None:
    try:
        rel = Path(filename).resolve().relative_to(ROOT)
    except ValueError:
        return None
    return str(rel) if rel.parts and rel.parts[0] in ROOMS else None


def walk(app, wav: bytes, question: str) -> list[str]:
    """The sequence of Earwitness files entered by the request's calls (consecutive repeats folded), the app
    called in this thread's own event loop (its worker threads new, so that they are traced too)."""
    import asyncio

    import httpx
    seen: list[str] = []
    lock = threading.Lock()

    def profile(frame, event, _arg):
        if event == "call":
            f = _ours(frame.f_code.co_filename)
            if f is not None:
                with lock:
                    if not seen or seen[-1] != f:
                        seen.append(f)
        return profile

    async def ask():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://walk") as client:
            return await client.post("/v1/audio/qa", files={"file": ("clip.wav", wav)}, data={"question": question, "guard": "annotate"})

    threading.setprofile(profile)
    sys.setprofile(profile)
    try:
        r = asyncio.run(ask())
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    r.raise_for_status()
    return seen


class Recorded:
    """A deployment's in-process stand-in (``serving.model_client.InProcess``'s shape) that records the calls made of it."""

    def __init__(self, name: str, inner, log: list[str]):
        self.name, self.inner, self.log = name, inner, log

    def __getattr__(self, method: str):
        target = getattr(self.inner, method)

        class Method:
            @staticmethod
            def remote(*args, **kwargs):
                self.log.append(f"{self.name}.{method}")
                return target.remote(*args, **kwargs)

        return Method()


def summary(seen: list[str]) -> tuple[list[str], list[str]]:
    """``(files in order of first entry, files entered again after another file)``."""
    first = list(dict.fromkeys(seen))
    again = [f for i, f in enumerate(seen) if f in seen[:i]]
    return first, list(dict.fromkeys(again))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="earwitness-small")
    ap.add_argument("--question", default="Is there a sound of a dog barking in the audio?")
    args = ap.parse_args(argv)
    import io

    import numpy as np
    import soundfile as sf

    from serving.config import Settings
    from serving.ingress import Service, create_app
    from serving.model_client import InProcess, LocalModel
    from serving.verifier_server import VerifierServer

    settings = Settings(_env_file=None, topology="fused", model=args.model, model_cpus=1)
    calls: list[str] = []
    verifier = Recorded("verifier", InProcess(VerifierServer.func_or_class(settings.model_dump())), calls)
    model = LocalModel(settings, multiplexed=False)
    complete = model.complete

    def recorded_complete(prompt, model_id):
        calls.append("model.complete")
        answer = complete(prompt, model_id)
        answer.add_done_callback(lambda _: calls.append("(the answer)"))  # a verifier call after this one is serial
        return answer

    model.complete = recorded_complete
    service = Service(model, settings, verifier)

    def clip(hz: float) -> bytes:
        buf = io.BytesIO()
        t = np.arange(16_000 * 3) / 16_000
        sf.write(buf, (0.2 * np.sin(2 * np.pi * hz * t)).astype(np.float32), 16_000, format="WAV", subtype="PCM_16")
        return buf.getvalue()

    app = create_app(service)
    question = args.question
    walk(app, clip(440.0), question)  # warm: first calls load lazily
    calls.clear()
    seen = walk(app, clip(523.25), question)  # a clip the verifier has not heard
    first, again = summary(seen)
    print(f"{len(first)} files, {len(seen)} entries, re-entered: {len(again)}")
    print("deployment calls, in order: " + ", ".join(calls))
    for i, f in enumerate(first, 1):
        print(f"{i:2}. {f}")
    if again:
        print("re-entered: " + ", ".join(again))
    return 0


if __name__ == "__main__":
    sys.exit(main())
