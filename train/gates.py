"""Every stage's artefact measured the same three ways, so that a gap between hearing and answering shows the day it opens.

For a model (an earwitness-small directory, its aligned adapter merged when it has one: the language model as served),
on a split's presence questions:

- **oracle**: ROC-AUC of logit(Yes) − logit(No) at the answer position with the *true* sound names laid at the served
  audio positions in the served chat layout (``train.lookup``'s oracle tokens): can the language model answer from
  perfect hearing?
- **served**: the same with the model's own audio tokens (its tower → its projector): does the audio path speak the
  language the lookup reads?
- **reader** (``--reader``, a diagnostic, not a gate): what the served tokens hold for any linear reader — a per-position
  class read-out of them fitted on the train split's strong labels, the asked class's largest logit over positions
  less its training log-odds. Gate 2 asks the lookup to read its tokens about as well as this.
- **generated**: the model's greedy answers through the serving backend on the balanced presence sets (accuracy,
  yes-rate, adversarial false "yes", unparseable share) plus count questions, so answers that left their form show.

``python -m train.gates --model models/earwitness-small --corpus data/corpus`` prints the gate table.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from models.families import unwrap
from models.loading import load
from models.registry import resolve
from models.small import SmallSpec
from serving.backends.hf import TransformersBackend
from train.audio_path import AudioPath, load_trunks
from train.binding import checkpoint_lm
from train.data.ontology import load_ontology
from train.data.qa import read_qa_rows
from train.evaluate import EvalPlan, evaluate
from train.data.report import headline
from train.frozen_features import encoder_outputs
from train.lookup import mix_names, name_embeddings, oracle_split, phrase_word_ids, presence_margins
from train.metrics import roc_auc

#: Gate 1 (the lookup reads perfect hearing) and gate 2 (the audio path speaks its language), validation ROC-AUC.
ORACLE_GATE = 0.93
SERVED_GATE = 0.85


@dataclass(frozen=True)
class GatePlan:
    """How much of each split is measured: ``questions`` presence questions for the ROC-AUCs (None: all), and the
    generated answers on ``per_sampling`` positives and negatives of each sampling plus ``counts`` count questions
    (``EvalPlan``, seeded like the model card's, so 150 gives the card's own questions)."""

    splits: tuple[str, ...] = ("validation", "test")
    questions: int | None = None
    per_sampling: int = 150
    counts: int = 30
    generated_split: str = "test"
    seed: int = 0


def served_model(model_dir: str | Path, adapter: bool = True):
    """``(processor, model)`` as served: the directory's aligned adapter (``adapter/``) merged when there is one."""
    spec = resolve(str(model_dir))
    adapter_dir = Path(spec.source) / "adapter"
    processor, model = load(spec, device="cpu")
    if adapter and (adapter_dir / "adapter_config.json").exists():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return processor, model.float().eval()


def presence_rows(corpus_dir: Path, split: str, questions: int | None, seed: int = 0) -> list:
    rows = [r for r in read_qa_rows(corpus_dir, split) if r.kind == "presence"]
    return rows if questions is None or questions >= len(rows) else random.Random(seed).sample(rows, questions)


def oracle_auc(lm, tokenizer, corpus_dir: Path, split: str, rows: list, n_audio: int, window_s: float) -> float:
    """Presence ROC-AUC of ``lm`` (a ``Qwen2ForCausalLM``) on ``rows`` over the true names at ``n_audio`` positions."""
    ontology = load_ontology(corpus_dir / "ontology.json")
    data = oracle_split(corpus_dir, split, ontology.names, n_audio, window_s)
    names = name_embeddings(lm.model.embed_tokens.weight.detach().float(), phrase_word_ids(ontology, tokenizer))
    margins = presence_margins(lm, tokenizer, lambda ids: mix_names(data.active[[data.rows_of[s] for s in ids]], names), rows, n_audio)
    return roc_auc(np.array([r.answer == "Yes" for r in rows]), margins)


@torch.no_grad()
def served_tokens(model, processor, corpus_dir: Path, scene_audio: dict[str, str]) -> dict[str, torch.Tensor]:
    """Each scene's audio tokens as the served model makes them: its own tower (distilled layers included) on the
    clip's mel features, then its projector."""
    extractor = processor.feature_extractor
    ids = sorted(scene_audio)
    clips = [sf.read(corpus_dir / scene_audio[s], dtype="float32")[0] for s in ids]
    out: dict[str, torch.Tensor] = {}
    for start in range(0, len(ids), 16):
        feats = extractor(clips[start : start + 16], sampling_rate=extractor.sampling_rate, padding="max_length", return_tensors="np")
        hidden = encoder_outputs(model, feats["input_features"], batch_size=16)
        tokens = model.model.multi_modal_projector(hidden.to(next(model.parameters()).dtype)).float()
        out.update(zip(ids[start : start + 16], tokens))
    return out


