"""Stage 0 of earwitness-small: the Whisper tower learns sound events from the AudioSet tagger.

Whisper tiny.en was pretrained on English speech; the served model's language model can only hear what its
frames carry, and a head on them stops at 0.86 ROC-AUC. YAMNet (``models.pretrained.yamnet``) was pretrained on
AudioSet's 521 sound classes. Distillation moves that into the tower, frame by frame:

- a linear read-out of the tower's output frames, averaged over each YAMNet patch (0.96 s every 0.48 s),
  predicts the frozen YAMNet's 521 AudioSet probabilities on the same audio (soft targets: the teacher labels
  any audio) and the corpus's strong labels of its ontology classes (where it has them);
- only the top ``tune_layers`` of the tower train. The ``cached_layers`` below stay as fetched, and their output
  is cached once per scene (``trunk_cache``), so an epoch costs the layers above the cache only.
  ``tune_layers=0`` trains the read-out alone on the original tower: the peer every distilled tower is measured
  against, with the same head on the same questions.

Measured on the test split's presence questions (recordings never heard in training): the asked-about class's
score is its patch logit's maximum over the clip.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from models.pretrained import POSITIONS_PER_SECOND, whisper_encoder, whisper_feature_extractor
from models.pretrained.whisper import load_whisper, whisper_checkpoint
from models.pretrained.store import build_once
from models.pretrained.yamnet import PATCH_HOP_S, PATCH_S
from models.small import TRAINED_FILE, is_assembled_checkpoint, read_spec
from train.data.formats import read_timelines
from train.data.qa import read_qa_rows
from train.data.targets import patch_targets
from train.features import encoder_tag, scene_audio, scene_cache, yamnet_features
from train.metrics import choose_prior_correction, class_prior_logits
from train.metrics import presence_auc as by_sampling

AUDIOSET_CLASSES = 521


@dataclass(frozen=True)
class TowerDistillConfig:
    """One distillation run. ``tune_layers``: how many of the tower's top layers train (0: the read-out alone)."""

    encoder: str = "whisper-tiny.en"  # the tower: a pinned part, hub id or directory
    layers: int = 4  # the tower's encoder layers (whisper tiny.en: 4)
    window_s: int = 10
    cached_layers: int = 2  # the layers whose output is cached once per scene (as fetched); the rest run every step
    tune_layers: int = 2  # of the layers above the cache, how many (from the top) train
    epochs: int = 2
    batch_size: int = 16
    lr_tower: float = 1e-4  # low: the tower keeps what Whisper learned (its speech, which the served model reads too)
    lr_head: float = 2e-3
    teacher_weight: float = 1.0  # the AudioSet soft targets' share of the loss, against the strong labels' 1
    seed: int = 0

    def __post_init__(self):
        if not 0 <= self.tune_layers <= self.layers - self.cached_layers:
            raise ValueError(f"tune_layers must be in 0..{self.layers - self.cached_layers} (above the {self.cached_layers} cached layers)")

    @property
    def cut(self) -> int:
        """The first layer above the cached trunk."""
        return self.cached_layers

    @property
    def tuned_layers(self) -> tuple[int, ...]:
        """The indices of the layers that train (what ``models.small.SmallSpec.tower_layers`` commits)."""
        return tuple(range(self.layers - self.tune_layers, self.layers))

    def to_dict(self) -> dict:
        return asdict(self)


def layer_output(layer, hidden: torch.Tensor) -> torch.Tensor:
    out = layer(hidden, None)
    return out[0] if isinstance(out, tuple) else out


def run_trunk(tower, input_features: torch.Tensor, cut: int) -> torch.Tensor:
    """The tower's frames after its first ``cut`` layers, before pooling (``Qwen2AudioEncoder.forward``'s own steps)."""
    x = F.gelu(tower.conv2(F.gelu(tower.conv1(input_features.to(tower.conv1.weight.dtype))))).permute(0, 2, 1)
    x = x + tower.embed_positions.weight
    for layer in tower.layers[:cut]:
        x = layer_output(layer, x)
    return x


