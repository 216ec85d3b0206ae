"""The recipe of earwitness-small: pretrained parts → base → LISTEN → DPO → evaluation → shipped tensors.

The audio tower (Whisper, frozen, or its distilled form: ``tower``) and the language model (SmolLM2 cut to ``lm_layers``) come from
``models.small``; the supervised stages read the tower's cached outputs (``train.cached_tower``), so the
tower runs once per scene for the whole recipe.

1. **base** — the hallucinating baseline: projector + a LoRA on the cut language model learn
   captions and presence / order / count / duration questions with the absent-sound questions left
   out. The LoRA is then merged: it is part of the base, not an adapter.
1½. **lookup** (``SmallSpec.trained_layers``) — text before audio: the base's language-model layers
   (all of their weights; the word embeddings stay frozen) learn every question kind, absent sounds
   included and presence asked in every trained phrasing, over the sounds' written names laid where the
   audio tokens go (``NameTokens``, at the served audio positions), in the served chat layout. The binding diagnostic
   measured that these layers learn this match in a few hundred steps where a LoRA barely moves. The
   layers are committed, holding the base LoRA merged; the baseline is evaluated before this stage, so
   it stays the positive-only one.
2. **LISTEN** — only the projector changes, the language model frozen. After a lookup it is fitted in
   closed form onto the names the lookup reads (``fit_projector_to_names``); without one, it learns on the
   base's questions plus synthesized absent-sound questions answered "No".
3. **DPO** — TRL with audio on both sides (``train.dpo``), LoRA r=16, α=32 on the language model (the
   LISTEN projector riding along unless a lookup ran: then it is committed as fitted); LISTEN + AHA ×4 +
   ACPO pairs.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from models.families import unwrap
from models.small import BASE_LORA_DIR, LM_TRAINED_PARTS, PARTS_FILE, PROCESSOR_FILES, TRAINED_FILE, SmallSpec, build_untrained, load_trained, read_spec, save_trained
from train.lookup import mix_names, name_embeddings, oracle_split, phrase_word_ids, pool_positions
from train.cached_tower import EncodedForward, collate_encoded
from train.data.formats import read_timelines
from train.data.ontology import load_ontology
from train.data.qa import paraphrased, read_qa_rows
from train.data.report import markdown, plot_stages
from train.data.targets import frame_targets
from train.evaluate import EvalPlan
from train.features import encoder_features
from train.gates import lookup_gate
from train.lora import lora_config
from train.model_card import write_small_model_card
from train.sft import StageConfig, select_rows, train_stage
from train.stages import Laps, align_dpo, ensure_corpus, evaluate_stage, point_adapter_at, versions
from train.tower import distilled_layers, export_whisper

BASE = StageConfig(name="base", trainable="projector_and_lora", samplings=("positive",), epochs=0.6, batch_size=8,
                   learning_rate=1e-3, warmup_steps=20, turns_per_chat=6, caption_share=0.2)
LISTEN = StageConfig(name="listen", trainable="audio_adapter", epochs=0.4, batch_size=8, learning_rate=1e-3,
                     warmup_steps=10, turns_per_chat=6, caption_share=0.1)
# DPO is ~60x the CPU of a supervised answer (two full sequences, policy and reference, the tower on
# both sides): 40 pairs of each of the 7 kinds fit the budget. Weighting the pairs towards absent
# sounds (120 LISTEN, 60 + 60 ACPO, 20 per AHA kind) at lr 1e-3 collapsed to "No" to everything.
DPO_PAIRS = 40
BASELINE_FILE = "baseline.json"  # the base's evaluation, beside it: a later run reusing the base reuses it too
DPO_LEARNING_RATE = 5e-4


LOOKUP_STAGE = StageConfig(name="lookup", trainable="language_model_layers", epochs=0.4, batch_size=8, learning_rate=2e-4,
                           warmup_steps=20, turns_per_chat=6, caption_share=0.2)


@dataclass(frozen=True)
class LookupConfig:
    """The lookup stage: the sounds' written names at ``positions`` steps of the window, the served chat layout."""

    stage: StageConfig = LOOKUP_STAGE
    positions: int | None = None  # None: as many as the served audio tokens (250 for 10 s), the layout the model answers in


LOOKUP = LookupConfig()


