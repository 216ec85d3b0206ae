"""Benchmark the absent-sound guard on the corpus test split (unseen recordings); prints tables.

    python -m loadtests.bench_guard --corpus data/corpus                 # verifier + policies (+ the model when shipped)
    python -m loadtests.bench_guard --corpus data/corpus --latency 40    # also p50 guarded / unguarded over HTTP

1. Verifier alone: ROC-AUC of its calibrated probability, present vs absent asked-about events
   (the test split's presence questions: positive vs random / popular / adversarial negatives).
2. ``correct`` policy on a model that always says 'yes' (the verifier's judgement alone): its
   false-'yes' rate per negative sampling unguarded (100%) and guarded, and the share of correct
   'yes' answers overridden.
3. The same with a served model (``--model``, default the shipped earwitness-small when it exists):
   its own answers, its audio contrast, the verifier — through the serving code's claims, judgement
   and policy.
4. ``--latency N``: the peer first — the engine's own ``generate`` in this process, one clip at a
   time — then a local Serve app on loopback, N sequential requests each guarded (annotate) and
   unguarded (off), alternating, on the same test clips; p50 of each and their ratios.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import soundfile as sf

from serving.config import Settings
from train.data.qa import NEGATIVE_SAMPLINGS as NEGATIVES

SERVED_VERIFIER = Settings.model_fields["verifier"].default  # the verifier `earwitness serve` runs


def presence_rows(corpus: Path, per_sampling: int, seed: int, split: str = "test") -> list[dict]:
    """A split's presence questions, positives first, then each negative sampling (``per_sampling`` each; 0: all)."""
    rows = [json.loads(line) for line in (corpus / "qa" / f"{split}.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["kind"] == "presence"]
    by = defaultdict(list)
    for r in rows:
        by[r["sampling"]].append(r)
    rng = random.Random(seed)
    out = []
    for s in ("positive", *NEGATIVES):
        out += by[s] if per_sampling <= 0 else rng.sample(by[s], min(per_sampling, len(by[s])))
    return out


def verifier_scores(verifier, corpus: Path, rows: list[dict]) -> tuple[np.ndarray, dict[str, str | None]]:
    """The verifier's probability of each row's asked-about class (one audio pass per scene), and how it matched
    each asked-about phrase: through the text matcher, as a served question's phrase would be."""
    cache: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["scene_id"] not in cache:
            cache[r["scene_id"]] = verifier.class_probabilities(sf.read(corpus / r["audio"], dtype="float32")[0])
    matched = {m.text: m.event for m in verifier.match(sorted({r["phrase"] for r in rows}))}
    return np.array([cache[r["scene_id"]].get(matched.get(r["phrase"]) or r["label"], 0.0) for r in rows]), matched


def table(headers: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def judged(present: bool | None, reason: str | None = None) -> str:
    """A verifier's judgement as a table shows it."""
    return {True: "present", False: "absent"}.get(present, reason or "uncertain")


LENGTHS = (("background bed", None, None), ("events ≥ 2 s", 2.0, None), ("events of 0.5–2 s", 0.5, 2.0), ("events < 0.5 s", 0.0, 0.5))


def event_length(timeline: dict, label: str) -> float | None:
    """How long the asked-about sound lasts in the scene: its longest event, or None for the background bed."""
    if (timeline.get("background") or {}).get("label") == label:
        return None
    spans = [float(e["offset"]) - float(e["onset"]) for e in timeline["events"] if e["label"] == label]
    return max(spans) if spans else None


def length_rows(corpus: Path, rows: list[dict], y: np.ndarray, s: np.ndarray) -> list[list]:
    """ROC-AUC of each length bucket's present questions against all absent ones: where short events get lost."""
    from train.data.formats import read_timelines
    from train.metrics import roc_auc

    timelines = read_timelines(corpus, "test")
    lengths = [event_length(timelines[r["scene_id"]], r["label"]) if r["sampling"] == "positive" else None for r in rows]
    out = []
    for name, low, high in LENGTHS:
        if low is None:
            pos = np.array([bool(y_i) and length is None for y_i, length in zip(y, lengths)])
        else:
            pos = np.array([bool(y_i) and length is not None and low <= length < (high or np.inf) for y_i, length in zip(y, lengths)])
        keep = pos | ~y
        if pos.any():
            out.append([name, int(pos.sum()), roc_auc(pos[keep], s[keep])])
    return out


def guard_outcomes(rows, answers, scores, contrasts, thresholds, policy: str = "correct"):
    """Per row: (model said yes, guarded answer says yes) under ``policy``, through the serving policy code."""
    from models.answers import classify
    from models.questions import read_presence
    from serving.guard.policy import apply_policy, is_prior, judge
    from serving.guard.runner import claim_checks

    out = []
    for r, answer, score, contrast in zip(rows, answers, scores, contrasts):
        checks = [c for c in claim_checks(r["question"], answer, contrast, read_presence(r["question"]))
                  if c.source == "question"]  # the benchmark is about the asked-about sound: a 'yes' to it, or a 'no' (denied)
        for check in checks:
            check.event, check.verifier_score = r["label"], score
            check.present = judge(score, check.contrast, thresholds)
            check.prior = is_prior(check.contrast, thresholds)
        outcome = apply_policy(policy, answer, checks, True)
        out.append((classify(answer) == "yes", classify(outcome.answer) == "yes"))
    return out


def rates(rows, outcomes) -> list[list]:
    table_rows = []
    for s in NEGATIVES:
        idx = [i for i, r in enumerate(rows) if r["sampling"] == s]
        before = np.mean([outcomes[i][0] for i in idx])
        after = np.mean([outcomes[i][1] for i in idx])
        table_rows.append([f"false 'yes' ({s})", float(before), float(after), float(after / before) if before else float("nan")])
    pos = [i for i, r in enumerate(rows) if r["sampling"] == "positive" and outcomes[i][0]]
    overridden = np.mean([not outcomes[i][1] for i in pos]) if pos else float("nan")
    table_rows.append(["correct 'yes' changed", 0.0, float(overridden), ""])
    missed = [i for i, r in enumerate(rows) if r["sampling"] == "positive" and not outcomes[i][0]]
    if missed:  # a 'no' to a sound that is there: `missed` when the verifier hears it, and `correct` says yes
        table_rows.append(["wrong 'no' (present sound denied)", 1.0, float(np.mean([not outcomes[i][1] for i in missed])), ""])
    truth = np.array([r["sampling"] == "positive" for r in rows])
    accuracy = [float(np.mean(np.array([o[k] for o in outcomes]) == truth)) for k in (0, 1)]
    table_rows.append(["presence accuracy (balanced samplings)", *accuracy, accuracy[1] / accuracy[0] if accuracy[0] else float("nan")])
    return table_rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtests.bench_guard")
    ap.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    ap.add_argument("--verifier", default=SERVED_VERIFIER, help="default: the served default")
    ap.add_argument("--model", default=None, help="served model for parts 3 and 4 (default: the embedded default when shipped; 'none' skips)")
    ap.add_argument("--per-sampling", type=int, default=0, help="questions per sampling for parts 1-2 (0: all)")
    ap.add_argument("--model-per-sampling", type=int, default=150, help="questions per sampling for part 3 (0 skips it)")
    ap.add_argument("--latency", type=int, default=0, help="requests per mode for part 4 (0 skips)")
    ap.add_argument("--route", choices=("direct", "proxy"), default="direct",
                    help="part 4: straight to the ingress replica (Serve direct ingress) or through Serve's proxy")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from serving.guard.policy import Thresholds
    from models.verifier.checkpoint import load_verifier
    from train.metrics import ranking_bounds, roc_auc

    verifier = load_verifier(args.verifier)
    cal = verifier.calibration
    thresholds = Thresholds(cal.absent_below, cal.present_above)
    rows = presence_rows(args.corpus, args.per_sampling, args.seed)
    t0 = time.time()
    s, matched = verifier_scores(verifier, args.corpus, rows)
    mismatched = sum(1 for r in rows if matched.get(r["phrase"]) != r["label"])
    y = np.array([r["sampling"] == "positive" for r in rows])
    smp = np.array([r["sampling"] for r in rows])
    auc_rows = []
    for k, keep in [("all negatives", np.ones(len(y), bool)), *[(k, (smp == "positive") | (smp == k)) for k in NEGATIVES]]:
        best, passed = ranking_bounds(y[keep], s[keep])
        auc_rows.append([k, int(y[keep].sum()), int((~y[keep]).sum()), roc_auc(y[keep], s[keep]), best, passed])
    print(f"\n## 1. Verifier alone ({verifier.name}), corpus test split: {len(rows)} presence questions, "
          f"{len({r['scene_id'] for r in rows})} scenes, {time.time() - t0:.0f} s; phrases matched to another class: {mismatched}\n")
    print(table(["negatives", "present", "absent", "ROC-AUC", "best balanced accuracy*", "absent passed at 95% present kept*"], auc_rows))
    print("\n*any threshold, tuned on these very questions: the ceiling of a presence answer read from these scores, "
          "and the floor of `correct`'s false 'yes' where it may override at most 5% of true 'yes' answers")
    print(f"\nthresholds: absent below {cal.absent_below:.4f}, present from {cal.present_above:.4f}")
    print("\nBy the asked-about sound's length in the scene (its present questions against every absent one):\n")
    print(table(["asked-about sound", "present", "ROC-AUC"], length_rows(args.corpus, rows, y, s)))

    always_yes = ["Yes"] * len(rows)
    outcomes = guard_outcomes(rows, always_yes, s, [None] * len(rows), thresholds)
    print("\n## 2. `correct` on a model that always says 'yes' (verifier only)\n")
    print(table(["rate", "unguarded", "guarded", "guarded / unguarded"], rates(rows, outcomes)))
    outcomes = guard_outcomes(rows, ["No"] * len(rows), s, [None] * len(rows), thresholds)
    print("\n`correct` on a model that always says 'no': each 'No' is checked as a claim of absence (`missed` when the "
          "verifier hears the sound, rewritten to 'Yes.')\n")
    print(table(["rate", "unguarded", "guarded", "guarded / unguarded"], rates(rows, outcomes)))

    model = args.model
    if model is None:
        from models.registry import SMALL_DIR

        model = "earwitness-small" if (SMALL_DIR / "trained.safetensors").exists() else "none"
    if model != "none" and args.model_per_sampling > 0:
        model_part(args, model, verifier, thresholds)
    if args.latency:
        latency_part(args, model if model != "none" else None)
    return 0


def model_part(args, model: str, verifier, thresholds) -> None:
    from models.registry import resolve
    from serving.backends import AudioPrompt
    from serving.backends.hf import TransformersBackend
    from models.verifier.scorer import TowerLayers

    spec = resolve(model)
    backend = TransformersBackend.load(spec, adapter=spec.adapters.get("default"))
    share = backend.tower is not None and backend.tower == verifier.tower  # as served (guard_share_encoder): one encoder pass
    rows = presence_rows(args.corpus, args.model_per_sampling, args.seed + 1)
    t0 = time.time()
    answers, contrasts, scores = [], [], []
    clips: dict[str, np.ndarray] = {}
    for i in range(0, len(rows), 8):
        batch = rows[i : i + 8]
        prompts = []
        for r in batch:
            if r["scene_id"] not in clips:
                clips[r["scene_id"]] = sf.read(args.corpus / r["audio"], dtype="float32")[0]
            prompts.append(AudioPrompt(clips[r["scene_id"]], r["question"], 4, contrast=True, tower_layers=share))
        for r, g in zip(batch, backend.generate(prompts)):
            answers.append(g.text)
            contrasts.append(None if g.answer_logprob is None else g.answer_logprob - g.blank_logprob)
            clip = clips[r["scene_id"]]
            events = verifier.verify(clip if g.tower_layers is None else TowerLayers(g.tower_layers, len(clip), clip), [r["phrase"]])
            scores.append(events[0].probability)
    print(f"\n## 3. `correct` on {spec.name} (+ its adapter): its answers, its audio contrast and the verifier "
          f"({len(rows)} questions, {time.time() - t0:.0f} s{'; the encoder shared' if share else ''})\n")
    both = guard_outcomes(rows, answers, scores, contrasts, thresholds)
    print(table(["rate", "unguarded", "guarded", "guarded / unguarded"], rates(rows, both)))
    abstained = guard_outcomes(rows, answers, scores, contrasts, thresholds, "abstain")
    print("\n`abstain` (withholds also what neither signal confirms: unsure verifier + a prior answer):\n")
    print(table(["rate", "unguarded", "guarded", "guarded / unguarded"], rates(rows, abstained)))
    print("\n" + independence(rows, answers, scores))
    c = np.array([x for x in contrasts if x is not None])
    if len(c):
        yes = [x for x, a in zip(contrasts, answers) if x is not None and a.lower().startswith("yes")]
        print(f"\ncontrast (nats): median {np.median(c):.3f}; on 'yes' answers median {np.median(yes) if yes else float('nan'):.3f}")


def independence(rows, answers, scores, threshold: float = 0.5) -> str:
    """How often the verifier is wrong where the model is, against where it is not, and their correlation.

    A second opinion helps only where it errs apart from the first: with a shared audio encoder the
    two could fail on the same clips. The verifier's verdict is its probability against ``threshold``.
    """
    from models.answers import classify

    truth = np.array([r["sampling"] == "positive" for r in rows])
    model_wrong = np.array([(classify(a) == "yes") != t for a, t in zip(answers, truth)])
    verifier_wrong = (np.array(scores) >= threshold) != truth
    both = model_wrong & verifier_wrong
    corr = float(np.corrcoef(model_wrong, verifier_wrong)[0, 1]) if model_wrong.std() and verifier_wrong.std() else float("nan")
    p_given = lambda cond: float(verifier_wrong[cond].mean()) if cond.any() else float("nan")  # noqa: E731
    return (f"independence: model wrong on {model_wrong.mean():.1%}, verifier (p >= {threshold}) wrong on {verifier_wrong.mean():.1%}, "
            f"both on {both.mean():.1%}; verifier wrong where the model is wrong {p_given(model_wrong):.1%}, where it is right "
            f"{p_given(~model_wrong):.1%}; error correlation (phi) {corr:.3f}")


def latency_part(args, model: str | None) -> None:
    import tempfile

    import httpx

    from serving.config import Settings
    from serving.runtime import start, stop
    from tests.helpers import build_tiny_checkpoint, free_port

    port, direct_port = free_port(), free_port()
    if model is None:
        model = str(build_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="ew-bench-model-"))))
    rows = presence_rows(args.corpus, 0, args.seed + 2)
    rng = random.Random(args.seed)
    rng.shuffle(rows)
    in_process = in_process_latency(model, args.corpus, rows[: args.latency])
    settings = Settings(model=model, port=port, direct_port=direct_port if args.route == "direct" else None, verifier=args.verifier,
                        num_cpus=2, verifier_cpus=0, ray_temp_dir=tempfile.mkdtemp(prefix="ew-bench-"))
    start(settings)
    url = f"http://{settings.host}:{settings.direct_port if args.route == 'direct' else settings.port}"
    times = {"off": [], "annotate": []}
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            for mode in ("off", "annotate"):  # warm both paths
                _post(client, args.corpus, rows[0], mode)
            for r in rows[: args.latency]:
                for mode in (("off", "annotate") if rng.random() < 0.5 else ("annotate", "off")):
                    times[mode].append(_post(client, args.corpus, r, mode))
    finally:
        stop()
    p50 = {m: float(np.median(v)) for m, v in times.items()}
    print(f"\n## 4. Latency at concurrency 1 ({Path(model).name}, {args.latency} requests per mode, {args.route} route, this CPU)\n")
    print(table(["mode", "p50 ms", "p90 ms"], [["in-process generate (peer)", float(np.median(in_process)) * 1000, float(np.percentile(in_process, 90)) * 1000]]
                + [[f"served, guard {m}", p50[m] * 1000, float(np.percentile(v, 90)) * 1000] for m, v in times.items()]))
    print(f"\nguarded / unguarded p50: {p50['annotate'] / p50['off']:.3f}; served (guard off) / in-process p50: {p50['off'] / float(np.median(in_process)):.3f}")
    stage_rows = []
    for m, timings in STAGES.items():
        med = {k: float(np.median([t[k] or 0.0 for t in timings])) for k in ("decode_ms", "model_ms", "guard_ms", "total_ms")}
        stage_rows.append([m, med["decode_ms"], med["model_ms"], med["guard_ms"], med["total_ms"]])
    print("\nserver-side medians (ms; the contrast pass is inside model_ms):\n")
    print(table(["mode", "decode", "model", "guard", "total"], stage_rows))