def served_auc(model, processor, lm, corpus_dir: Path, rows: list) -> float:
    tokens = served_tokens(model, processor, corpus_dir, {r.scene_id: r.audio for r in rows})
    n_audio = next(iter(tokens.values())).shape[0]
    margins = presence_margins(lm, processor.tokenizer, lambda ids: torch.stack([tokens[s] for s in ids]), rows, n_audio)
    return roc_auc(np.array([r.answer == "Yes" for r in rows]), margins)


def generated(model, processor, corpus_dir: Path, plan: GatePlan, name: str = "model") -> dict:
    """Greedy answers through the serving backend: the headline presence numbers, the unparseable share, count error."""
    result = evaluate(TransformersBackend(name, processor, model), corpus_dir, plan.generated_split,
                      EvalPlan(presence_per_sampling=plan.per_sampling, per_temporal_kind=plan.counts, captions=0, seed=plan.seed),
                      progress=False)
    head = headline({name: result})[name]
    presence = result["presence"]
    return {"presence_accuracy": head["presence_accuracy"], "yes_rate": head["yes_rate"],
            "adversarial_false_yes": head["adversarial_false_yes"],
            "unparseable": float(np.mean([p["unparseable_rate"] for p in presence.values()])),
            "count_error": head["count_error"], "examples": result["examples"][:6]}


def split_gates(model, processor, corpus_dir: str | Path, plan: GatePlan = GatePlan(), served: bool = True, log=print) -> dict:
    """``{split: {questions, oracle_auc, served_auc}}`` of a model as served (a PEFT adapter merged first)."""
    corpus_dir = Path(corpus_dir)
    model = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    lm = checkpoint_lm(unwrap(model)).eval()
    spec = SmallSpec(**unwrap(model).config.earwitness_small_spec)
    out = {}
    for split in plan.splits:
        rows = presence_rows(corpus_dir, split, plan.questions, plan.seed)
        out[split] = {"questions": len(rows),
                      "oracle_auc": round(oracle_auc(lm, processor.tokenizer, corpus_dir, split, rows, spec.audio_tokens, float(spec.window_s)), 4),
                      "served_auc": round(served_auc(unwrap(model), processor, lm, corpus_dir, rows), 4) if served else float("nan")}
        log(f"[gates] {split}: {json.dumps(out[split])}")  # a long measurement shows as it goes
    return out


def measure(model_dir: str | Path, corpus_dir: str | Path, plan: GatePlan = GatePlan(), adapter: bool = True,
            answers: bool = True, served: bool = True) -> dict:
    """The gate row of one artefact: ``{split: {oracle_auc, served_auc, questions}, generated: {...}}``."""
    processor, model = served_model(model_dir, adapter)
    out: dict = {"model": str(model_dir), "adapter": adapter, "plan": asdict(plan)}
    out.update(split_gates(model, processor, corpus_dir, plan, served, log=lambda line: print(line, flush=True)))
    if answers:
        out["generated"] = generated(model, processor, Path(corpus_dir), plan)
    return out


