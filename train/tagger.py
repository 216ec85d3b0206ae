"""Fine-tune the AudioSet tagger on the corpus: ``earwitness train verifier --audio yamnet --tune top|upper``.

A head on frozen YAMNet stops where frozen features stop (test ROC-AUC 0.88). Fine-tuning moves the
tagger itself towards the corpus's sounds, the way sound-event detection is trained:

- **frame by frame:** every 0.96 s patch (every 0.48 s) is trained on the strong labels active in it, plus
  the clip's pooled score, against the class phrases in the text space (the head of
  :func:`train.verifier.fit_whisper_head`);
- **learning without forgetting:** the tuned network's 521 AudioSet outputs are distilled towards the
  frozen original's on the same patches, so it keeps the vocabulary a phrase outside the ontology lands on;
- **a low learning rate for the tagger** (the head's is 20× higher), the early blocks frozen, and early
  stopping on the validation split;
- prior correction, calibration and thresholds as every head (:func:`train.verifier.calibrate_and_ship`).

What is tuned: ``top`` (the last two blocks, from convolution 23: 2.1 M parameters) or ``upper`` (every block
from convolution 13, the 6 × 4 × 512 maps on: 3.5 M). The frozen trunk before convolution 13 is computed once
per scene (``trunk_features``, cached like every feature), so a step costs only the tuned part.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from models.pretrained.yamnet import PATCH_HOP_S, STEP_S, STEPS, LogMelPatches, load_yamnet
from models.verifier.card import model_card
from models.verifier.checkpoint import load_verifier, save_embedded
from models.verifier.scorer import WhisperTextScorer, YamnetScorerConfig, tagger_features
from models.verifier.text import TextEncoder, normalise_phrase
from train.data.formats import read_timelines
from train.data.qa import read_qa_rows
from train.data.targets import window_targets
from train.features import feature_cache, scene_cache, yamnet_features
from train.frozen_features import ProbeData, held_out_packages, load_split
from train.metrics import fit_platt, roc_auc
from train.package_holdout import leave_one_package_out
from train.verifier import TextSpace, calibrate_and_ship, clip_logits, head_loss, presence_pairs, split_auc, standardise

TUNE_FROM = {"top": 23, "upper": 13}
TRUNK_END = 13  # the cached trunk: YAMNet's convolutions 0-12, [512, 6, 4] per patch


@dataclass(frozen=True)
class TuneConfig:
    """How the tagger is fine-tuned (the head's own settings are :func:`train.verifier.fit_whisper_head`'s)."""

    tune: str = "top"  # top | upper: the convolutions from TUNE_FROM[tune] on, and the classifier
    distill: float = 1.0  # weight of the distillation towards the frozen tagger's 521 outputs; 0: none
    epochs: int = 6
    batch: int = 32  # scenes per step (each 19 patches)
    lr_head: float = 2e-3
    lr_tagger: float = 1e-4
    pos_weight: float = 4.0
    steps: bool = False  # train and score per 0.32 s step of each patch (the last map's time steps), not per patch
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def trunk_features(corpus_dir: Path, split: str, batch_size: int = 16, progress: bool = True) -> tuple[np.ndarray, dict[str, int]]:
    """The frozen trunk's output for every patch of every scene of a split (``[N, P, 512, 6, 4]`` float16), cached."""

    path, index_path = feature_cache(Path(corpus_dir), split, f"yamnet-trunk{TRUNK_END}")

    def make_trunk():
        net, patches = load_yamnet()[0], LogMelPatches()

        def trunk(waves: torch.Tensor) -> torch.Tensor:
            p = patches(waves)
            return net.frozen(p.flatten(0, 1), 0, TRUNK_END).unflatten(0, p.shape[:2])  # as the served front end runs it

        return trunk

    return scene_cache(path, index_path, Path(corpus_dir), split, make_trunk, f"yamnet trunk {split}", batch_size=batch_size,
                       progress=progress, meta={"trunk_end": TRUNK_END})


def step_targets(corpus: Path, split: str, rows: dict[str, int], classes: list[str], patches: int) -> np.ndarray:
    """``[N, patches · 3, classes]``: the strong labels of every 0.32 s step of every patch, in the features' order."""

    starts = (np.arange(patches)[:, None] * PATCH_HOP_S + np.arange(STEPS)[None, :] * STEP_S).ravel()
    return window_targets(read_timelines(corpus, split), rows, classes, starts, STEP_S)