def in_process_latency(model: str, corpus: Path, rows: list[dict]) -> list[float]:
    """The peer: decode the file and run the engine's own ``generate`` in this process, one request at a time."""
    from models.registry import resolve
    from models.audio import decode
    from serving.backends import AudioPrompt
    from serving.backends.hf import TransformersBackend

    spec = resolve(model)
    backend = TransformersBackend.load(spec, adapter=spec.adapters.get("default"))
    out = []
    for i, r in enumerate([rows[0], *rows]):  # the first is a warm-up
        start = time.perf_counter()
        samples = decode((corpus / r["audio"]).read_bytes(), backend.sample_rate).samples
        backend.generate([AudioPrompt(samples, r["question"], 4)])
        if i:
            out.append(time.perf_counter() - start)
    del backend
    return out


def _post(client, corpus: Path, row: dict, mode: str) -> float:
    data = (corpus / row["audio"]).read_bytes()
    start = time.perf_counter()
    r = client.post("/v1/audio/qa", files={"file": ("clip.flac", data)}, data={"question": row["question"], "guard": mode, "max_tokens": "4"})
    elapsed = time.perf_counter() - start
    if r.status_code != 200:
        raise RuntimeError(f"{r.status_code} {r.text}")
    STAGES[mode].append(r.json()["timing"])
    return elapsed


STAGES: dict[str, list[dict]] = defaultdict(list)


if __name__ == "__main__":
    sys.exit(main())
