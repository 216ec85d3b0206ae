"""How much an audio encoder knows about recordings it never heard: sound-event probes on frozen features.

A language model can only answer "is there X?" as well as its audio tokens separate present from
absent X. A probe fits a small sound-event head on a frozen encoder's outputs over the train split,
then scores every presence question by the head's clip-level logit for the asked-about class and
reports ROC-AUC per negative sampling. Three heads, from least to most use of the strong labels:

- ``meanmax``: one logistic regression per class on the clip's mean and max over time;
- ``attention``: per class, an attention over time of per-frame logits (multiple-instance pooling);
- ``frame``: per-frame logits trained on the strong labels' activity, the clip's score their maximum.

Train against test shows how far the audio side generalises to unseen recordings; the
leave-one-package-out evaluation (train without a package's recordings, test on them) is the
honest figure for recordings from elsewhere. ``earwitness train probe`` prints the table.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from train.data.mixer import SCENE_S
from train.data.qa import NEGATIVE_SAMPLINGS as SAMPLINGS
from train.metrics import choose_prior_correction, class_prior_logits, roc_auc
from train.data.formats import read_timelines

POOLINGS = ("meanmax", "attention", "frame")
PROBE_POSITIONS = 125  # 80 ms: the strong labels' events are longer than that


@dataclass
class ProbeData:
    """Features ``[N, P, D]`` (float16), strong-label activity ``[N, P, C]`` and each scene's source packages."""

    features: np.ndarray
    targets: np.ndarray
    rows: dict[str, int]
    packages: list[set[str]]
    event_packages: list[dict[str, set[str]]]  # per scene: class → packages its events came from


def pool_time(x: np.ndarray, positions: int) -> np.ndarray:
    """Average ``[N, P, D]`` down to ``positions`` steps (P a multiple of it), as the served verifier does."""
    from models.verifier.scorer import pool_positions

    return pool_positions(torch.from_numpy(np.asarray(x, dtype=np.float32)), positions).numpy().astype(np.float16)


