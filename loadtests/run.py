"""Run the Locust mix against a server for a bounded time and write a report.

    python -m loadtests.run --host http://127.0.0.1:8000 --users 16 --duration 60s --out runs/load

Writes into --out: samples.csv (one row a request), summary.csv (per scenario and overall: count, req/s,
p50/p95/p99 ms, failures), errors.csv (by status and error code), report.md, latency.png, and Locust's
own CSV files (locust_*.csv). Only loopback hosts unless --allow-non-loopback (for a host you own).
"""

from __future__ import annotations

import argparse
import csv
import ipaddress
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np

HERE = Path(__file__).resolve().parent
MAX_DURATION_S = 1800


def parse_duration(text: str) -> int:
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s?)?", text.strip())
    if not match or not any(match.groups()):
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 60s, 5m, 1m30s)")
    h, m, s = (int(g or 0) for g in match.groups())
    seconds = h * 3600 + m * 60 + s
    if not 1 <= seconds <= MAX_DURATION_S:
        raise argparse.ArgumentTypeError(f"duration must be 1 s .. {MAX_DURATION_S} s")
    return seconds


def is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def percentiles(values) -> tuple[float, float, float]:
    if len(values) == 0:
        return (float("nan"),) * 3
    p50, p95, p99 = np.percentile(np.asarray(values, dtype=float), [50, 95, 99])
    return float(p50), float(p95), float(p99)


