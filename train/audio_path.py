"""Gate 2 of earwitness-small: the audio path learns to speak the language its lookup reads (LISTEN's small form).

After the lookup stage the language model answers from the sounds' written names laid at the 250 audio positions
(gate 1, validation oracle ROC-AUC ≥ 0.93), but the served tokens, the tower's output through a projector fitted
in closed form onto those names, read far lower (0.76–0.79): a linear map of the frozen tower cannot make the tokens
the lookup reads. Here the audio adapter of a standard Qwen2-Audio learns them by gradient, the language model
frozen, as LISTEN wants:

- **what trains**: the tower's top layers (above a cached trunk of the layers as fetched), its final norm and the
  projector, plus a per-patch class read-out on the tower's frames that is used for its loss only and not shipped;
- **the loss**, per step over a few training scenes and their questions (present and absent sounds, LISTEN's
  negatives, with a share of order / count / duration / caption questions): the answers' cross-entropy and the
  presence Yes/No margin through the frozen lookup (``train.lookup.lookup_losses``, one pass over a scene's audio
  for all its questions), ``token_weight`` × the distance of each position's token from the lookup's own name token
  there (relative squared error), and ``class_weight`` × the per-patch class loss on the strong labels, so the tower
  keeps hearing every class, not only the ones asked about;
- **measured** every ``eval_every`` steps the way the gate is: validation served ROC-AUC (the tokens as the served
  model makes them → the frozen language model) on ``eval_questions`` fixed presence questions.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from torch.nn import functional as F

from models.pretrained.yamnet import PATCH_HOP_S, PATCH_S
from models.small import SmallSpec
from train.data.formats import read_timelines
from train.data.qa import PRESENCE_FAMILIES, read_qa_rows
from train.data.ontology import load_ontology
from train.data.targets import frame_targets, patch_targets
from train.lookup import (sample_questions, train_rows_by_scene, lookup_losses, make_batch, mix_names, name_embeddings, phrase_word_ids,
                          prefix_ids, presence_margins)
from train.metrics import roc_auc
from train.tower import TowerDistillConfig, patch_pooling, run_top, trunk_cache


@dataclass(frozen=True)
class AudioPathFit:
    """How the audio path learns (``fit_audio_path``). Each step: ``scenes`` train scenes × ``questions`` questions
    (``presence_share`` presence, in a random training phrasing). Rates: the tower's top layers and norm
    ``tower_learning_rate``, the projector ``projector_learning_rate``, the class read-out ``head_learning_rate``.

    The defaults are the setting that moved the served ROC-AUC up within a CPU's budget (train/results/gates.md): the
    token distance alone, at low rates (no language-model pass, so a step is cheap). Through the lookup's answers and
    margin at 1e-4 / 2e-4, or with the class loss at 1e-4, validation served ROC-AUC fell from 0.785 to 0.62–0.75 in
    20–25 steps."""

    steps: int = 200
    scenes: int = 16
    questions: int = 12
    presence_share: float = 0.75
    tower_learning_rate: float = 2e-5
    projector_learning_rate: float = 5e-6  # the ridge fit's weights are ~3e-3 RMS: Adam at 2e-4 moved them 8% a step and undid the fit
    head_learning_rate: float = 1e-3
    answer_weight: float = 0.0
    margin_weight: float = 0.0
    token_weight: float = 1.0
    class_weight: float = 0.0
    warmup: int = 20
    eval_every: int = 50
    eval_questions: int = 300
    checkpoint_s: float = 180.0
    seed: int = 0


@dataclass
class Trunks:
    """The tower's cached trunk frames of a split and the per-position / per-patch strong labels, by scene id."""

    frames: np.ndarray  # [N, frames, d_model] float16 (memory-mapped)
    rows_of: dict[str, int]
    positions: torch.Tensor  # [N, audio tokens, classes]
    patches: torch.Tensor  # [N, patches, classes]

    def take(self, scene_ids: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = [self.rows_of[s] for s in scene_ids]
        return torch.from_numpy(np.asarray(self.frames[idx], dtype=np.float32)), self.positions[idx], self.patches[idx]


def load_trunks(corpus_dir: Path, split: str, classes: list[str], spec: SmallSpec, cut: int, progress: bool = True, view: int = 0) -> Trunks:
    frames, rows_of = trunk_cache(corpus_dir, split, TowerDistillConfig(encoder=spec.encoder, window_s=spec.window_s, cached_layers=cut),
                                  progress=progress, view=view)
    timelines = read_timelines(corpus_dir, split)
    positions = frame_targets(timelines, rows_of, classes, spec.audio_tokens, float(spec.window_s))
    patches = patch_targets(timelines, rows_of, classes, patch_count(spec.window_s), PATCH_S, PATCH_HOP_S)
    return Trunks(frames, rows_of, torch.from_numpy(positions), torch.from_numpy(patches))


def patch_count(window_s: float) -> int:
    """The analysis patches (``PATCH_S`` long every ``PATCH_HOP_S``) that fit a window."""
    return int((window_s - PATCH_S) // PATCH_HOP_S) + 1


class AudioPath(torch.nn.Module):
    """The served audio path from the cached trunk: the tower's layers from ``cut``, pooler and final norm, then the
    projector; ``readout`` scores the ontology's classes per patch from the tower's frames (training only)."""

    def __init__(self, model, cut: int, classes: int, window_s: float):
        super().__init__()
        qa = model.model
        self.tower, self.projector, self.cut = qa.audio_tower, qa.multi_modal_projector, cut
        frames = int(self.tower.config.max_source_positions) // 2
        self.readout = torch.nn.Linear(self.tower.config.d_model, classes)
        self.register_buffer("pooling", patch_pooling(frames, window_s / frames, patch_count(window_s)))

    def forward(self, trunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(audio tokens [B, P, D], patch logits [B, patches, classes])``."""
        hidden = run_top(self.tower, trunk, self.cut)
        return self.projector(hidden), torch.einsum("pt,btc->bpc", self.pooling, self.readout(hidden))

    def trainable(self) -> list[list[torch.nn.Parameter]]:
        """``[tower top layers + norm, projector, read-out]``, and nothing else of the model requires grad."""
        tower = [p for layer in self.tower.layers[self.cut:] for p in layer.parameters()] + list(self.tower.layer_norm.parameters())
        return [tower, list(self.projector.parameters()), list(self.readout.parameters())]


def heard_tokens(model, corpus_dir: Path, spec: SmallSpec, progress: bool = True, views: int = 0, seed: int = 0):
    """``heard(split, scene_ids)``: the model's own audio tokens ``[S, audio tokens, D]`` for train / validation scenes,
    from the cached trunk through its trained top layers, norm and projector (frozen, as served), for
    ``fit_lookup``'s ``heard``. ``views`` > 0: each train scene is heard, at random, clean or through one of that many
    recording-setup augmentations (the verifier's remedy for recordings unlike the training ones); validation is clean."""
    ontology = load_ontology(Path(corpus_dir) / "ontology.json")
    cut = min(spec.tower_layers)
    path = AudioPath(model, cut, len(ontology.names), float(spec.window_s)).eval()
    train = [load_trunks(Path(corpus_dir), "train", ontology.names, spec, cut, progress, view) for view in range(views + 1)]
    validation = load_trunks(Path(corpus_dir), "validation", ontology.names, spec, cut, progress)
    rng = random.Random(seed)

    @torch.no_grad()
    def heard(split: str, scene_ids: list[str]) -> torch.Tensor:
        if split != "train":
            return path(validation.take(scene_ids)[0])[0]
        trunks = torch.stack([train[rng.randrange(len(train))].take([s])[0][0] for s in scene_ids])
        return path(trunks)[0]

    return heard


def fit_audio_path(model, lm, tokenizer, corpus_dir: Path, spec: SmallSpec, out_dir: Path, config: AudioPathFit = AudioPathFit(),
                   log=print, progress: bool = True) -> list[dict]:
    """Train ``model``'s audio path (in place) against ``lm`` (the model's language model and head, frozen),
    resumable from ``out_dir/checkpoint.pt``. Returns the history of validation served ROC-AUCs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus_dir = Path(corpus_dir)
    ontology = load_ontology(corpus_dir / "ontology.json")
    cut = min(spec.tower_layers) if spec.tower_layers else len(model.model.audio_tower.layers) - 2
    train, val = (load_trunks(corpus_dir, s, ontology.names, spec, cut) for s in ("train", "validation"))
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    templates = [t for family in PRESENCE_FAMILIES.values() for t in family["train"]]
    held = [r for r in read_qa_rows(corpus_dir, "validation") if r.kind == "presence" and r.scene_id in val.rows_of]
    held = random.Random(config.seed).sample(held, min(config.eval_questions, len(held)))
    truth = np.array([r.answer == "Yes" for r in held])
    by_scene = {s: rows for s, rows in train_rows_by_scene(corpus_dir).items() if s in train.rows_of}
    n_audio = spec.audio_tokens
    head = torch.tensor(prefix_ids(tokenizer, n_audio)[:-n_audio])
    yes, no = (tokenizer.encode(w, add_special_tokens=False)[0] for w in ("Yes", "No"))
    names = name_embeddings(lm.model.embed_tokens.weight.detach().float(), phrase_word_ids(ontology, tokenizer))
    scale = names.square().sum(-1).mean()  # a name token's mean squared norm: the token loss's unit

    model.requires_grad_(False)
    lm.requires_grad_(False)
    lm.eval()  # frozen, and no dropout: the lookup as it reads at serve time
    path = AudioPath(model, cut, len(ontology.names), float(spec.window_s))
    groups = path.trainable()
    for g in groups:
        for p in g:
            p.requires_grad_(True)
    rates = (config.tower_learning_rate, config.projector_learning_rate, config.head_learning_rate)
    optimizer = torch.optim.AdamW([{"params": g, "lr": r, "base": r} for g, r in zip(groups, rates)], weight_decay=0.01)
    history, step, spent = [], 0, 0.0
    ckpt = out_dir / "checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        path.load_state_dict(state["path"])
        optimizer.load_state_dict(state["optimizer"])
        rng.setstate(state["rng"])
        history, step, spent = state["history"], state["step"], state["spent_s"]
        log(f"resumed at step {step}")

    @torch.no_grad()
    def served(scene_ids: list[str]) -> torch.Tensor:
        return path(val.take(scene_ids)[0])[0]

    def evaluate() -> float:
        was = path.training
        path.eval()
        auc = round(roc_auc(truth, presence_margins(lm, tokenizer, served, held, n_audio)), 4)
        path.train(was)
        return auc

    def save() -> None:
        torch.save({"path": path.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng.getstate(), "history": history,
                    "step": step, "spent_s": spent}, ckpt.with_suffix(".tmp"))
        ckpt.with_suffix(".tmp").replace(ckpt)
        (out_dir / "history.json").write_text(json.dumps({"config": asdict(config), "history": history}, indent=2))

    if not history:
        history.append({"step": 0, "validation_served_auc": evaluate(), "elapsed_s": 0.0})
        log(json.dumps(history[-1]))
    path.train()
    start, last_save, window = time.time() - spent, time.time(), []
    bar = tqdm(total=config.steps, initial=step, desc="audio path", unit="step", disable=not progress)
    while step < config.steps:
        step += 1
        for group in optimizer.param_groups:
            group["lr"] = group["base"] * min(1.0, step / config.warmup)
        batch = make_batch(tokenizer, sample_questions(rng, by_scene, config, templates), n_audio)
        trunk, active, patch_labels = train.take(batch.scenes)
        tokens, patch_logits = path(trunk)
        if config.answer_weight or config.margin_weight:
            supervised, margin, _ = lookup_losses(lm, head, tokens, batch, tokenizer.pad_token_id, yes, no)
        else:  # the tokens alone: no language-model pass, a fraction of the step's cost
            supervised = margin = torch.zeros(())
        token = (tokens - mix_names(active, names)).square().sum(-1).mean() / scale
        classes = F.binary_cross_entropy_with_logits(patch_logits, patch_labels)
        loss = config.answer_weight * supervised + config.margin_weight * margin + config.token_weight * token + config.class_weight * classes
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g], 1.0)
        optimizer.step()
        window.append((supervised.item(), margin.item(), token.item(), classes.item()))
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % config.eval_every == 0 or step == config.steps:
            spent = time.time() - start
            mean = np.mean(window, 0).round(4).tolist()
            history.append({"step": step, "supervised": mean[0], "margin": mean[1], "token": mean[2], "classes": mean[3],
                            "validation_served_auc": evaluate(), "elapsed_s": round(spent, 1)})
            window = []
            log(json.dumps(history[-1]))
        if time.time() - last_save > config.checkpoint_s or step == config.steps:
            spent = time.time() - start
            save()
            last_save = time.time()
    bar.close()
    return history