class NameTokens(torch.nn.Module):
    """Stands in for the projector during the lookup: class activity ``[B, P, C]`` → the mean input embedding of the
    active classes' written names at each position (zero where nothing sounds), ``train.lookup``'s oracle tokens."""

    def __init__(self, embed: torch.Tensor, word_ids: list[list[int]]):
        super().__init__()
        self.register_buffer("names", name_embeddings(embed, word_ids).detach())

    def forward(self, active: torch.Tensor) -> torch.Tensor:
        return mix_names(active, self.names)


def train_lookup(model, processor, corpus_dir: Path, out_dir: Path, spec: SmallSpec, config: LookupConfig = LOOKUP,
                 progress: bool = True) -> list[dict]:
    """The lookup stage, in place on the base: its language-model layers learn every question kind, absent sounds
    included and presence asked in every trained phrasing, over the sounds' written names laid where the audio tokens go.

    The same supervised answers as the other stages (cross-entropy on the whole answer), so the model keeps
    answering in form; a margin on Yes/No alone left its layers answering "........". Returns the stage's history.
    """

    ontology = load_ontology(corpus_dir / "ontology.json")
    qa = unwrap(model).model
    projector, qa.multi_modal_projector = qa.multi_modal_projector, NameTokens(
        model.get_input_embeddings().weight.float(), phrase_word_ids(ontology, processor.tokenizer))
    data = []
    for split in ("train", "validation"):
        names = oracle_split(corpus_dir, split, ontology.names, config.positions or spec.audio_tokens, float(spec.window_s))
        by_scene = select_rows(paraphrased(read_qa_rows(corpus_dir, split), config.stage.seed), config.stage)
        data.append((names.active.numpy(), names.rows_of, np.zeros(len(names.rows_of), dtype=np.int32), by_scene))
    try:
        history = train_stage(EncodedForward(model), processor.tokenizer, data[0], data[1], config.stage, out_dir,
                              progress=progress, collate_fn=collate_encoded)
    finally:
        qa.multi_modal_projector = projector
    with torch.no_grad():  # in the precision they are committed in (float16), so what is evaluated is what ships
        for name, param in qa.language_model.named_parameters():
            if name.startswith(LM_TRAINED_PARTS):
                param.copy_(param.half().float())
    gate = lookup_gate(model, processor, corpus_dir)  # what the stage claims to teach, measured on what it ships
    (out_dir / "lookup.json").write_text(json.dumps({"config": asdict(config), "history": history, "gate": gate}, indent=2))
    stage = out_dir / "stage.json"
    stage.write_text(json.dumps({**(json.loads(stage.read_text()) if stage.exists() else {}), "gate": gate}, indent=2))
    return history


def fit_projector_to_names(model, processor, corpus_dir: Path, spec: SmallSpec, tower: Path | None = None, ridge: float = 100.0,
                           positions: int | None = LOOKUP.positions) -> float:
    """LISTEN's step after a lookup: the projector, in closed form, so the tower speaks the lookup's language.

    The lookup taught the language model presence over the sounds' written names (the mean word embedding of
    the classes active at each position). A ridge regression from the tower's outputs onto those name tokens
    sets the projector: on validation it reads 0.72 ROC-AUC through the lookup on the served 250 tokens,
    where a projector learnt by gradient from a random start stays at 0.61-0.65 (the binding diagnostic),
    and gradient steps from the fit move it back down (0.64 after 150 steps at lr 1e-4). Only the projector
    changes: the language model stays frozen, as LISTEN wants. Returns the fit's R² on the training split.
    """

    ontology = load_ontology(corpus_dir / "ontology.json")
    hidden, rows, _, _ = encoded_data(corpus_dir, "train", LISTEN, spec, progress=False, tower=tower)
    active = frame_targets(read_timelines(corpus_dir, "train"), rows, ontology.names, hidden.shape[1], float(spec.window_s))
    embed = model.get_input_embeddings().weight.detach().float()
    weight, r2 = ridge_to_names(hidden, active, embed, phrase_word_ids(ontology, processor.tokenizer), ridge, positions)
    linear = unwrap(model).model.multi_modal_projector.linear
    with torch.no_grad():
        linear.weight.copy_(weight[:-1].T.to(linear.weight.dtype))
        linear.bias.copy_(weight[-1].to(linear.bias.dtype))
    return r2