def read_samples(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["start"], r["latency_ms"], r["status"] = float(r["start"]), float(r["latency_ms"]), int(r["status"] or 0)
    return rows


def summarize(rows: list[dict], duration_s: float) -> tuple[list[dict], list[dict]]:
    """Per-scenario and overall latency/throughput, and outcomes by kind."""
    summary = []
    for name in sorted({r["scenario"] for r in rows}) + ["ALL"]:
        group = rows if name == "ALL" else [r for r in rows if r["scenario"] == name]
        p50, p95, p99 = percentiles([r["latency_ms"] for r in group])
        summary.append({
            "scenario": name, "requests": len(group), "req_per_s": round(len(group) / duration_s, 2),
            "p50_ms": round(p50, 1), "p95_ms": round(p95, 1), "p99_ms": round(p99, 1),
            "max_ms": round(max((r["latency_ms"] for r in group), default=float("nan")), 1),
            "expected": sum(r["outcome"] == "ok" for r in group),
            "backpressure_503": sum(r["outcome"] == "backpressure" for r in group),
            "unexpected": sum(r["outcome"] not in ("ok", "backpressure") for r in group),
        })
    kinds: dict[tuple, dict] = {}
    for r in rows:
        status = r["status"] or "no response"
        key = (str(status), r["code"] or r["exception"], r["outcome"])
        entry = kinds.setdefault(key, {"status": key[0], "code": key[1], "outcome": key[2], "count": 0, "scenarios": set()})
        entry["count"] += 1
        entry["scenarios"].add(r["scenario"])
    errors = [dict(e, scenarios=", ".join(sorted(e["scenarios"]))) for e in sorted(kinds.values(), key=lambda e: (-e["count"], e["status"]))]
    return summary, errors


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def chart(rows: list[dict], summary: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = min(r["start"] for r in rows)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 8.5), gridspec_kw={"height_ratios": [3, 2]})
    window = 5.0
    edges = np.arange(0, max(r["start"] - t0 for r in rows) + window, window)
    mids, lines, rps = [], {50: [], 95: [], 99: []}, []
    for lo in edges:
        bucket = [r["latency_ms"] for r in rows if lo <= r["start"] - t0 < lo + window]
        if not bucket:
            continue
        mids.append(lo + window / 2)
        for q, v in zip((50, 95, 99), percentiles(bucket)):
            lines[q].append(v)
        rps.append(len(bucket) / window)
    for q, style in ((50, "-"), (95, "--"), (99, ":")):
        ax1.plot(mids, lines[q], style, label=f"p{q}")
    ax1.set_xlabel("seconds into the run (5 s windows, by request start)")
    ax1.set_ylabel("latency (ms)")
    ax1.set_title(title)
    twin = ax1.twinx()
    twin.bar(mids, rps, width=window * 0.8, alpha=0.15, color="grey", label="requests/s")
    twin.set_ylabel("requests/s")
    ax1.legend(loc="upper left")
    twin.legend(loc="upper right")
    scen = [s for s in summary if s["scenario"] != "ALL"]
    x = np.arange(len(scen))
    for i, (key, label) in enumerate((("p50_ms", "p50"), ("p95_ms", "p95"), ("p99_ms", "p99"))):
        ax2.bar(x + (i - 1) * 0.27, [s[key] for s in scen], width=0.27, label=label)
    ax2.set_xticks(x, [s["scenario"] for s in scen], rotation=25, ha="right", fontsize=8)
    ax2.set_ylabel("latency (ms)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(out: Path, args, model: dict, rows: list[dict], summary: list[dict], errors: list[dict], duration_s: float) -> str:
    overall = summary[-1]
    answered = sum(1 for r in rows if r["status"])
    five_xx = [r for r in rows if r["status"] >= 500 and not (r["status"] == 503 and r["code"] == "overloaded")]
    lines = [
        "# Earwitness load test",
        "",
        f"- host: `{args.host}`; model: `{model.get('id')}` (family {model.get('family')}, window {model.get('max_audio_s')} s)",
        f"- {args.users} users, {duration_s:.0f} s measured, seed {args.seed}; clips are synthetic (tones, chords, chirps, noise, silence) made in memory",
        f"- command: `python -m loadtests.run --host {args.host} --users {args.users} --duration {args.duration_text} --out {args.out}`",
        "",
        "## Result",
        "",
        f"- requests: {overall['requests']} ({overall['req_per_s']} req/s); answered (an HTTP response): {answered} "
        f"({'all' if answered == overall['requests'] else str(overall['requests'] - answered) + ' without a response'})",
        f"- latency, all requests: p50 {overall['p50_ms']} ms, p95 {overall['p95_ms']} ms, p99 {overall['p99_ms']} ms, max {overall['max_ms']} ms",
        f"- outcomes: {overall['expected']} as expected, {overall['backpressure_503']} backpressure 503s, {overall['unexpected']} unexpected",
        f"- 5xx other than 503 backpressure: {len(five_xx)}",
        "",
        "## By scenario",
        "",
        "| scenario | requests | req/s | p50 ms | p95 ms | p99 ms | max ms | expected | 503 backpressure | unexpected |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in summary:
        lines.append(f"| {s['scenario']} | {s['requests']} | {s['req_per_s']} | {s['p50_ms']} | {s['p95_ms']} | {s['p99_ms']} | {s['max_ms']} | {s['expected']} | {s['backpressure_503']} | {s['unexpected']} |")
    lines += ["", "## Outcomes by kind", "", "| status | code | outcome | count | scenarios |", "| --- | --- | --- | ---: | --- |"]
    for e in errors:
        lines.append(f"| {e['status']} | {e['code'] or '-'} | {e['outcome']} | {e['count']} | {e['scenarios']} |")
    lines += ["", "![latency](latency.png)", ""]
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="http://127.0.0.1:8000")
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--spawn-rate", type=float, default=None, help="users started per second (default: all at once)")
    parser.add_argument("--duration", default="60s", help="e.g. 60s, 5m (at most 30m)")
    parser.add_argument("--out", type=Path, default=Path("runs/load"))
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--api-key", default=os.environ.get("EARWITNESS_API_KEY"), help="bearer token, when the server wants one")
    parser.add_argument("--allow-non-loopback", action="store_true", help="target a host other than 127.0.0.0/8 or ::1 (one you own)")
    args = parser.parse_args(argv)
    try:
        args.duration_text, args.duration = args.duration, parse_duration(args.duration)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if not 1 <= args.users <= 512:
        parser.error("--users must be 1..512")
    if not is_loopback(args.host) and not args.allow_non_loopback:
        parser.error(f"{args.host} is not a loopback address; pass --allow-non-loopback for a host you own")
    args.out.mkdir(parents=True, exist_ok=True)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        model = httpx.get(f"{args.host}/v1/models", headers=headers, timeout=30).raise_for_status().json()["data"][0]
    except (httpx.HTTPError, KeyError, IndexError) as exc:
        print(f"loadtests: {args.host} does not answer GET /v1/models: {exc}", file=sys.stderr)
        return 2
    samples = args.out / "samples.csv"
    env = dict(os.environ, LOADTEST_SAMPLES=str(samples), LOADTEST_SEED=str(args.seed), LOADTEST_MAX_WINDOW_S=str(model.get("max_audio_s", 10)))
    if args.api_key:
        env["LOADTEST_API_KEY"] = args.api_key
    command = [
        sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless", "--host", args.host,
        "--users", str(args.users), "--spawn-rate", str(args.spawn_rate or args.users), "--run-time", f"{args.duration}s",
        "--stop-timeout", "30", "--csv", str(args.out / "locust"), "--only-summary", "--loglevel", "WARNING",
    ]
    print(f"loadtests: {args.users} users for {args.duration} s against {args.host} ({model['id']})", file=sys.stderr)
    started = time.monotonic()
    proc = subprocess.run(command, env=env, cwd=HERE.parent, timeout=args.duration + 180, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    (args.out / "locust.log").write_text(proc.stdout)
    if not samples.exists():
        print(proc.stdout[-4000:], file=sys.stderr)
        return 2
    rows = read_samples(samples)
    if not rows:
        print("loadtests: no requests were made", file=sys.stderr)
        return 2
    span = max(r["start"] for r in rows) - min(r["start"] for r in rows)
    duration_s = max(min(span, float(args.duration)), 1.0)
    summary, errors = summarize(rows, duration_s)
    write_csv(args.out / "summary.csv", summary)
    write_csv(args.out / "errors.csv", errors)
    chart(rows, summary, args.out / "latency.png", f"Earwitness: {args.users} users, {model['id']}, {args.host}")
    print(report(args.out, args, model, rows, summary, errors, duration_s))
    print(f"\nloadtests: wrote {args.out}/ in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return 0 if summary[-1]["unexpected"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