def run_top(tower, hidden: torch.Tensor, cut: int) -> torch.Tensor:
    """The rest of the tower from layer ``cut``: the last layers, the pooler and the final norm (its output frames)."""
    for layer in tower.layers[cut:]:
        hidden = layer_output(layer, hidden)
    return tower.layer_norm(tower.avg_pooler(hidden.permute(0, 2, 1)).permute(0, 2, 1))


def patch_pooling(frames: int, frame_s: float, patches: int) -> torch.Tensor:
    """``[patches, frames]``: each YAMNet patch's mean over the tower frames inside it."""

    centre = (np.arange(frames) + 0.5) * frame_s
    start = np.arange(patches)[:, None] * PATCH_HOP_S
    inside = (centre[None, :] >= start) & (centre[None, :] < start + PATCH_S)
    return torch.from_numpy(inside / np.maximum(inside.sum(1, keepdims=True), 1)).float()


class ReadOut(torch.nn.Module):
    """Per-frame logits of the ontology classes and AudioSet's, averaged over each patch: ``[B, P, C + 521]``."""

    def __init__(self, d_model: int, classes: int, pooling: torch.Tensor):
        super().__init__()
        self.linear = torch.nn.Linear(d_model, classes + AUDIOSET_CLASSES)
        self.register_buffer("pooling", pooling)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return torch.einsum("pt,btc->bpc", self.pooling, self.linear(frames))


def trunk_cache(corpus: Path, split: str, cfg: TowerDistillConfig, progress: bool = True, view: int = 0) -> tuple[np.ndarray, dict[str, int]]:
    """The original tower's frames below ``cfg.cut`` for every scene of a split (``[N, frames, d_model]`` float16), once;
    ``view`` > 0: every scene through a recording-setup augmentation (as the verifier's feature caches)."""

    base = Path(corpus) / "features" / f"{encoder_tag(cfg.encoder, cfg.window_s)}-trunk{cfg.cut}"

    def make():
        tower = whisper_encoder(cfg.encoder, max_source_positions=cfg.window_s * POSITIONS_PER_SECOND)
        extractor = whisper_feature_extractor(chunk_length=cfg.window_s, num_mel_bins=tower.config.num_mel_bins)

        @torch.no_grad()
        def compute(waves: torch.Tensor) -> torch.Tensor:
            feats = extractor(list(waves.numpy()), sampling_rate=16_000, padding="max_length", return_tensors="pt")
            return run_trunk(tower, feats["input_features"], cfg.cut)

        return compute

    stem = split if view == 0 else f"{split}.v{view}"
    return scene_cache(base / f"{stem}.npy", base / f"{stem}.json", corpus, split, make, f"tower trunk {stem}",
                       (lambda row, f: scene_audio(f, 16_000, view, 0, row)) if view else None, progress=progress,
                       meta={"encoder": cfg.encoder, "cut": cfg.cut, "view": view})


def split_targets(corpus: Path, split: str, rows: dict[str, int], classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(labels [N, P, C], teacher [N, P, 521])``: the strong labels per YAMNet patch and the frozen YAMNet's
    AudioSet probabilities on the same scenes (``train.features.yamnet_features``, cached)."""

    feats, yrows = yamnet_features(corpus, split)
    order = np.array([yrows[s] for s in sorted(rows, key=rows.get)])
    teacher = torch.sigmoid(torch.from_numpy(np.asarray(feats[order, :, -AUDIOSET_CLASSES:], dtype=np.float32))).numpy()
    labels = patch_targets(read_timelines(corpus, split), rows, classes, teacher.shape[1], PATCH_S, PATCH_HOP_S)
    return labels, teacher


def presence_auc(corpus: Path, split: str, rows: dict[str, int], classes: list[str], patch_logits: np.ndarray) -> dict[str, float]:
    """ROC-AUC of the asked-about class's score (its patch logit's maximum) on a split's presence questions."""

    return by_sampling(patch_logits[:, :, : len(classes)].max(1), rows, classes, read_qa_rows(corpus, split))