def ridge_to_names(hidden: np.ndarray, active: np.ndarray, embed: torch.Tensor, word_ids: list[list[int]], ridge: float = 100.0,
                   positions: int | None = None, chunk: int = 500) -> tuple[torch.Tensor, float]:
    """Least squares (ridge ``ridge``) from audio features ``[N, P, d]`` to the name tokens of ``active`` ``[N, P, C]``,
    both pooled to ``positions``: ``(weight [d + 1, D] with the bias as its last row, R²)``. Accumulated in chunks,
    so the 6,000-scene split never sits in memory in float64."""
    d, width, names = hidden.shape[-1] + 1, embed.shape[1], name_embeddings(embed, word_ids)  # once, not per chunk
    xtx, xty = torch.zeros(d, d, dtype=torch.float64), torch.zeros(d, width, dtype=torch.float64)
    y_sum, yy, n = torch.zeros(width, dtype=torch.float64), 0.0, 0
    for start in range(0, len(hidden), chunk):
        x, a = pool_positions(torch.from_numpy(np.asarray(hidden[start:start + chunk], dtype=np.float32)),
                              torch.from_numpy(np.asarray(active[start:start + chunk], dtype=np.float32)), positions)
        y = mix_names(a, names).reshape(-1, width).double()
        x = torch.cat([x.reshape(-1, d - 1).double(), torch.ones(len(y), 1, dtype=torch.float64)], 1)
        xtx, xty = xtx + x.T @ x, xty + x.T @ y
        y_sum, yy, n = y_sum + y.sum(0), yy + y.square().sum().item(), n + len(y)
    weight = torch.linalg.solve(xtx + ridge * torch.eye(d, dtype=torch.float64), xty)
    sse = yy - 2 * (weight * xty).sum().item() + (weight * (xtx @ weight)).sum().item()
    return weight.float(), 1 - sse / max(yy - y_sum.square().sum().item() / n, 1e-12)


def encoded_data(corpus_dir: Path, split: str, config: StageConfig, spec: SmallSpec, progress: bool = True, tower: Path | None = None) -> tuple:
    """``(tower outputs, scene → row, frames, rows by scene)`` for a stage, from the feature cache (of ``tower``, a
    distilled tower's Whisper directory, when the model is built on one)."""

    enc = encoder_features(corpus_dir, split, str(tower or spec.encoder), spec.window_s, progress=progress)
    frames = np.full(len(enc.rows), spec.window_s * 100, dtype=np.int32)
    return enc.last, enc.rows, frames, select_rows(read_qa_rows(corpus_dir, split), config)


def _supervised(model, processor, corpus_dir: Path, config: StageConfig, spec: SmallSpec, out_dir: Path, progress: bool,
                tower: Path | None = None) -> None:

    train = encoded_data(corpus_dir, "train", config, spec, progress, tower)
    val = encoded_data(corpus_dir, "validation", config, spec, progress, tower)
    train_stage(EncodedForward(model), processor.tokenizer, train, val, config, out_dir, progress=progress, collate_fn=collate_encoded)


def train_base(corpus_dir: Path, out_dir: Path, spec: SmallSpec = SmallSpec(), config: StageConfig = BASE, progress: bool = True,
               tower: Path | None = None):
    """Stage 1: projector + LoRA (merged afterwards) on positive-only questions; saved in committed form (with the
    distilled tower's ``spec.tower_layers`` when built on ``tower``)."""
    from peft import get_peft_model

    processor, model = build_untrained(replace(spec, trained_layers=False), seed=config.seed, tower=str(tower) if tower else None)
    peft_model = get_peft_model(model, lora_config(model, r=16, alpha=32, dropout=0.0))
    _supervised(peft_model, processor, corpus_dir, config, spec, out_dir, progress, tower)
    peft_model.save_pretrained(out_dir / BASE_LORA_DIR)
    model = peft_model.merge_and_unload().eval()
    save_trained(model, processor, out_dir, replace(spec, trained_layers=False))
    return processor, model