def scene_packages(corpus_dir: Path, timelines: dict, rows: dict[str, int]) -> tuple[list[set[str]], list[dict[str, set[str]]]]:
    """Per scene row: the packages of all its sources, and per class the packages its events came from."""
    package_of = {}
    with (corpus_dir / "sources.jsonl").open(encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            package_of[r["id"]] = r["package"]
    packages: list[set[str]] = [set() for _ in rows]
    by_class: list[dict[str, set[str]]] = [defaultdict(set) for _ in rows]
    for sid, row in rows.items():
        t = timelines[sid]
        for e in t["events"]:
            pkg = package_of.get(e["source_id"], "synthetic")
            packages[row].add(pkg)
            by_class[row][e["label"]].add(pkg)
        bed = t.get("background") or {}
        if bed.get("source_id"):
            pkg = package_of.get(bed["source_id"], "synthetic")
            packages[row].add(pkg)
            by_class[row][bed["label"]].add(pkg)
    return packages, by_class


def load_split(corpus_dir: Path, split: str, encoder: str, classes: list[str], layers: str = "both",
               views: tuple[int, ...] = (0,), window_s: int = 10, progress: bool = True) -> ProbeData:
    """One split's frozen features (views stacked), pooled to :data:`PROBE_POSITIONS`, with their labels; for
    ``encoder="yamnet"``, YAMNet's patches (0.96 s every 0.48 s) with patch-aligned labels; ``"aisfx"``, aiSFX's
    0.186 s steps with step-aligned labels."""
    from train.encoder import frame_targets, patch_targets
    from train.features import encoder_features, yamnet_features

    feats, targets, rows = [], [], {}
    timelines = read_timelines(corpus_dir, split)
    if encoder in ("yamnet", "aisfx"):
        from models.pretrained import aisfx, yamnet
        from train.features import aisfx_features

        read, window_s, hop_s = ((yamnet_features, yamnet.PATCH_S, yamnet.PATCH_HOP_S) if encoder == "yamnet"
                                 else (aisfx_features, aisfx.STEP_S, aisfx.STEP_S))
        for view in views:
            x, view_rows = read(corpus_dir, split, view=view, progress=progress)
            feats.append(np.asarray(x))
            targets.append(patch_targets(timelines, view_rows, classes, x.shape[1], window_s, hop_s))
            rows = rows or view_rows
        packages, event_packages = scene_packages(corpus_dir, timelines, rows)
        return ProbeData(np.concatenate(feats), np.concatenate(targets), rows, packages * len(views), event_packages * len(views))
    for view in views:
        enc = encoder_features(corpus_dir, split, encoder, window_s=window_s, view=view, progress=progress)
        parts = {"last": [enc.last], "middle": [enc.middle], "both": [enc.last, enc.middle]}[layers]
        heard = int(enc.last.shape[1] * SCENE_S / window_s)  # a 30 s window holds the 10 s scene, then padding
        pooled = np.concatenate([pool_time(np.asarray(p[:, :heard]), PROBE_POSITIONS) for p in parts], axis=-1)
        feats.append(pooled)
        targets.append(frame_targets(timelines, enc.rows, classes, PROBE_POSITIONS, SCENE_S))
        if view == views[0]:
            rows = enc.rows
    packages, event_packages = scene_packages(corpus_dir, timelines, rows)  # every view holds the same scenes, in order
    return ProbeData(np.concatenate(feats), np.concatenate(targets), rows, packages * len(views), event_packages * len(views))


class ProbeHead(torch.nn.Module):
    """A sound-event head on standardised frozen features; ``forward`` gives (clip logits, frame logits or None)."""

    def __init__(self, dim: int, classes: int, pooling: str, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}")
        self.pooling = pooling
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.drop = torch.nn.Dropout(0.2)
        self.cla = torch.nn.Linear(2 * dim if pooling == "meanmax" else dim, classes)
        self.att = torch.nn.Linear(dim, classes) if pooling == "attention" else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.drop((x.float() - self.mean) / self.std)
        if self.pooling == "meanmax":
            return self.cla(torch.cat([x.mean(1), x.amax(1)], dim=-1)), None
        frame = self.cla(x)
        if self.pooling == "attention":
            weights = torch.softmax(self.att(x), dim=1)
            return (weights * frame).sum(1), frame
        return frame.amax(1), frame


def fit_probe(data: ProbeData, pooling: str, keep: np.ndarray | None = None, epochs: int = 12, batch_size: int = 128,
              lr: float = 2e-3, weight_decay: float = 1e-2, seed: int = 0) -> ProbeHead:
    """Minibatch AdamW on clip-level BCE (and, for ``frame``, frame-level BCE on the strong labels)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    idx = np.flatnonzero(keep) if keep is not None else np.arange(len(data.features))
    sample = data.features[rng.choice(idx, size=min(len(idx), 512), replace=False)].astype(np.float32)
    mean = torch.from_numpy(sample.reshape(-1, sample.shape[-1]).mean(0))
    std = torch.from_numpy(sample.reshape(-1, sample.shape[-1]).std(0) + 1e-3)
    head = ProbeHead(data.features.shape[-1], data.targets.shape[-1], pooling, mean, std)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    steps = epochs * math.ceil(len(idx) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    head.train()
    for _ in range(epochs):
        for batch in np.array_split(rng.permutation(idx), math.ceil(len(idx) / batch_size)):
            batch = np.sort(batch)
            x = torch.from_numpy(np.asarray(data.features[batch]))
            y = torch.from_numpy(data.targets[batch])
            clip, frame = head(x)
            loss = bce(clip, y.amax(1))
            if pooling == "frame":
                loss = loss + bce(frame, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return head.eval()


@torch.no_grad()
def clip_logits(head: ProbeHead, features: np.ndarray, batch_size: int = 256) -> np.ndarray:
    return np.concatenate([head(torch.from_numpy(np.asarray(features[i:i + batch_size])))[0].numpy()
                           for i in range(0, len(features), batch_size)])


def question_scores(logits: np.ndarray, rows_of: dict[str, int], classes: list[str], qa_rows, select=None) -> tuple[list, np.ndarray, np.ndarray]:
    """``(questions, present?, the asked-about class's clip logit)`` of the presence questions about scenes in ``rows_of``.

    ``select(row) -> bool`` keeps only some questions (leave-one-package-out keeps a package's scenes).
    """
    index = {name: i for i, name in enumerate(classes)}
    asked = [r for r in qa_rows if r.kind == "presence" and r.scene_id in rows_of and r.label in index
             and (select is None or select(r))]
    score = np.array([logits[rows_of[r.scene_id], index[r.label]] for r in asked])
    return asked, np.array([r.sampling == "positive" for r in asked], dtype=bool), score


def presence_auc(logits: np.ndarray, rows_of: dict[str, int], classes: list[str], qa_rows, select=None) -> dict[str, float]:
    """ROC-AUC of the asked-about class's clip logit: positives against each negative sampling, and all together."""
    asked, positive, score = question_scores(logits, rows_of, classes, qa_rows, select)
    out = {}
    for sampling in (*SAMPLINGS, "all"):
        sel = np.array([r.sampling == "positive" or sampling in ("all", r.sampling) for r in asked], dtype=bool)
        if sel.any() and positive[sel].any() and (~positive[sel]).any():
            out[sampling] = roc_auc(positive[sel], score[sel])
    return out


def held_out_packages(corpus_dir: Path, count: int = 6) -> list[str]:
    """The packages with the most distinct non-speech classes: each is left out of training in turn."""
    classes: dict[str, set[str]] = defaultdict(set)
    with (corpus_dir / "sources.jsonl").open(encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            if r["label"] != "Speech" and r["package"] != "synthetic":
                classes[r["package"]].add(r["label"])
    return sorted(classes, key=lambda p: (-len(classes[p]), p))[:count]


def leave_one_package_out(data: dict[str, ProbeData], qa: dict[str, list], classes: list[str], packages: list[str], fit,
                          prior_beta: float = 0.0, keep_scores: bool = False) -> dict[str, dict]:
    """Per package P: fit on train scenes holding none of P's recordings; score, over every split's scenes
    that hold P's recordings, questions whose present class came from P against the absent ones.

    ``fit(keep)`` trains a head on the train rows in ``keep`` and returns its ``features -> clip logits``;
    ``prior_beta`` takes that share of the fitted scenes' class prior out of the scores (as chosen on validation).
    ``keep_scores`` also returns each question's key ``(split, scene, class, sampling)``, label and score, so that
    the held-out scores of two heads can be fused question by question."""
    train = data["train"]
    out = {}
    for pkg in packages:
        keep = np.array([pkg not in p for p in train.packages])
        score_of = fit(keep)
        offsets = -prior_beta * class_prior_logits(train.targets[keep].max(1))
        scores, positives, keys = [], [], []
        for split, d in data.items():

            def from_pkg(r, d=d, split=split):
                row = d.rows[r.scene_id]
                if pkg not in d.packages[row] or (split == "train" and keep[row]):
                    return False
                return r.sampling != "positive" or pkg in d.event_packages[row].get(r.label, ())

            asked, positive, score = question_scores(score_of(d.features[: len(d.rows)]) + offsets, d.rows, classes, qa[split], from_pkg)
            scores.append(score)
            positives.append(positive)
            keys += [(split, r.scene_id, r.label, r.sampling) for r in asked]
        y, scores = np.concatenate(positives), np.concatenate(scores)
        out[pkg] = {"auc": roc_auc(y, scores) if y.any() and (~y).any() else float("nan"),
                    "questions": int(len(y)), "train_scenes": int(keep.sum())}
        if keep_scores:
            out[pkg] |= {"keys": keys, "y": y, "scores": scores}
    return out


def run_probe(corpus_dir: str | Path, encoders: tuple[str, ...] = ("whisper-tiny.en",), poolings: tuple[str, ...] = POOLINGS,
              views: tuple[int, ...] = (0,), layers: str = "both", lopo: bool = True, lopo_count: int = 6,
              window_s: int = 10, train_packages: tuple[str, ...] | None = None, train_scenes: int | None = None,
              prior_correction: bool = True, progress: bool = True, **fit) -> list[dict]:
    """Every encoder × pooling on one corpus: presence ROC-AUC per split and sampling, and leave-one-package-out.

    ``train_packages`` fits only on train scenes made entirely of those packages' recordings (the
    core packages: the corpus as it was, scored on the same test split); ``train_scenes`` keeps that
    many of them (drawn with seed 0), so that breadth and count can be told apart. ``prior_correction``
    takes the share of each class's training prior that validation says helps out of its scores
    (``train.verifier.choose_prior_correction``), as the verifier does.
    """
    from train.data.ontology import load_ontology
    from train.data.qa import read_qa_rows

    corpus_dir = Path(corpus_dir)
    classes = load_ontology(corpus_dir / "ontology.json").names
    qa = {s: read_qa_rows(corpus_dir, s) for s in ("train", "validation", "test")}
    results = []
    for encoder in encoders:
        data = {"train": load_split(corpus_dir, "train", encoder, classes, layers, views, window_s, progress)}
        for split in ("validation", "test"):
            data[split] = load_split(corpus_dir, split, encoder, classes, layers, (0,), window_s, progress)
        packages = held_out_packages(corpus_dir, lopo_count) if lopo else []
        keep = train_subset(data["train"], train_packages, train_scenes)
        for pooling in poolings:
            head = fit_probe(data["train"], pooling, keep=keep, **fit)
            row = {"corpus": corpus_dir.name, "encoder": encoder, "pooling": pooling, "views": len(views), "layers": layers,
                   "window_s": window_s, "train_packages": "core" if train_packages else "all",
                   "train_rows": int(len(data["train"].features) if keep is None else keep.sum())}
            logits = {split: clip_logits(head, d.features[: len(d.rows)]) for split, d in data.items()}
            prior_logit = class_prior_logits(data["train"].targets.max(1) if keep is None else data["train"].targets[keep].max(1))
            beta = choose_prior_correction(
                lambda offsets: presence_auc(logits["validation"] + offsets, data["validation"].rows, classes, qa["validation"])["all"], prior_logit,
            ) if prior_correction else 0.0
            logits = {split: v - beta * prior_logit for split, v in logits.items()}
            row["prior_beta"] = beta
            for split, d in data.items():
                row[split] = presence_auc(logits[split], d.rows, classes, qa[split])
            row["per_class_test"] = per_class_auc(logits["test"], data["test"].rows, classes, qa["test"])
            if packages and keep is None:
                def fit_head(keep_rows, pooling=pooling):
                    head = fit_probe(data["train"], pooling, keep=keep_rows, **fit)
                    return lambda features: clip_logits(head, features)

                row["lopo"] = leave_one_package_out(data, qa, classes, packages, fit_head, prior_beta=beta)
                aucs = [v["auc"] for v in row["lopo"].values() if not math.isnan(v["auc"])]
                row["lopo_mean"] = float(np.mean(aucs)) if aucs else float("nan")
            results.append(row)
            if progress:
                print(probe_table([row]), flush=True)
    return results


def probe_report(results: list[dict], out: Path | None = None) -> str:
    """The table as markdown; with ``out``, also probe.json, probe.md and a bar plot (probe.png)."""
    text = probe_table(results)
    if out is None:
        return text
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps(results, indent=1))
    (out / "probe.md").write_text(text + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.get('train_packages', 'all')} data\n{r['encoder']}\n{r['pooling']}" + (f" +{r['views'] - 1}aug" if r["views"] > 1 else "")
              + ("\n−prior" if r.get("prior_beta") else "") for r in results]
    series = {"test (all negatives)": [r["test"].get("all", np.nan) for r in results],
              "test vs adversarial": [r["test"].get("adversarial", np.nan) for r in results],
              "leave-one-package-out": [r.get("lopo_mean", np.nan) for r in results]}
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(results)), 4))
    width = 0.8 / len(series)
    for k, (name, values) in enumerate(series.items()):
        ax.bar(np.arange(len(results)) + (k - 1) * width, values, width, label=name)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xticks(np.arange(len(results)), labels, fontsize=7)
    ax.set_ylim(0.4, 1.0)
    ax.set_ylabel("presence ROC-AUC")
    ax.set_title("frozen encoder probes on unseen recordings")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "probe.png", dpi=120)
    plt.close(fig)
    return text