class Student(torch.nn.Module):
    """The tower's top layers (from ``cut``) and the read-out: trunk frames → patch logits."""

    def __init__(self, tower, cut: int, readout: ReadOut):
        super().__init__()
        self.tower, self.cut, self.readout = tower, cut, readout

    def forward(self, trunk: torch.Tensor) -> torch.Tensor:
        return self.readout(run_top(self.tower, trunk, self.cut))

    @torch.no_grad()
    def all(self, trunk: np.ndarray, batch: int = 32) -> np.ndarray:
        self.eval()
        return np.concatenate([self(torch.from_numpy(np.asarray(trunk[i:i + batch], dtype=np.float32))).numpy()
                               for i in range(0, len(trunk), batch)])


def make_student(cfg: TowerDistillConfig, classes: int, patches: int) -> Student:
    tower = whisper_encoder(cfg.encoder, max_source_positions=cfg.window_s * POSITIONS_PER_SECOND)
    if len(tower.layers) != cfg.layers:
        raise ValueError(f"{cfg.encoder} has {len(tower.layers)} encoder layers, the config says {cfg.layers}")
    frames = cfg.window_s * POSITIONS_PER_SECOND // 2  # after the tower's pooler
    torch.manual_seed(cfg.seed)
    readout = ReadOut(tower.config.d_model, classes, patch_pooling(frames, cfg.window_s / frames, patches))
    for i, layer in enumerate(tower.layers):
        layer.requires_grad_(i in cfg.tuned_layers)
    for part in (tower.conv1, tower.conv2, tower.embed_positions):
        part.requires_grad_(False)
    tower.layer_norm.requires_grad_(cfg.tune_layers > 0)
    return Student(tower, cfg.cut, readout)


def distil_loss(logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor, classes: int, teacher_weight: float) -> torch.Tensor:
    own = F.binary_cross_entropy_with_logits(logits[..., :classes], labels)
    audioset = F.binary_cross_entropy_with_logits(logits[..., classes:], teacher)
    return own + teacher_weight * audioset