def train_listen(base, processor, corpus_dir: Path, out_dir: Path, spec: SmallSpec, config: StageConfig = LISTEN, progress: bool = True,
                 tower: Path | None = None):
    """Stage 2 (LISTEN) in place: absent-sound questions answered "No" join; only the projector learns."""
    _supervised(base, processor, corpus_dir, config, spec, out_dir, progress, tower)
    return base.eval()


def run_small_recipe(corpus_dir: Path, work_dir: Path, ship_dir: Path | None = None, spec: SmallSpec = SmallSpec(), seed: int = 0,
                     progress: bool = True, eval_plan=None, dpo_pairs: int | dict[str, int] | None = None,
                     base_from: Path | None = None, lookup: LookupConfig = LOOKUP, tower: Path | None = None) -> dict:
    """Parts to shipped tensors, with every stage evaluated on the test split; returns results and timings.

    ``base_from`` reuses a finished run's directory for stage 1 (its ``base/`` and its base evaluation). ``tower``: a
    distillation run (``earwitness train tower``): the model is built on its tower, whose trained layers are committed.
    """
    import copy

    from peft import PeftModel

    plan = eval_plan or EvalPlan(presence_per_sampling=150, per_temporal_kind=60, captions=40, seed=seed)
    work_dir.mkdir(parents=True, exist_ok=True)
    lap = Laps()
    timings = lap.timings
    results: dict[str, dict] = {}
    if ensure_corpus(corpus_dir, seed, progress):
        lap("corpus")

    whisper = None
    if tower is not None:

        spec, whisper = replace(spec, tower_layers=distilled_layers(tower)), export_whisper(tower, spec.encoder)
    base_dir = work_dir / "base"
    processor, base, baseline = base_stage(corpus_dir, base_dir, spec, seed, plan, lap, progress, base_from, whisper)
    results["baseline (positive-only)"] = baseline
    trained_dir = base_dir
    if spec.trained_layers:  # the lookup, text before audio: the base's layers learn to answer over written names
        trained_dir = work_dir / "lookup"
        train_lookup(base, processor, corpus_dir, trained_dir, spec, replace(lookup, stage=replace(lookup.stage, seed=seed)), progress)
        save_trained(base, processor, trained_dir, spec)  # the layers now hold the base LoRA, merged, and the lookup
        lap("lookup")
    if spec.trained_layers:  # LISTEN after a lookup: the projector fitted to the lookup's names, the language model frozen
        listened, listen_dir = copy.deepcopy(base), work_dir / "listen"
        r2 = fit_projector_to_names(listened, processor, corpus_dir, spec, whisper)
        save_trained(listened, processor, listen_dir, spec)
        (listen_dir / "listen.json").write_text(json.dumps({"projector": "ridge onto the lookup's name tokens", "r2": round(r2, 4)}))
        trained_dir, policy_base = listen_dir, listened  # the LISTEN projector is committed; DPO's adapter is LoRA alone
    else:
        listened = train_listen(copy.deepcopy(base), processor, corpus_dir, work_dir / "listen", spec, replace(LISTEN, seed=seed), progress, whisper)
        policy_base = base  # the LISTEN projector rides in DPO's adapter
    lap("listen")
    results["+ LISTEN"] = evaluate_stage("listen", processor, listened, corpus_dir, plan, progress)
    lap("eval listen")
    adapter_dir = align_dpo(copy.deepcopy(listened), processor, corpus_dir, work_dir / "dpo", per_kind=dpo_pairs or DPO_PAIRS, seed=seed,
                            learning_rate=DPO_LEARNING_RATE, projector=not spec.trained_layers)
    lap("dpo")
    aligned = PeftModel.from_pretrained(policy_base, str(adapter_dir)).eval()
    results["+ DPO (shipped)"] = evaluate_stage("aligned", processor, aligned, corpus_dir, plan, progress)
    lap("eval dpo")

    (work_dir / "results.json").write_text(json.dumps({"results": results, "timings_s": timings, "versions": versions(), "seed": seed,
                                                       "spec": asdict(spec), "plan": asdict(plan)}, indent=2))
    plot_stages(results, work_dir / "stages.png")
    (work_dir / "report.md").write_text("# earwitness-small: evaluation\n\n" + markdown(results) + "\n")
    if ship_dir is not None:
        ship(trained_dir, adapter_dir, work_dir, ship_dir)
    return {"results": results, "timings_s": timings}