def gate_table(rows: dict[str, dict]) -> str:
    """One line per artefact: oracle and served ROC-AUC per split, generated answers on the test split."""
    lines = ["| artefact | split | oracle ROC-AUC | served ROC-AUC | generated: presence accuracy | yes-rate | adversarial false 'yes' | unparseable |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, m in rows.items():
        g = m.get("generated", {})
        for split in m["plan"]["splits"]:
            gen = (f"{100 * g['presence_accuracy']:.1f} | {100 * g['yes_rate']:.1f} | {100 * g['adversarial_false_yes']:.1f} | "
                   f"{100 * g['unparseable']:.1f}") if g and split == m["plan"]["generated_split"] else "– | – | – | –"
            lines.append(f"| {name} | {split} ({m[split]['questions']} q) | {m[split]['oracle_auc']:.3f} | {m[split]['served_auc']:.3f} | {gen} |")
    return "\n".join(lines)


def reader_ceiling(model_dir: str | Path, corpus_dir: str | Path, epochs: int = 60, seed: int = 0, log=print) -> dict:
    """Validation presence ROC-AUC of a linear per-position class read-out of the model's own audio tokens (earwitness-
    small after LISTEN: its cached trunk → its trained top layers → its projector), trained with per-position BCE on the
    train split's strong labels; a question's score is the asked class's largest logit over positions less the class's
    training log-odds (questions ask about rare and frequent sounds alike). Also the raw largest logit and the
    per-position micro ROC-AUC."""
    corpus_dir = Path(corpus_dir)
    torch.manual_seed(seed)
    model = unwrap(served_model(model_dir)[1])
    spec = SmallSpec(**model.config.earwitness_small_spec)
    names = load_ontology(corpus_dir / "ontology.json").names
    path = AudioPath(model, min(spec.tower_layers), len(names), float(spec.window_s)).eval()  # the served path, from the trunk
    data = {}
    for split in ("train", "validation"):
        trunks = load_trunks(corpus_dir, split, names, spec, path.cut, progress=False)
        with torch.no_grad():
            tokens = torch.cat([path(torch.from_numpy(np.asarray(trunks.frames[i:i + 32], dtype=np.float32)))[0] for i in range(0, len(trunks.rows_of), 32)])
        data[split] = (tokens, trunks.positions.float(), trunks.rows_of)
    x, y, _ = data["train"]
    mean, std = x.reshape(-1, x.shape[-1]).mean(0), x.reshape(-1, x.shape[-1]).std(0) + 1e-5
    read = torch.nn.Linear(x.shape[-1], len(names))
    optimizer = torch.optim.Adam(read.parameters(), 1e-2)
    for epoch in range(epochs):
        for i in torch.randperm(len(x)).split(256):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(read((x[i] - mean) / std), y[i])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if (epoch + 1) % 20 == 0:
            log(f"reader epoch {epoch + 1}: loss {loss.item():.4f}")
    prior = torch.logit(y.mean((0, 1)).clamp(1e-4, 1 - 1e-4))
    x, y, rows_of = data["validation"]
    with torch.no_grad():
        logits = read((x - mean) / std)
    index = {n: i for i, n in enumerate(names)}
    rows = [r for r in read_qa_rows(corpus_dir, "validation") if r.kind == "presence" and r.scene_id in rows_of]
    truth = np.array([r.answer == "Yes" for r in rows])
    top = np.array([logits[rows_of[r.scene_id], :, index[r.label]].max().item() for r in rows])
    less_prior = top - np.array([prior[index[r.label]].item() for r in rows])
    flat, labels = logits.reshape(-1, len(names)), y.reshape(-1, len(names))
    heard_classes = labels.sum(0) > 0
    return {"questions": len(rows), "reader_auc": round(roc_auc(truth, less_prior), 4), "reader_auc_no_prior": round(roc_auc(truth, top), 4),
            "position_micro_auc": round(roc_auc(labels[:, heard_classes].flatten().numpy() > 0, flat[:, heard_classes].flatten().numpy()), 4)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--corpus", default="data/corpus")
    parser.add_argument("--questions", type=int, default=None, help="presence questions per split for the ROC-AUCs (default: all)")
    parser.add_argument("--per-sampling", type=int, default=150)
    parser.add_argument("--no-adapter", action="store_true", help="the committed layers without the aligned adapter")
    parser.add_argument("--no-answers", action="store_true", help="skip the generated answers")
    parser.add_argument("--oracle-only", action="store_true", help="only the oracle ROC-AUCs (gate 1): no tower run, no answers")
    parser.add_argument("--reader", action="store_true", help="only the linear reader's ROC-AUC over the served tokens (after LISTEN)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.reader:
        print(json.dumps(reader_ceiling(args.model, args.corpus), indent=1))
        return
    result = measure(args.model, args.corpus, GatePlan(questions=args.questions, per_sampling=args.per_sampling),
                     adapter=not args.no_adapter, answers=not (args.no_answers or args.oracle_only), served=not args.oracle_only)
    print(gate_table({Path(args.model).name: result}))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()


def stage_gate(model, processor, corpus_dir: Path, tokens: str, questions: int | None = None, seed: int = 0) -> dict:
    """A stage's gate on its model as it will be committed (a Qwen2-Audio): the validation presence ROC-AUC over
    ``tokens`` — ``"oracle"``, the true names at the served audio positions (gate 1, the lookup stage's, against
    ``ORACLE_GATE``), or ``"served"``, its own tower and projector (gate 2, LISTEN's, against ``SERVED_GATE``) — read
    by its own language model, and whether it passes."""
    rows = presence_rows(Path(corpus_dir), "validation", questions, seed)
    lm = checkpoint_lm(unwrap(model)).eval()
    if tokens == "oracle":
        spec = SmallSpec(**unwrap(model).config.earwitness_small_spec)
        auc, gate = oracle_auc(lm, processor.tokenizer, Path(corpus_dir), "validation", rows, spec.audio_tokens, float(spec.window_s)), ORACLE_GATE
    else:
        auc, gate = served_auc(unwrap(model), processor, lm, Path(corpus_dir), rows), SERVED_GATE
    return {f"{tokens}_validation_auc": round(auc, 4), "questions": len(rows), "gate": gate, "passed": auc >= gate}