def distil(corpus: Path, out: Path, cfg: TowerDistillConfig, classes: list[str], progress: bool = True) -> dict:
    """Train the student on the train split (one line of progress per epoch, validation AUC each), keep the best
    validation epoch, measure on test; writes ``out/tower.safetensors`` (the tower's trained layers and the
    read-out) and ``out/distill.json`` (config, history, metrics)."""
    from safetensors.torch import save_file

    corpus, out = Path(corpus), Path(out)
    t0 = time.time()
    splits = load_splits(corpus, cfg, classes, progress)
    student = make_student(cfg, len(classes), splits["train"][3].shape[1])
    tower_params = [p for p in student.tower.parameters() if p.requires_grad]
    groups = [{"params": list(student.readout.parameters()), "lr": cfg.lr_head}]
    if tower_params:
        groups.append({"params": tower_params, "lr": cfg.lr_tower})
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    trunk, rows, labels, teacher = splits["train"]
    steps = max(1, len(rows) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups], total_steps=cfg.epochs * steps, pct_start=0.1)
    rng = np.random.default_rng(cfg.seed)
    history, best, best_state = [], -1.0, None
    for epoch in range(cfg.epochs):
        student.train()
        running = 0.0
        bar = tqdm(np.array_split(rng.permutation(len(rows)), steps), desc=f"tower epoch {epoch + 1}", disable=not progress, unit="step")
        for idx in bar:
            idx = np.sort(idx)
            logits = student(torch.from_numpy(np.asarray(trunk[idx], dtype=np.float32)))
            loss = distil_loss(logits, torch.from_numpy(labels[idx]), torch.from_numpy(teacher[idx]), len(classes), cfg.teacher_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            running += float(loss.detach())
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        v_trunk, v_rows, _, _ = splits["validation"]
        val = presence_auc(corpus, "validation", v_rows, classes, student.all(v_trunk))["all"]
        history.append({"epoch": epoch + 1, "loss": running / steps, "val_auc": round(val, 4), "elapsed_s": round(time.time() - t0, 1)})
        if progress:
            print(json.dumps(history[-1]), flush=True)
        if val > best:
            best, best_state = val, {k: v.detach().clone() for k, v in student.state_dict().items()}
    student.load_state_dict(best_state)
    out.mkdir(parents=True, exist_ok=True)
    trained = {k: v.contiguous() for k, v in student.state_dict().items()
               if k.startswith("readout.linear") or k.startswith(tuple(f"tower.layers.{i}." for i in cfg.tuned_layers))
               or (cfg.tune_layers and k.startswith("tower.layer_norm"))}
    save_file(trained, str(out / "tower.safetensors"))
    card = {"config": cfg.to_dict(), "history": history, "seconds": round(time.time() - t0, 1), "classes": classes,
            "metrics": measured(corpus, student, splits, classes)}
    (out / "distill.json").write_text(json.dumps(card, indent=1))
    return card


def load_splits(corpus: Path, cfg: TowerDistillConfig, classes: list[str], progress: bool = True) -> dict[str, tuple]:
    """Per split: ``(trunk frames, scene → row, strong labels, teacher probabilities)``, from the caches."""
    splits = {}
    for split in ("train", "validation", "test"):
        trunk, rows = trunk_cache(corpus, split, cfg, progress)
        splits[split] = (trunk, rows, *split_targets(corpus, split, rows, classes))
    return splits


def measured(corpus: Path, student: Student, splits: dict, classes: list[str]) -> dict:
    """Presence ROC-AUC on validation and test (the asked-about class's maximum patch logit), with the share of the
    train scenes' class prior taken out that validation chooses (``train.metrics.choose_prior_correction``: a
    read-out learns that frequent sounds are usually there), and how much of AudioSet the read-out kept."""
    logits = {split: student.all(splits[split][0]) for split in ("validation", "test")}
    prior = class_prior_logits(splits["train"][2].max(1))

    def auc(split: str, offsets: np.ndarray) -> dict[str, float]:
        shifted = logits[split].copy()
        shifted[..., : len(classes)] += offsets
        return presence_auc(corpus, split, splits[split][1], classes, shifted)

    beta = choose_prior_correction(lambda offsets: auc("validation", offsets)["all"], prior)
    return {"validation_roc_auc": round(auc("validation", -beta * prior)["all"], 4), "prior_correction": beta,
            "test_roc_auc": {k: round(v, 4) for k, v in auc("test", -beta * prior).items()},
            "test_roc_auc_uncorrected": {k: round(v, 4) for k, v in auc("test", 0.0 * prior).items()},
            "audioset_teacher_top1_in_top5": audioset_kept(logits["test"][..., len(classes):], splits["test"][3])}


def measure_run(corpus: Path, run: Path) -> dict:
    """A finished run's metrics again (``measured``) from its saved tensors, written back into ``distill.json``."""
    from safetensors.torch import load_file

    card = json.loads((Path(run) / "distill.json").read_text())
    cfg, classes = TowerDistillConfig(**card["config"]), card["classes"]
    splits = load_splits(Path(corpus), cfg, classes, progress=False)
    student = make_student(cfg, len(classes), splits["test"][3].shape[1])
    student.load_state_dict(load_file(str(Path(run) / "tower.safetensors")), strict=False)
    card["metrics"] = measured(Path(corpus), student, splits, classes)
    (Path(run) / "distill.json").write_text(json.dumps(card, indent=1))
    return card["metrics"]


def distilled_layers(run: Path) -> tuple[int, ...]:
    """The tower layers a distillation run trained (what ``models.small.SmallSpec.tower_layers`` commits)."""
    return TowerDistillConfig(**json.loads((Path(run) / "distill.json").read_text())["config"]).tuned_layers


def export_whisper(run: Path, encoder: str = "whisper-tiny.en") -> Path:
    """The distilled tower as a whole Whisper checkpoint, ``run/<encoder>-distilled``: the fetched Whisper with the
    run's trained layers in its encoder. Any ``encoder`` argument takes it (the feature cache, the probe, the
    verifier's head), so a head on the distilled tower is trained and measured exactly as one on the original."""
    from safetensors.torch import load_file
    from transformers import WhisperProcessor

    out = Path(run) / f"{Path(encoder).name}-distilled"
    if (out / "config.json").exists():
        return out
    whisper = load_whisper(encoder)
    trained = {f"model.encoder.{k.removeprefix('tower.')}": v for k, v in load_file(str(Path(run) / "tower.safetensors")).items()
               if k.startswith("tower.")}
    unexpected = whisper.load_state_dict(trained, strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"{run}: tensors that are not Whisper's encoder: {unexpected[:3]}")
    whisper.save_pretrained(out)
    WhisperProcessor.from_pretrained(whisper_checkpoint(encoder)).save_pretrained(out)
    return out


def audioset_kept(student_logits: np.ndarray, teacher_probs: np.ndarray) -> float:
    """The share of test patches whose teacher top AudioSet class is in the student's top 5."""
    s = student_logits.reshape(-1, AUDIOSET_CLASSES)
    t = teacher_probs.reshape(-1, AUDIOSET_CLASSES)
    top5 = np.argsort(-s, axis=1)[:, :5]
    return round(float((top5 == t.argmax(1)[:, None]).any(1).mean()), 4)


def tower_whisper(source: Path, encoder: str = "whisper-tiny.en") -> tuple[Path, tuple[int, ...]]:
    """A distilled tower as a Whisper checkpoint in the cache, and its distilled layers: from a distillation run
    (``earwitness train tower --out DIR``) or from a checkpoint that commits its tower's layers (earwitness-small: its
    ``trained.safetensors``), so a recipe can start from the shipped tower instead of distilling again.

    The layers are taken in the precision they are committed in (float16), and the directory is named by their hash:
    every stage built on the same tower reads the same feature cache (``train.features.encoder_tag``)."""
    from safetensors.torch import load_file

    source = Path(source)
    if is_assembled_checkpoint(source):
        layers = read_spec(source).tower_layers
        trained = {k.replace("model.audio_tower.", "model.encoder.", 1): v for k, v in load_file(str(source / TRAINED_FILE)).items()
                   if k.startswith("model.audio_tower.")}
    else:
        layers = distilled_layers(source)
        trained = {f"model.encoder.{k.removeprefix('tower.')}": v for k, v in load_file(str(source / "tower.safetensors")).items()
                   if k.startswith("tower.")}
    if not trained:
        raise ValueError(f"{source}: no distilled tower layers (a distillation run or a checkpoint with tower_layers)")
    trained = {k: v.half() for k, v in sorted(trained.items())}
    digest = hashlib.sha256(b"".join(k.encode() + v.numpy().tobytes() for k, v in trained.items())).hexdigest()[:12]

    def build(out: Path) -> None:
        from transformers import WhisperProcessor

        whisper = load_whisper(encoder)
        unexpected = whisper.load_state_dict({k: v.float() for k, v in trained.items()}, strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"{source}: tensors that are not Whisper's encoder: {unexpected[:3]}")
        whisper.save_pretrained(out)
        WhisperProcessor.from_pretrained(whisper_checkpoint(encoder)).save_pretrained(out)

    return build_once(f"distilled/{digest}-{Path(encoder).name}", build), layers