class TunedFeatures:
    """Trunk rows → the tuned tagger's features (embedding ⊕ AudioSet logits per patch), as the served frontend computes them."""

    def __init__(self, net, tagger, classes: list[str], steps: bool = False):
        self.net, self.tagger, self.net_classes, self.steps = net, tagger, classes, steps

    def __call__(self, trunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, P, 512, 6, 4]`` → ``(features [B, frames, 1545], the patches' logits [B, P, 521])``, as the served
        front end computes them (``models.verifier.scorer.tagger_features``)."""

        x = trunk.flatten(0, 1).float()
        if self.tagger.start > TRUNK_END:
            with torch.no_grad():
                x = self.net.frozen(x, TRUNK_END, self.tagger.start)
        return tagger_features(self.tagger, x, trunk.shape[0], self.steps)

    @torch.inference_mode()
    def all(self, trunk: np.ndarray, batch: int = 64, logits: bool = False) -> np.ndarray:
        """Every row's features (float16), for calibration and measurement; ``logits``: its patches' AudioSet logits."""
        self.tagger.eval()
        return np.concatenate([self(torch.from_numpy(np.array(trunk[i:i + batch])))[int(logits)].numpy().astype(np.float16)
                               for i in range(0, len(trunk), batch)])


def fine_tune(train, teacher: np.ndarray, space, cfg: TuneConfig, keep: np.ndarray | None = None, validate=None,
              progress: bool = True):
    """Fine-tune a tagger and its head on ``train`` (a :class:`train.frozen_features.ProbeData` whose features are trunk rows).

    ``teacher``: the frozen tagger's AudioSet logits per patch (``[N, P, 521]``); ``validate(features)`` → a
    validation ROC-AUC after every epoch, and the best epoch's weights are kept (early stopping).
    Returns ``(scorer, features, history)``.
    """

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    rows = np.flatnonzero(keep) if keep is not None else np.arange(len(train.features))
    net, classes = load_yamnet()
    scorer = WhisperTextScorer(YamnetScorerConfig(tuned_from=TUNE_FROM[cfg.tune], steps=cfg.steps))
    features = TunedFeatures(net, scorer.tagger, classes, cfg.steps)
    sample = np.sort(rng.choice(rows, size=min(len(rows), 256), replace=False))
    with torch.no_grad():
        standardise(scorer, features(torch.from_numpy(np.asarray(train.features[sample])))[0].reshape(-1, scorer.cfg.features))
    tagger_params = list(scorer.tagger.parameters())
    ids = {id(p) for p in tagger_params}
    head_params = [p for p in scorer.parameters() if id(p) not in ids]
    opt = torch.optim.AdamW([{"params": head_params, "lr": cfg.lr_head, "weight_decay": 1e-2},
                             {"params": tagger_params, "lr": cfg.lr_tagger, "weight_decay": 1e-4}])
    steps_per_epoch = math.ceil(len(rows) / cfg.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[cfg.lr_head, cfg.lr_tagger], total_steps=cfg.epochs * steps_per_epoch, pct_start=0.1)
    weights = torch.full((len(space.classes),), float(cfg.pos_weight))
    history, best, t0 = [], None, time.time()
    for epoch in range(cfg.epochs):
        scorer.train()
        sums = {"loss": 0.0, "distill": 0.0}
        bar = tqdm(np.array_split(rng.permutation(rows), steps_per_epoch), desc=f"tagger {cfg.tune} epoch {epoch + 1}", disable=not progress, unit="step")
        for idx in bar:
            idx = np.sort(idx)
            feats, logits = features(torch.from_numpy(np.asarray(train.features[idx])))
            yf = torch.from_numpy(train.targets[idx]).float().transpose(1, 2)  # [B, C, P]
            loss = head_loss(scorer, feats, yf, space.draw(rng), weights)
            distill = F.binary_cross_entropy_with_logits(logits, torch.sigmoid(torch.from_numpy(np.asarray(teacher[idx], dtype=np.float32))))
            total = loss + cfg.distill * distill
            opt.zero_grad()
            total.backward()
            opt.step()
            sched.step()
            step = {"loss": float(loss.detach()), "distill": float(distill.detach())}
            sums = {k: sums[k] + step[k] for k in sums}
            bar.set_postfix(loss=f"{step['loss']:.3f}", distill=f"{step['distill']:.4f}")
        entry = {"epoch": epoch + 1, **{k: round(v / steps_per_epoch, 5) for k, v in sums.items()}, "elapsed_s": round(time.time() - t0, 1)}
        if validate is not None:
            entry["val_auc"] = validate(scorer.eval(), features)
            if best is None or entry["val_auc"] > best[0]:
                best = (entry["val_auc"], copy.deepcopy(scorer.state_dict()), epoch + 1)
        history.append(entry)
        if progress:
            print(json.dumps(entry), flush=True)
    if best is not None:
        scorer.load_state_dict(best[1])
        history.append({"best_epoch": best[2], "val_auc": best[0]})
    return scorer.eval(), features, history


def retained_audioset(logits: np.ndarray, teacher: np.ndarray) -> dict[str, float]:
    """How much of the frozen tagger's AudioSet output the tuned one keeps, on patches it never trained on (both
    ``[N, P, 521]``): the share of patches whose teacher top class is in the student's top 5, and the mean absolute
    probability change."""
    s = np.asarray(logits, dtype=np.float32).reshape(-1, 521)
    t = np.asarray(teacher, dtype=np.float32).reshape(-1, 521)
    top5 = np.argsort(-s, axis=1)[:, :5]
    hit = (top5 == t.argmax(1)[:, None]).any(1).mean()
    change = torch.sigmoid(torch.from_numpy(s)) - torch.sigmoid(torch.from_numpy(t))
    return {"teacher_top1_in_top5": round(float(hit), 4), "mean_abs_prob_change": round(float(change.abs().mean()), 5)}


OPEN_MIN_SIMILARITY = 0.6  # a phrase this close to an AudioSet name (MiniLM cosine) is judged by that class's output


def fit_open_vocabulary(feats: dict, corpus: Path, space, names: list[str], min_similarity: float = OPEN_MIN_SIMILARITY,
                        emb: np.ndarray | None = None) -> tuple[dict, np.ndarray]:
    """The AudioSet vocabulary's calibration, fitted where labels exist: each ontology class close enough to an
    AudioSet name stands in for a phrase outside the ontology; its presence questions are scored by that name's
    output (maximum over patches), Platt-scaled on validation and measured on test.

    Returns the ``audioset`` section of ``verifier.json`` and the names' embeddings (``emb``: already made).
    """

    emb = TextEncoder().encode([normalise_phrase(n) for n in names]) if emb is None else emb
    sims = space.class_emb.numpy() @ emb.T
    mapped = {c: int(sims[i].argmax()) for i, c in enumerate(space.classes) if sims[i].max() >= min_similarity}

    def scored(split: str) -> tuple[np.ndarray, np.ndarray]:
        features, rows = feats[split]
        logits = np.asarray(features[..., -len(names):], dtype=np.float32).max(1)  # [N, 521]
        pairs = [(sid, c, y) for sid, c, y, _ in presence_pairs(corpus, split) if c in mapped]
        return np.array([logits[rows[sid], mapped[c]] for sid, c, _ in pairs]), np.array([y for *_, y in pairs])

    s_val, y_val = scored("validation")
    a, b = fit_platt(s_val, y_val.astype(np.float32))
    s_test, y_test = scored("test")
    doc = {"min_similarity": min_similarity, "a": a, "b": b, "classes_mapped": len(mapped),
           "mapping": {c: names[i] for c, i in mapped.items()},
           "test_roc_auc": round(roc_auc(y_test, s_test), 4), "test_questions": len(y_test)}
    return doc, emb


def refit_open_vocabulary(directory: Path, corpus: Path) -> dict:
    """Fit a shipped verifier's AudioSet vocabulary (its ``audioset`` section and the names' embeddings) from its own
    features of the validation and test scenes, without training anything: a tuned tagger's, or the frozen one's."""
    import json

    from safetensors.torch import load_file, save_file

    directory = Path(directory)
    scorer = load_verifier(str(directory)).scorer
    if getattr(scorer, "tagger", None) is None:  # the frozen tagger: its cached features are the served ones
        feats = {split: yamnet_features(corpus, split) for split in ("validation", "test")}
    else:
        features = TunedFeatures(scorer.frontend.net, scorer.tagger, scorer.frontend.classes, scorer.cfg.steps)
        feats = {}
        for split in ("validation", "test"):
            trunk, rows = trunk_features(corpus, split)
            feats[split] = (features.all(trunk), rows)
    doc = json.loads((directory / "verifier.json").read_text())
    audioset, names_emb = fit_open_vocabulary(feats, corpus, TextSpace.build(corpus), scorer.frontend.classes)
    doc["audioset"] = {**audioset, **{k: v for k, v in doc.get("audioset", {}).items() if k == "frozen_test_roc_auc"}}
    (directory / "verifier.json").write_text(json.dumps(doc, indent=1))
    (directory / "README.md").write_text(model_card(doc))
    embeddings = load_file(str(directory / "phrases.safetensors"))
    save_file({**embeddings, "audioset": torch.from_numpy(names_emb)}, str(directory / "phrases.safetensors"))
    return doc["audioset"]


def train_tuned_verifier(corpus: Path, out: Path, cfg: TuneConfig, threads: int | None = None, lopo_epochs: int = 0,
                         progress: bool = True) -> dict:
    """Fine-tune on the train split, keep the best epoch on validation, calibrate, measure on test, ship to ``out``;
    ``lopo_epochs`` > 0: also leave-one-package-out, one fine-tune of that many epochs per held-out package."""

    corpus, out = Path(corpus), Path(out)
    if threads:
        torch.set_num_threads(threads)
    t0 = time.time()
    space = TextSpace.build(corpus)
    data, teacher = {}, {}
    for split in ("train", "validation", "test"):
        frozen = load_split(corpus, split, "yamnet", space.classes, progress=progress)  # labels, packages, teacher logits
        trunk, rows = trunk_features(corpus, split, progress=progress)
        assert rows == frozen.rows, "the trunk cache and the feature cache list the scenes differently"
        targets = step_targets(corpus, split, rows, space.classes, trunk.shape[1]) if cfg.steps else frozen.targets
        data[split] = ProbeData(trunk, targets, rows, frozen.packages, frozen.event_packages)
        teacher[split] = frozen.features[..., -521:]

    def validate(scorer, features) -> float:
        return split_auc(scorer, (features.all(data["validation"].features), data["validation"].rows), corpus, "validation",
                       space.classes, space.class_emb)

    scorer, features, history = fine_tune(data["train"], teacher["train"], space, cfg, validate=validate, progress=progress)
    feats = {split: (features.all(data[split].features), data[split].rows) for split in ("validation", "test")}
    training = {"tune": cfg.to_dict(), "history": history, "train_scenes": len(data["train"].rows), "epochs_run": cfg.epochs,
                "seconds": round(time.time() - t0, 1), "corpus": str(corpus)}
    card = calibrate_and_ship(scorer, feats, corpus, space.classes, space.class_emb, data["train"].targets.max(1).astype(np.float32),
                              space.phrases, space.phrase_emb, out, training)
    card["metrics"]["audioset_retained"] = retained_audioset(features.all(data["test"].features, logits=True), teacher["test"])
    card["audioset"], names_emb = fit_open_vocabulary(feats, corpus, space, features.net_classes)
    frozen_doc, _ = fit_open_vocabulary({k: (np.asarray(teacher[k]), data[k].rows) for k in ("validation", "test")}, corpus, space,
                                        features.net_classes, emb=names_emb)
    card["audioset"]["frozen_test_roc_auc"] = frozen_doc["test_roc_auc"]  # the same path on the original tagger
    if lopo_epochs:

        def fit(keep):
            head, feats_of, _ = fine_tune(data["train"], teacher["train"], space, replace(cfg, epochs=lopo_epochs), keep=keep, progress=False)
            return lambda trunk: clip_logits(head, feats_of.all(trunk), space.class_emb)

        qa = {split: read_qa_rows(corpus, split) for split in data}
        card["lopo"] = leave_one_package_out(data, qa, space.classes, held_out_packages(corpus), fit, prior_beta=card["prior_correction"])
        card["metrics"]["lopo_mean"] = round(float(np.nanmean([v["auc"] for v in card["lopo"].values()])), 4)
        card["training"]["lopo_epochs"] = lopo_epochs
    save_embedded(out, scorer, space.classes, space.phrases, space.phrase_emb, card, audioset=names_emb)
    return card