def base_stage(corpus_dir: Path, base_dir: Path, spec: SmallSpec, seed: int, plan, lap, progress: bool = True,
               base_from: Path | None = None, tower: Path | None = None):
    """Stage 1 and its evaluation, or a finished run's (``base_from``): ``(processor, base, baseline results)``.

    The stages' wall times go to ``lap`` (a ``train.recipe.Laps``); a reused base brings its own.
    """

    if base_from is None:
        processor, base = train_base(corpus_dir, base_dir, spec, replace(BASE, seed=seed), progress, tower)
        lap("base")
        baseline = evaluate_stage("base", processor, base, corpus_dir, plan, progress)
        lap("eval base")
        (base_dir / BASELINE_FILE).write_text(json.dumps({"results": baseline, "timings_s": lap.timings}))
        return processor, base, baseline
    processor, base = reuse_base(Path(base_from), base_dir)
    done = Path(base_from) / "base" / BASELINE_FILE
    if done.exists():  # the base was evaluated: its results and times come with it
        earlier = json.loads(done.read_text())
        lap.timings.update({k: v for k, v in earlier["timings_s"].items() if k in ("base", "eval base")})
        lap.restart()
        return processor, base, earlier["results"]
    # a run stopped after its base: evaluate that base now; its time is what its stages logged
    lap.timings["base"] = round(sum(_logged_seconds(base_dir)), 1)
    lap.restart()
    baseline = evaluate_stage("base", processor, base, corpus_dir, plan, progress)
    lap("eval base")
    return processor, base, baseline


def _logged_seconds(base_dir: Path) -> list[float]:
    """The wall time a base directory's stage wrote."""
    stage = base_dir / "stage.json"
    return [float(json.loads(stage.read_text())["wall_s"])] if stage.exists() else []


def reuse_base(earlier: Path, base_dir: Path):
    """An earlier run's base, rebuilt from its committed form (parts + trained tensors + base LoRA)."""

    if earlier / "base" != base_dir:
        shutil.copytree(earlier / "base", base_dir, dirs_exist_ok=True)
    processor, model = build_untrained(read_spec(base_dir))
    load_trained(model, processor.tokenizer, base_dir)
    return processor, model.eval()


def ship(trained_dir: Path, adapter_dir: Path, work_dir: Path, ship_dir: Path) -> None:
    """Only what training made: trained tensors (the base's, or the lookup's with its layers), base LoRA (when
    the layers are not committed), aligned adapter, processor, curves, card."""

    ship_dir.mkdir(parents=True, exist_ok=True)
    for name in (PARTS_FILE, TRAINED_FILE, *PROCESSOR_FILES):
        if (trained_dir / name).exists():
            shutil.copy2(trained_dir / name, ship_dir / name)
    for sub, src in ((BASE_LORA_DIR, trained_dir / BASE_LORA_DIR), ("adapter", adapter_dir)):
        shutil.rmtree(ship_dir / sub, ignore_errors=True)
        if not src.exists():
            continue
        shutil.copytree(src, ship_dir / sub, ignore=shutil.ignore_patterns("*.png", "*.jsonl", "checkpoint-*", "README.md", "*.json.bak",
                                                                          "tokenizer*", "processor_config.json", "chat_template.jinja"))
    point_adapter_at(ship_dir / "adapter", ship_dir.name)
    if (ship_dir / BASE_LORA_DIR).exists():
        point_adapter_at(ship_dir / BASE_LORA_DIR, ship_dir.name)
    reports = ship_dir / "training"
    reports.mkdir(exist_ok=True)
    for src, dst in ((work_dir / "lookup" / "lookup.json", "lookup.json"), (work_dir / "listen" / "listen.json", "listen.json"),
                     (work_dir / "lookup" / "loss.png", "lookup_loss.png"), (work_dir / "base" / "loss.png", "base_loss.png"), (work_dir / "listen" / "loss.png", "listen_loss.png"),
                     (work_dir / "dpo" / "dpo_curve.png", "dpo_curve.png"), (work_dir / "stages.png", "stages.png"),
                     (work_dir / "results.json", "results.json")):
        if src.exists():
            shutil.copy2(src, reports / dst)
    write_small_model_card(ship_dir, json.loads((work_dir / "results.json").read_text()))
