"""Train, calibrate and ship the embedded absent-sound verifier (``earwitness train verifier``).

Audio side: :class:`models.verifier.scorer.AudioTextScorer`, a small CNN over 80 ms blocks of
log-mel, trained from scratch on the corpus' train scenes. Text side: the frozen real text
encoder (all-MiniLM-L6-v2); frames are projected into its 384-d space.

Objective: multi-label sigmoid BCE of every scene against every class's phrase embedding
(SigLIP-style pairwise loss rather than a softmax contrast). A scene holds several events, and
the guard needs an independent "is X in here" probability per sound, which a softmax over
classes cannot give. Each step draws one random phrase (or the caption) per class as its text,
so the audio is pulled towards the whole phrase neighbourhood of a class, not one string, and
paraphrases score like the phrases they resemble.

Labels: a scene's foreground events plus its background bed (the QA rows count the bed as
present too). Augmentation: a second scene mixed in (log-add-exp of the features at a random
gain, labels unioned), circular time shifts, frequency-band masks.

Calibration on the validation split's presence questions (present vs random/popular/
adversarial absent, as asked): Platt scaling of the clip logit, so scores read as the
probability that the asked-about sound is there under the question mix the corpus asks.
Thresholds, also from validation: ``absent_below`` is the 2nd percentile of present events'
probabilities (at most ~2% of real sounds can be judged absent), ``present_above`` the 90th
percentile of absent ones; between them a claim is uncertain.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torch.nn import functional as F

from models.verifier.checkpoint import save_embedded
from models.verifier.scorer import AisfxScorerConfig, AudioTextScorer, ScorerConfig, WhisperScorerConfig, WhisperTextScorer, YamnetScorerConfig, batch_waves
from models.verifier.text import OntologyIndex, TextEncoder, ontology_phrases
from train.data.formats import read_timelines
from train.data.ontology import load_ontology
from train.data.qa import NEGATIVE_SAMPLINGS, read_qa_rows
from train.data.targets import frame_targets
from train.frozen_features import PROBE_POSITIONS, held_out_packages, load_split
from train.metrics import choose_prior_correction, class_prior_logits, fit_platt, roc_auc
from train.package_holdout import leave_one_package_out

FEATURE_TAG = "verifier-mel64-b4"
ABSENT_PERCENTILE = 2.0
PRESENT_PERCENTILE = 90.0


def scene_labels(timeline: dict) -> set[str]:
    labels = {e["label"] for e in timeline["events"]}
    bed = (timeline.get("background") or {}).get("label")
    if bed:
        labels.add(bed)
    return labels


def recording_augment(x: torch.Tensor, yf: torch.Tensor, rng: np.random.Generator, n_mels: int, floor: float,
                      lowpass: list[torch.Tensor] | None = None):
    """Make a recording look like another recording of the same sound (the test split's are unseen ones).

    Per clip, in the log-mel block domain: a random smooth equaliser curve (±6 dB: microphones and
    rooms), a shift of up to ±3 mel bins (pitch: another dog, another bell), a time stretch of
    0.8-1.25× (tempo), a masked frequency band, and (``lowpass``: per-bin log gains) a low-pass at the
    bandwidth of a lower-rate source, so that no sound is known by its recording's bandwidth alone.
    """
    b, _, t = x.shape
    bins = torch.arange(n_mels, dtype=torch.float32) / n_mels
    for j in range(b):
        curve = sum(float(rng.normal(0, 0.25)) * torch.cos(math.pi * k * bins + float(rng.uniform(0, math.pi))) for k in (1, 2, 3))
        curve = curve * (6 * math.log(10) / 10) / 0.6
        x[j, :n_mels] += curve[:, None]
        x[j, n_mels:] += curve[:, None]
        shift = int(rng.integers(-3, 4))
        if shift:
            for lo in (0, n_mels):
                band = x[j, lo : lo + n_mels].roll(shift, dims=0)
                if shift > 0:
                    band[:shift] = band[shift : shift + 1]
                else:
                    band[shift:] = band[shift - 1 : shift]
                x[j, lo : lo + n_mels] = band
        if lowpass and rng.random() < 0.3:
            gains = lowpass[int(rng.integers(len(lowpass)))]
            for lo in (0, n_mels):
                x[j, lo : lo + n_mels] = torch.clamp(x[j, lo : lo + n_mels] + gains[:, None], min=floor)
        if rng.random() < 0.5:
            f0, width = int(rng.integers(0, n_mels - 8)), int(rng.integers(1, 8))
            x[j, f0 : f0 + width] = floor
            x[j, n_mels + f0 : n_mels + f0 + width] = floor
    rate = float(rng.uniform(0.8, 1.25))
    if abs(rate - 1) > 0.02:
        new_t = max(8, int(round(t * rate)))
        xs_ = F.interpolate(x, size=new_t, mode="linear", align_corners=False)
        ys_ = F.interpolate(yf, size=new_t, mode="nearest")
        if new_t >= t:
            x, yf = xs_[..., :t], ys_[..., :t]
        else:
            x = torch.cat([xs_, torch.full((b, x.shape[1], t - new_t), floor)], dim=-1)
            yf = torch.cat([ys_, torch.zeros(b, yf.shape[1], t - new_t)], dim=-1)
    return x, yf


# The bandwidths of the corpus' low-rate sources (8 kHz and 11.025 kHz files: Nyquist 4 and 5.5 kHz).
LOWPASS_HZ = (4000.0, 5512.5)


def lowpass_log_gains(cfg: ScorerConfig, cutoff_hz: float) -> torch.Tensor:
    """Per mel bin, the log of the share of its filter below ``cutoff_hz`` (-inf above): a low-pass in the log-mel domain."""
    from transformers.audio_utils import mel_filter_bank

    fb = mel_filter_bank(cfg.n_fft // 2 + 1, cfg.n_mels, cfg.fmin, cfg.fmax, cfg.sample_rate, norm="slaney", mel_scale="slaney")
    freqs = np.linspace(0, cfg.sample_rate / 2, cfg.n_fft // 2 + 1)
    kept = fb[freqs < cutoff_hz].sum(0) / np.maximum(fb.sum(0), 1e-12)
    return torch.from_numpy(np.log(np.maximum(kept, 1e-30)).astype(np.float32))


def split_features(corpus: Path, split: str, scorer: AudioTextScorer, batch: int = 32, progress: bool = True) -> tuple[np.ndarray, dict[str, int]]:
    """Block features of every scene of a split (float16, cached under ``features/``)."""
    base = corpus / "features" / FEATURE_TAG
    arr_path, idx_path = base / f"{split}.npy", base / f"{split}.json"
    if arr_path.exists() and idx_path.exists():
        return np.load(arr_path), json.loads(idx_path.read_text())
    files = sorted((corpus / "scenes" / split).glob("*.flac"))
    out, rows = None, {}
    start = time.time()
    for i in range(0, len(files), batch):
        chunk = files[i : i + batch]
        waves, _ = batch_waves([sf.read(p, dtype="float32")[0] for p in chunk])
        feats = scorer.features(waves).numpy().astype(np.float16)
        if out is None:
            out = np.zeros((len(files), *feats.shape[1:]), dtype=np.float16)
        out[i : i + len(chunk)] = feats
        rows.update({p.stem: i + j for j, p in enumerate(chunk)})
        if progress and (i // batch) % 40 == 0:
            print(f"features {split}: {i + len(chunk)}/{len(files)} ({time.time() - start:.0f} s)", flush=True)
    base.mkdir(parents=True, exist_ok=True)
    np.save(arr_path, out)
    idx_path.write_text(json.dumps(rows))
    return out, rows


def presence_pairs(corpus: Path, split: str) -> list[tuple[str, str, int, str]]:
    """``(scene_id, class, present, sampling)`` of the split's presence questions, deduplicated."""
    seen, out = set(), []
    for line in (corpus / "qa" / f"{split}.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] != "presence":
            continue
        key = (r["scene_id"], r["label"], r["sampling"])
        if key not in seen:
            seen.add(key)
            out.append((r["scene_id"], r["label"], int(r["sampling"] == "positive"), r["sampling"]))
    return out


@torch.inference_mode()
def clip_logits(scorer: AudioTextScorer, feats: np.ndarray, text: torch.Tensor, batch: int = 128) -> np.ndarray:
    scorer.eval()
    out = []
    for i in range(0, len(feats), batch):
        out.append(scorer(torch.from_numpy(np.asarray(feats[i : i + batch], dtype=np.float32)), text).numpy())
    return np.concatenate(out)


def _pair_scores(logits: np.ndarray, rows: dict[str, int], classes: list[str], pairs) -> tuple[np.ndarray, np.ndarray, list[str]]:
    ci = {c: i for i, c in enumerate(classes)}
    s = np.array([logits[rows[sid], ci[c]] for sid, c, _, _ in pairs], dtype=np.float64)
    y = np.array([p for _, _, p, _ in pairs])
    return s, y, [smp for *_, smp in pairs]


def train_verifier(corpus: Path, out: Path, epochs: int = 12, batch: int = 32, lr: float = 1e-2, pos_weight: float = 4.0, seed: int = 0, init: Path | None = None, width: int = 128, threads: int | None = None,
                   budget_s: float | None = None, progress: bool = True, lowpass_aug: bool = True) -> dict:
    """Train on ``corpus``'s train split, calibrate on validation, measure on test, write ``out``."""

    corpus, out = Path(corpus), Path(out)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    t0 = time.time()
    space = TextSpace.build(corpus)
    classes = space.classes
    cfg = ScorerConfig(width=width)
    scorer = mel_scorer(cfg, init)
    feats = {s: split_features(corpus, s, scorer, progress=progress) for s in ("train", "validation", "test")}
    x_train, rows_train = feats["train"]
    timelines = read_timelines(corpus, "train")
    y_train = clip_targets(timelines, rows_train, classes, len(x_train))
    xs = torch.from_numpy(x_train.astype(np.float32))
    if init is None:
        with torch.no_grad():
            scorer.feat_mean.copy_(xs.mean(dim=(0, 2))[:, None])
            scorer.feat_std.copy_(xs.std(dim=(0, 2))[:, None] + 1e-3)
    frames_n = x_train.shape[-1]
    block_s = cfg.hop * cfg.block / cfg.sample_rate
    ft = torch.from_numpy(frame_targets(timelines, rows_train, classes, frames_n, frames_n * block_s).transpose(0, 2, 1).astype(np.uint8))
    floor = float(xs.min())

    weights = torch.full((len(classes),), float(pos_weight))
    opt = torch.optim.AdamW(scorer.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(xs) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.1)
    lowpass = [lowpass_log_gains(cfg, hz) for hz in LOWPASS_HZ] if lowpass_aug else None
    history = []
    for epoch in range(epochs):
        scorer.train()
        order = torch.from_numpy(rng.permutation(len(xs)))
        running = 0.0
        for i in range(0, len(xs), batch):
            idx = order[i : i + batch]
            x, yf = mix_scenes(xs[idx].clone(), ft[idx].float(), xs, ft, rng)
            x, yf = recording_augment(x, yf, rng, cfg.n_mels, floor, lowpass)
            # strong labels: every 80 ms block knows what sounds in it; plus the clip-level (pooled) loss the guard reads,
            # against what is still in the (stretched, cropped) clip
            loss = head_loss(scorer, x, yf, space.draw(rng), weights)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            running += float(loss.detach())
        val_auc = split_auc(scorer, feats["validation"], corpus, "validation", classes, space.class_emb)
        history.append({"epoch": epoch + 1, "loss": running / steps_per_epoch, "val_auc": val_auc, "elapsed_s": round(time.time() - t0, 1)})
        if progress:
            print(json.dumps(history[-1]), flush=True)
        if budget_s and time.time() - t0 > budget_s:
            break

    training = {"epochs_run": len(history), "batch": batch, "lr": lr, "seed": seed, "init": str(init) if init else None, "lowpass": lowpass_aug,
                "history": history, "train_scenes": int(len(xs)), "seconds": round(time.time() - t0, 1), "corpus": str(corpus)}
    return calibrate_and_ship(scorer, feats, corpus, classes, space.class_emb, y_train, space.phrases, space.phrase_emb, out, training)


def mel_scorer(cfg: ScorerConfig, init: Path | None = None) -> AudioTextScorer:
    """A new log-mel scorer, or (``init``: a verifier directory) one warm-started from it: training in several short
    runs, each its own one-cycle schedule."""
    scorer = AudioTextScorer(cfg)
    if init is not None:
        from safetensors.torch import load_file

        missing, _ = scorer.load_state_dict(load_file(str(Path(init) / "scorer.safetensors")), strict=False)
        if missing:
            print(f"warm start from {init}: new parameters {missing}", flush=True)
    return scorer


def clip_targets(timelines: dict, rows: dict[str, int], classes: list[str], n: int) -> np.ndarray:
    """``[n, classes]``: 1 where a scene (its row in ``rows``) holds the class, as an event or as its bed."""
    ci = {c: i for i, c in enumerate(classes)}
    y = np.zeros((n, len(classes)), dtype=np.float32)
    for sid, r in rows.items():
        for label in scene_labels(timelines[sid]):
            y[r, ci[label]] = 1.0
    return y


def mix_scenes(x: torch.Tensor, yf: torch.Tensor, xs: torch.Tensor, ft: torch.Tensor, rng: np.random.Generator):
    """A training batch's scene mixing, in place on ``x`` (block features) and ``yf`` (their frame targets).

    Half the batch gets a second scene of ``xs`` mixed in at −12…+3 dB (log-add-exp of mean and max features is a
    mix's upper bound; its frame targets ``ft`` joined in), then the whole batch a random circular time shift.
    """
    half = len(x) // 2
    other = torch.from_numpy(rng.integers(0, len(xs), half))
    gain = torch.from_numpy(rng.uniform(-12, 3, (half, 1, 1)).astype(np.float32)) * math.log(10) / 10
    x[:half] = torch.logaddexp(x[:half], xs[other] + gain)
    yf[:half] = torch.maximum(yf[:half], ft[other].float())
    shift = int(rng.integers(0, x.shape[-1]))
    return torch.roll(x, shift, dims=-1), torch.roll(yf, shift, dims=-1)


def calibrate(scores: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float]:
    """``(a, b, absent_below, present_above)`` on validation: Platt scaling of the scores, then the thresholds
    (absent below the :data:`ABSENT_PERCENTILE` of present questions' probabilities, present from the
    :data:`PRESENT_PERCENTILE` of absent ones)."""
    y = np.asarray(y).astype(bool)
    a, b = fit_platt(scores, y.astype(np.float32))
    p = 1 / (1 + np.exp(-(a * np.asarray(scores) + b)))
    absent_below = float(np.percentile(p[y], ABSENT_PERCENTILE))
    return a, b, absent_below, float(max(absent_below, np.percentile(p[~y], PRESENT_PERCENTILE)))


def calibrate_and_ship(scorer, feats: dict, corpus: Path, classes: list[str], class_emb: torch.Tensor, y_train: np.ndarray,
                       phrases, phrase_emb: np.ndarray, out: Path, training: dict) -> dict:
    """Prior correction, Platt calibration and thresholds on validation; the measured table on test; the checkpoint in ``out``."""
    scorer.eval()
    val_pairs = presence_pairs(corpus, "validation")
    val_logits = clip_logits(scorer, feats["validation"][0], class_emb)
    prior_logit = class_prior_logits(y_train)
    beta = choose_prior_correction(lambda offsets: roc_auc(*_pair_scores(val_logits + offsets, feats["validation"][1], classes, val_pairs)[1::-1]), prior_logit)
    offsets = -beta * prior_logit
    s_val, y_val, _ = _pair_scores(val_logits + offsets, feats["validation"][1], classes, val_pairs)
    a, b, absent_below, present_above = calibrate(s_val, y_val)
    p_val = 1 / (1 + np.exp(-(a * s_val + b)))

    # measurement on test
    test_pairs = presence_pairs(corpus, "test")
    s_test, y_test, smp = _pair_scores(clip_logits(scorer, feats["test"][0], class_emb) + offsets, feats["test"][1], classes, test_pairs)
    p_test = 1 / (1 + np.exp(-(a * s_test + b)))
    smp = np.array(smp)
    metrics = {"test_roc_auc": roc_auc(y_test, p_test), "validation_roc_auc": roc_auc(y_val, p_val)}
    for kind in NEGATIVE_SAMPLINGS:
        keep = (smp == "positive") | (smp == kind)
        metrics[f"test_roc_auc_{kind}"] = roc_auc(y_test[keep], p_test[keep])
        metrics[f"test_absent_rate_{kind}"] = float((p_test[smp == kind] < absent_below).mean())
    metrics["test_present_judged_absent"] = float((p_test[y_test == 1] < absent_below).mean())
    metrics["test_pairs"] = int(len(y_test))
    metrics = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}

    card = {
        "calibration": {"a": a, "b": b},
        "class_offsets": [float(o) for o in offsets],
        "prior_correction": beta,
        "thresholds": {"absent_below": absent_below, "present_above": present_above},
        "metrics": metrics,
        "training": training,
    }
    save_embedded(out, scorer, classes, phrases, phrase_emb, card)
    return card


# --------------------------------------------------------------------------- on a frozen pretrained Whisper encoder


@dataclass
class TextSpace:
    """The class phrases in the frozen text space: what the verifier's audio frames are trained against."""

    classes: list[str]
    phrases: list[tuple[str, str]]
    phrase_emb: np.ndarray
    class_emb: torch.Tensor
    by_class: list[np.ndarray]  # per class, the rows of its phrases

    @classmethod
    def build(cls, corpus: Path) -> "TextSpace":
        onto = load_ontology(corpus / "ontology.json") if (corpus / "ontology.json").exists() else load_ontology()
        phrases = ontology_phrases(onto)
        phrase_emb = TextEncoder().encode([p for _, p in phrases])
        index = OntologyIndex(onto.names, phrases, phrase_emb)
        return cls(onto.names, phrases, phrase_emb, torch.from_numpy(index.class_embeddings()),
                   [np.flatnonzero(index.phrase_class == i) for i in range(len(onto.names))])

    def draw(self, rng: np.random.Generator) -> torch.Tensor:
        """One random phrase per class (or, 30% of steps, the class centroids): a class is its phrase neighbourhood."""
        if rng.random() < 0.3:
            return self.class_emb
        return torch.from_numpy(self.phrase_emb[[int(rng.choice(ix)) for ix in self.by_class]])


def standardise(scorer, sample: torch.Tensor) -> None:
    """Set a head's input standardisation from ``[rows, features]`` of its training features."""
    with torch.no_grad():
        scorer.feat_mean.copy_(sample.float().mean(0))
        scorer.feat_std.copy_(sample.float().std(0) + 1e-3)


def head_loss(scorer, feats: torch.Tensor, yf: torch.Tensor, text: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Strong labels: BCE of every frame's logit against its activity ``yf`` ``[B, C, T]``, plus BCE of the pooled
    clip logit (multiple-instance) against the clip's, each class's positives weighted by ``weights``."""
    frame_logits = scorer.frame_logits(scorer.frames(feats), text)
    return F.binary_cross_entropy_with_logits(scorer.pool(frame_logits), yf.amax(-1), pos_weight=weights) \
        + F.binary_cross_entropy_with_logits(frame_logits, yf, pos_weight=weights[:, None])


def fit_whisper_head(train, space: TextSpace, cfg, keep: np.ndarray | None = None, epochs: int = 12, batch: int = 64, lr: float = 2e-3,
                     pos_weight: float = 4.0, seed: int = 0, on_epoch=None):
    """Train a :class:`~models.verifier.scorer.WhisperTextScorer` head on frozen features (``train``: a probe split, ``keep``: its rows to use).

    Targets are the strong labels: every 80 ms frame's activity, plus the clip's (pooled, multiple-instance) label.
    """

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    rows = np.flatnonzero(keep) if keep is not None else np.arange(len(train.features))
    x_all, ft = train.features, train.targets  # [N, P, F] float16, [N, P, C]
    scorer = WhisperTextScorer(cfg)
    standardise(scorer, torch.from_numpy(np.asarray(x_all[np.sort(rng.choice(rows, size=min(len(rows), 512), replace=False))],
                                                    dtype=np.float32).reshape(-1, cfg.features)))
    weights = torch.full((len(space.classes),), float(pos_weight))
    opt = torch.optim.AdamW(scorer.parameters(), lr=lr, weight_decay=1e-2)
    steps_per_epoch = math.ceil(len(rows) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.1)
    for epoch in range(epochs):
        scorer.train()
        running = 0.0
        for idx in np.array_split(rng.permutation(rows), steps_per_epoch):
            idx = np.sort(idx)
            yf = torch.from_numpy(ft[idx]).float().transpose(1, 2)  # [B, C, P]
            loss = head_loss(scorer, torch.from_numpy(np.asarray(x_all[idx])), yf, space.draw(rng), weights)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            running += float(loss.detach())
        if on_epoch is not None:
            on_epoch(epoch, scorer.eval(), running / steps_per_epoch)
    return scorer.eval()


def train_whisper_verifier(corpus: Path, out: Path, encoder: str = "whisper-tiny.en", views: int = 1, width: int = 0, epochs: int = 12,
                           batch: int = 64, lr: float = 2e-3, pos_weight: float = 4.0, seed: int = 0, threads: int | None = None,
                           lopo_epochs: int = 0, progress: bool = True) -> dict:
    """The verifier's head on a frozen pretrained encoder (a Whisper, ``encoder="yamnet"`` or ``"aisfx"``), trained on the feature
    cache (``train.features``).

    The audio side is the frozen encoder's last and middle layers every 80 ms (what the probe
    measures); trained are a map into the text space and the text-side map. The recording-setup
    augmentation is in the ``views`` augmented copies of each train scene. ``lopo_epochs`` > 0 also
    measures leave-one-package-out (the probe's packages, a head of that many epochs per package).
    """
    corpus, out = Path(corpus), Path(out)
    if threads:
        torch.set_num_threads(threads)
    t0 = time.time()
    space = TextSpace.build(corpus)
    data = head_data(corpus, encoder, views, space.classes, progress)
    feats = {split: (d.features, d.rows) for split, d in data.items()}
    cfg = head_config(encoder, int(data["train"].features.shape[-1]), width)
    history = []

    def log(epoch, scorer, loss):
        val_auc = split_auc(scorer, feats["validation"], corpus, "validation", space.classes, space.class_emb)
        history.append({"epoch": epoch + 1, "loss": loss, "val_auc": val_auc, "elapsed_s": round(time.time() - t0, 1)})
        if progress:
            print(json.dumps(history[-1]), flush=True)

    scorer = fit_whisper_head(data["train"], space, cfg, epochs=epochs, batch=batch, lr=lr, pos_weight=pos_weight, seed=seed, on_epoch=log)
    training = {"epochs_run": len(history), "batch": batch, "lr": lr, "seed": seed, "views": views, "history": history,
                "train_scenes": int(len(data["train"].rows)), "train_rows": int(len(data["train"].features)),
                "seconds": round(time.time() - t0, 1), "corpus": str(corpus)}
    card = calibrate_and_ship(scorer, feats, corpus, space.classes, space.class_emb, data["train"].targets.max(1).astype(np.float32),
                              space.phrases, space.phrase_emb, out, training)
    if lopo_epochs:

        card["lopo"] = head_lopo(corpus, data, space, cfg, lopo_epochs, card["prior_correction"], batch=batch, lr=lr, pos_weight=pos_weight, seed=seed)
        card["metrics"]["lopo_mean"] = round(float(np.nanmean([v["auc"] for v in card["lopo"].values()])), 4)
        card["training"]["lopo_epochs"] = lopo_epochs
        save_embedded(out, scorer, space.classes, space.phrases, space.phrase_emb, card)
    return card


def head_data(corpus: Path, encoder: str, views: int, classes: list[str], progress: bool = True) -> dict:
    """A head's features per split (``train.frozen_features.ProbeData``): the train split with ``views`` augmented copies."""
    data = {"train": load_split(corpus, "train", encoder, classes, "both", tuple(range(views + 1)), progress=progress)}
    for split in ("validation", "test"):
        data[split] = load_split(corpus, split, encoder, classes, "both", (0,), progress=progress)
    return data


def head_config(encoder: str, features: int, width: int = 0):
    """The scorer configuration of a head on ``encoder``'s frozen features."""
    if encoder == "aisfx":
        return AisfxScorerConfig(features=features, width=width)
    return (YamnetScorerConfig(features=features, width=width) if encoder == "yamnet"
            else WhisperScorerConfig(encoder=encoder, positions=PROBE_POSITIONS, features=features, width=width))


def head_lopo(corpus: Path, data: dict, space, cfg, epochs: int, prior_beta: float, keep_scores: bool = False, **fit) -> dict:
    """Leave-one-package-out of a head on frozen features (``train.package_holdout.leave_one_package_out``): one head of
    ``epochs`` per held-out package, trained as the shipped head was (``fit``: batch, lr, pos_weight, seed)."""
    def fit_without(keep):
        head = fit_whisper_head(data["train"], space, cfg, keep, epochs=epochs, **fit)
        return lambda features: clip_logits(head, features, space.class_emb)

    qa = {split: read_qa_rows(corpus, split) for split in data}
    return leave_one_package_out(data, qa, space.classes, held_out_packages(corpus), fit_without, prior_beta=prior_beta, keep_scores=keep_scores)


def split_auc(scorer, feats, corpus, split, classes, class_emb) -> float:
    """ROC-AUC of a head's clip logits on a split's presence questions (``feats``: its features and rows)."""
    pairs = presence_pairs(corpus, split)
    s, y, _ = _pair_scores(clip_logits(scorer, feats[0], class_emb), feats[1], classes, pairs)
    return round(roc_auc(y, s), 4)