def train_subset(train: ProbeData, packages: tuple[str, ...] | None, scenes: int | None) -> np.ndarray | None:
    """Mask of the train rows to fit on (None: all of them)."""
    if packages is None and scenes is None:
        return None
    keep = np.array([p <= set(packages) | {"synthetic"} for p in train.packages]) if packages else np.ones(len(train.packages), bool)
    if scenes is not None and keep.sum() > scenes:
        chosen = np.random.default_rng(0).choice(np.flatnonzero(keep), size=scenes, replace=False)
        keep = np.zeros_like(keep)
        keep[chosen] = True
    return keep


def per_class_auc(logits: np.ndarray, rows_of: dict[str, int], classes: list[str], qa_rows) -> dict[str, float]:
    """Test ROC-AUC per asked-about class (all negative samplings): which classes stay weak."""
    out = {}
    for name in classes:
        auc = presence_auc(logits, rows_of, classes, qa_rows, select=lambda r, n=name: r.label == n).get("all")
        if auc is not None:
            out[name] = round(auc, 3)
    return out


def probe_table(results: list[dict]) -> str:
    """Markdown: one row per corpus × encoder × pooling × augmented views."""
    head = ("| corpus | train data (rows) | encoder | window | pooling | aug views | train | test | test vs random | vs popular | vs adversarial "
            "| leave-one-package-out | prior β |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in results:
        lopo = f"{r['lopo_mean']:.3f}" if "lopo_mean" in r else "–"
        beta = f"{r['prior_beta']:g}" if "prior_beta" in r else "–"
        t = r["test"]
        data = f"{r.get('train_packages', 'all')} ({r.get('train_rows', '?')})"
        lines.append(f"| {r['corpus']} | {data} | {r['encoder']} | {r.get('window_s', 10)} s | {r['pooling']} | {r['views'] - 1} | {r['train'].get('all', float('nan')):.3f} "
                     f"| {t.get('all', float('nan')):.3f} | " + " | ".join(f"{t[s]:.3f}" if s in t else "–" for s in SAMPLINGS)
                     + f" | {lopo} | {beta} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- a checkpoint's own audio tower


@torch.no_grad()
def encoder_outputs(model, features: np.ndarray, batch_size: int = 64) -> torch.Tensor:
    tower = model.model.audio_tower.eval()
    chunks = [tower(torch.from_numpy(np.asarray(features[i : i + batch_size], dtype=np.float32))).last_hidden_state
              for i in range(0, len(features), batch_size)]
    return torch.cat(chunks)


def encoded_split(model_dir: str | Path, model, processor, corpus_dir: Path, split: str, classes: list[str]) -> tuple[torch.Tensor, dict[str, int], torch.Tensor]:
    """``(audio tokens [N, P, dim], scene_id → row, strong-label activity [N, P, classes])`` of one split, from
    the checkpoint's own audio tower: a tiny model's runs on its cached mels; earwitness-small's is a frozen
    pretrained encoder, whose outputs the feature cache already holds (``train.features.encoder_features``)."""
    from models.registry import resolve
    from models.small import is_assembled_checkpoint, read_spec
    from train.encoder import frame_targets

    source = resolve(str(model_dir)).source
    if is_assembled_checkpoint(source):
        from train.features import encoder_features

        spec = read_spec(source)
        enc = encoder_features(corpus_dir, split, spec.encoder, spec.window_s, progress=False)
        hidden, rows_of, window_s = torch.from_numpy(np.asarray(enc.last, dtype=np.float32)), enc.rows, float(spec.window_s)
    else:
        from models.tiny import TinySize
        from train.features import feature_tag, scene_features

        size = TinySize(**model.config.earwitness_tiny_size)
        features, rows_of, _ = scene_features(corpus_dir, split, processor.feature_extractor, feature_tag(size), progress=False)
        hidden, window_s = encoder_outputs(model, features), float(size.chunk_s)
    timelines = read_timelines(corpus_dir, split)
    return hidden, rows_of, torch.from_numpy(frame_targets(timelines, rows_of, classes, hidden.shape[1], window_s))


def probe(model_dir: str | Path, corpus_dir: str | Path, splits: tuple[str, ...] = ("train", "test"), epochs: int = 12) -> dict[str, dict[str, float]]:
    """Presence ROC-AUC per split and negative sampling of a checkpoint's own audio tower (``frame`` head)."""
    from models.loading import load
    from models.registry import resolve
    from train.data.ontology import load_ontology
    from train.data.qa import read_qa_rows

    corpus_dir = Path(corpus_dir)
    processor, model = load(resolve(str(model_dir)), device="cpu")
    classes = load_ontology(corpus_dir / "ontology.json").names
    data = {}
    for split in dict.fromkeys(("train", *splits)):
        hidden, rows, active = encoded_split(model_dir, model, processor, corpus_dir, split, classes)
        data[split] = ProbeData(hidden.numpy().astype(np.float16), active.numpy(), rows, [], [])
    head = fit_probe(data["train"], "frame", epochs=epochs)
    return {split: presence_auc(clip_logits(head, data[split].features), data[split].rows, classes, read_qa_rows(corpus_dir, split))
            for split in splits}


def table(results: dict[str, dict[str, float]]) -> str:
    """Markdown of :func:`probe`: one row per split."""
    lines = ["| split | " + " | ".join(f"ROC-AUC vs {s}" for s in SAMPLINGS) + " |", "| --- |" + " --- |" * len(SAMPLINGS)]
    for split, aucs in results.items():
        lines.append(f"| {split} | " + " | ".join(f"{aucs[s]:.3f}" if s in aucs else "–" for s in SAMPLINGS) + " |")
    return "\n".join(lines)
