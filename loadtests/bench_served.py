"""What a user reads from the served default, on the corpus test split (recordings never heard in training); tables.

    python -m loadtests.bench_served --corpus data/corpus                      # presence + captions, default settings
    python -m loadtests.bench_served --corpus data/corpus --captions 0         # presence only

The service ``earwitness serve`` runs, built in this process (``serving.cli.in_process_service``: the model with its
batcher, the verifier, the guard, the policy each request gets), with default settings unless ``--guard`` names a
policy for every request: the same code path as HTTP minus the transport.

1. Presence: the balanced questions (present sounds, and absent ones drawn at random, popular and adversarial),
   ``--per-sampling`` of each. Accuracy of the model's own answer (``original_answer`` when the guard changed it) and
   of the answer served, and how often a true 'yes' was overridden.
2. Captions (the test split's caption prompts): the sounds each answer mentions, as the guard matches them to
   classes, against the scene's timeline. Share of mentioned-but-absent sounds in the model's caption and in the
   caption served, present sounds lost (mentioned by the model, gone from the served answer), and how the answers
   ended: unchanged, cut, or replaced by the verifier's description.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

from loadtests.bench_guard import presence_rows, rates, table
from models.answers import classify


async def _heard(service, rows: list[dict], corpus: Path, max_tokens: int, guard: str | None, concurrency: int) -> list:
    """Each row's outcome, asked as a request would be, ``concurrency`` at a time (the model's batcher batches them)."""
    from serving import intake

    model_id, info = await service.resolve_model(None)
    policy = service.guard.policy_for(guard, info)
    gate = asyncio.Semaphore(concurrency)

    async def one(r: dict):
        async with gate:
            clip = await intake.decode_upload((corpus / r["audio"]).read_bytes(), service.settings, info["sample_rate"],
                                              info["max_audio_s"], truncate=True)
            heard = await service.hear("bench", clip, r["question"], max_tokens, policy, model_id)
            outcome = heard.outcome
            outcome.num_tokens = heard.generation.num_tokens  # kept for the per-claim dump
            done.append(outcome.verdict)
            if len(done) % 50 == 0:
                print(f"  {len(done)}/{len(rows)}", file=sys.stderr, flush=True)
            return outcome

    done: list[str] = []
    outcomes = await asyncio.gather(*(one(r) for r in rows))
    if "unverified" in done:
        raise RuntimeError(f"{done.count('unverified')} answers went out unverified: the verifier failed or timed out")
    return outcomes


def presence_table(rows: list[dict], outcomes: list) -> list[list]:
    """``bench_guard.rates`` of the model's own answers (``original_answer`` when the guard changed it) and the served ones."""
    return rates(rows, [(classify(o.original_answer or o.answer) == "yes", o.kind == "yes") for o in outcomes])


def caption_counts(rows: list[dict], outcomes: list, timelines: dict, classes: set[str]) -> dict[str, float]:
    """Mentions before (every free-text claim the guard matched to a class) and after (those the served answer keeps,
    or, when the verifier's description replaced it, the ontology classes it names: an AudioSet-vocabulary name has no
    label in the timelines to be checked against, so it is counted apart), against each scene's sounds."""
    mentioned = absent = mentioned_after = absent_after = present_before = present_lost = audioset_named = 0
    ended = {"unchanged": 0, "cut": 0, "described": 0, "abstained": 0}
    for r, o in zip(rows, outcomes):
        t = timelines[r["scene_id"]]
        there = {e["label"] for e in t["events"]} | ({(t.get("background") or {}).get("label")} - {None})
        said = {c.event for c in o.claims if c.source == "answer"}
        if o.described:
            kept = set(o.described) & classes
            audioset_named += len(set(o.described) - classes)
        elif o.abstained:
            kept = set()
        else:
            kept = {c.event for c in o.claims if c.source == "answer" and not (o.original_answer and c.unconfirmed)}
        ended["described" if o.described else "abstained" if o.abstained else "cut" if o.original_answer else "unchanged"] += 1
        mentioned += len(said)
        absent += len(said - there)
        mentioned_after += len(kept)
        absent_after += len(kept - there)
        present_before += len(said & there)
        present_lost += len((said & there) - kept)
    return {"mentioned": mentioned, "absent_share": absent / mentioned if mentioned else 0.0,
            "mentioned_after": mentioned_after, "absent_share_after": absent_after / mentioned_after if mentioned_after else 0.0,
            "present_mentions": present_before, "present_lost": present_lost / present_before if present_before else 0.0,
            "audioset_named": audioset_named, **ended}


