"""CPU cost of each verifier member per 10 s clip on one thread: what a fused verifier adds to a guarded request.

    python -m loadtests.bench_members [--members earwitness-verifier models/earwitness-verifier-yamnet ...] [--batch 1 8]

Per member and batch size: the least CPU time (``time.process_time``, one thread) of scoring ``batch`` clips of 10 s
against every class, per clip, over ``--repeats`` runs after a warm-up, and its ratio to the AudioSet tagger's head
(the peer, measured in the same run: this host is shared, so absolute milliseconds move with its load). A head on a
frozen Whisper is timed twice: hearing the clip itself, and reading a served model's layers (``TowerLayers``: what it
costs when the model's tower is its encoder).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from loadtests.bench_guard import table

PEER = "earwitness-verifier-yamnet"


def cpu_ms(fn, repeats: int) -> float:
    """Least CPU time of ``fn()`` in milliseconds, after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best * 1000


def member_cost(verifier, clips: list[np.ndarray], repeats: int) -> dict[str, float]:
    """``{"clip": ms per clip hearing the clips}`` (+ ``"layers"`` for a head that can read a served model's layers)."""
    import torch

    from models.verifier.scorer import TowerLayers

    scorer, texts = verifier.scorer, torch.from_numpy(verifier.class_texts())
    frontend = scorer.frontend
    if hasattr(frontend, "features"):  # clip-only members batch their clips through the network
        waves = torch.from_numpy(np.stack(clips))

        def hear():
            with torch.inference_mode():
                feats = frontend.features(waves)
                scorer(feats, texts)
    else:
        def hear():
            for c in clips:
                frontend._last = None  # the Whisper front end keeps the last clip's frames: time a fresh clip
                verifier.raw_scores(c, verifier.class_texts())
    out = {"clip": cpu_ms(hear, repeats) / len(clips)}
    if verifier.tower is not None:
        from models.pretrained.whisper import encode_layers

        feats = frontend.extractor(clips[:1], sampling_rate=16_000, padding="max_length", return_tensors="pt")["input_features"]
        layers = torch.stack(encode_layers(frontend.tower, feats))[:, 0].numpy()
        given = TowerLayers(layers, len(clips[0]))
        out["layers"] = cpu_ms(lambda: verifier.raw_scores(given, verifier.class_texts()), repeats)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--members", nargs="+", default=["earwitness-verifier", "models/earwitness-verifier-yamnet", "models/earwitness-verifier-aisfx"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    import torch

    from models.verifier.checkpoint import load_verifier

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    verifiers = {v.name: v for v in map(load_verifier, args.members)}
    rows = []
    for batch in args.batch:
        clips = [(0.1 * rng.standard_normal(160_000)).astype(np.float32) for _ in range(batch)]
        costs = {name: member_cost(v, clips, args.repeats) for name, v in verifiers.items()}
        peer = costs.get(PEER, {}).get("clip")
        for name, c in costs.items():
            for how, ms in c.items():
                rows.append([batch, name, "reads the served model's layers" if how == "layers" else "hears the clip",
                             ms, ms / peer if peer else float("nan")])
    print(f"CPU ms per 10 s clip, one thread (least of {args.repeats} after a warm-up); ratio to {PEER} in the same run\n")
    print(table(["clips per call", "member", "how", "ms per clip", f"÷ {PEER}"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