def claim_dump(rows: list[dict], outcomes: list, timelines: dict) -> list[dict]:
    """Each caption's free-text claims with their evidence and the truth, to weigh other keeping rules offline."""
    out = []
    for r, o in zip(rows, outcomes):
        t = timelines[r["scene_id"]]
        there = {e["label"] for e in t["events"]} | ({(t.get("background") or {}).get("label")} - {None})
        for c in o.claims:
            if c.source == "answer":
                out.append({"scene": r["scene_id"], "event": c.event, "score": c.verifier_score, "contrast": c.contrast,
                            "tokens": getattr(o, "num_tokens", None), "present": c.present, "there": c.event in there})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtests.bench_served")
    ap.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    ap.add_argument("--model", default=None, help="default: the served default")
    ap.add_argument("--guard", default=None, help="a policy for every request (default: none named, as a user's request)")
    ap.add_argument("--per-sampling", type=int, default=150, help="presence questions per sampling (0 skips part 1)")
    ap.add_argument("--captions", type=int, default=150, help="caption prompts (0 skips part 2)")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=900.0, help="request and verifier timeouts, s (the served defaults are 60 and 5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args(argv)

    from serving.cli import in_process_service
    from serving.config import Settings
    from train.data.formats import read_timelines
    from train.evaluate import MAX_TOKENS

    # the defaults but for patience: a CPU shared with other work must not turn a slow answer into a 504 or an 'unverified'
    settings = Settings(**({"model": args.model} if args.model else {}), **({"guard_policy": args.guard} if args.guard else {}),
                        request_timeout_s=args.timeout, verifier_timeout_s=args.timeout)
    numbers: dict = {"model": settings.model, "verifier": settings.verifier}
    with in_process_service(settings) as service:
        info = asyncio.run(service.model_info())
        policy = service.guard.policy_for(None, info)
        numbers["policy"] = policy
        print(f"# What the served default answers ({settings.model}, verifier {settings.verifier}, policy '{policy}': "
              f"{'--guard' if args.guard else 'the model default'}), corpus test split\n")
        if args.per_sampling > 0:
            rows = presence_rows(args.corpus, args.per_sampling, args.seed + 1)
            t0 = time.time()
            outcomes = asyncio.run(_heard(service, rows, args.corpus, MAX_TOKENS["presence"], None, args.concurrency))
            result = presence_table(rows, outcomes)
            numbers["presence"] = {name: {"model": a, "served": b} for name, a, b, _ in result}
            print(f"## 1. Presence: {len(rows)} balanced questions ({time.time() - t0:.0f} s)\n")
            print(table(["rate", "model's answer", "served answer", "served / model"], result))
        if args.captions > 0:
            rows = [json.loads(line) for line in (args.corpus / "qa" / "test.jsonl").read_text().splitlines()]
            rows = [r for r in rows if r["kind"] == "caption"]
            rows = random.Random(args.seed).sample(rows, min(args.captions, len(rows)))
            t0 = time.time()
            outcomes = asyncio.run(_heard(service, rows, args.corpus, MAX_TOKENS["caption"], None, args.concurrency))
            timelines = read_timelines(args.corpus, "test")
            classes = {c["name"] for c in json.loads((args.corpus / "ontology.json").read_text())["classes"]}
            counts = caption_counts(rows, outcomes, timelines, classes)
            numbers["captions"] = counts
            numbers["caption_claims"] = claim_dump(rows, outcomes, timelines)
            print(f"\n## 2. Captions: {len(rows)} caption prompts ({time.time() - t0:.0f} s)\n")
            print(table(["", "model's caption", "served caption"], [
                ["sounds mentioned", counts["mentioned"], counts["mentioned_after"]],
                ["mentioned but absent", counts["absent_share"], counts["absent_share_after"]],
                ["present sounds lost", 0.0, counts["present_lost"]],
            ]))
            print(f"\nserved captions: {counts['unchanged']} unchanged, {counts['cut']} cut, {counts['described']} replaced by the "
                  f"verifier's description ({counts['audioset_named']} AudioSet-vocabulary names in them, not counted), "
                  f"{counts['abstained']} \"I can't confirm hearing …\"; {counts['present_mentions']} mentions of present sounds before")
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
