"""Verifiers: calibrated "is this sound in this clip?" scores, independent of the answering model.

Two implementations behind one interface (:class:`Verifier`):

- :class:`EmbeddedVerifier` — the shipped ``models/earwitness-verifier`` (a small audio encoder
  trained by ``earwitness train verifier`` against the frozen all-MiniLM-L6-v2 text space);
- :class:`ClapVerifier` — any transformers ``ClapModel`` checkpoint (local directory or hub id),
  for production audio.

Both match free text to the ontology with the real text encoder (the class phrases and their
embeddings ship with the verifier checkpoint, so serving never reads ``train/``), return a
calibrated probability per class, and judge it with thresholds stored next to the weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from models.lru import LruCache
from models.verifier.calibration import Calibration, fuse_logits
from models.verifier.events import Timeline
from models.verifier.scorer import TowerLayers
from models.verifier.text import Match, OntologyIndex, TextEncoder, normalise_phrase, shared_encoder

log = logging.getLogger("earwitness.verifier")

SAMPLE_RATE = 16_000


@dataclass
class EventScore:
    text: str
    event: str | None  # matched ontology class
    similarity: float  # text ↔ nearest class
    probability: float  # calibrated presence probability (of the free text when no class matched)
    present: bool | None  # None: between the thresholds, or not judged (``reason``)
    nearest: str | None = None  # the closest class, close enough or not
    reason: str | None = None  # outside_ontology: no class matched, so not judged
    vocabulary: str | None = None  # where ``event`` comes from: "ontology" (the trained classes) or "audioset" (the tagger's own)

    def to_dict(self) -> dict:
        return {"text": self.text, "event": self.event, "nearest": self.nearest, "similarity": round(self.similarity, 4),
                "probability": round(self.probability, 4), "present": self.present, "reason": self.reason,
                "vocabulary": self.vocabulary}


@dataclass(frozen=True)
class OpenVocabulary:
    """AudioSet's 521 class names in the text space, for phrases outside the ontology: one close enough to a name
    (``min_similarity``) is judged by the tagger's retained output for that class, calibrated on validation
    (``a · max over patches of its logit + b``) and thresholded as the ontology's classes are."""

    names: list[str]
    embeddings: np.ndarray  # [521, 384], unit norm
    min_similarity: float
    calibration: Calibration  # of the max-over-patches logit (its thresholds are unused: the verifier's own judge)
    margin: float = 0.15  # over a phrase's ontology class: the trained classes win unless an AudioSet name is clearly closer

    def nearest(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per phrase vector: the index of the closest AudioSet name, and its cosine similarity."""
        sims = np.asarray(vectors, dtype=np.float32) @ self.embeddings.T
        idx = sims.argmax(1)
        return idx, sims[np.arange(len(idx)), idx]


@dataclass
class Verifier:
    """Base: ontology matching plus calibration; subclasses provide :meth:`raw_scores`."""

    name: str
    index: OntologyIndex
    calibration: Calibration
    encoder: TextEncoder = field(default_factory=shared_encoder)
    sample_rate: int = SAMPLE_RATE
    class_offsets: np.ndarray | None = None  # per-class score offsets (training-prior correction), added before calibration

    def raw_scores(self, samples: np.ndarray, texts: np.ndarray) -> np.ndarray:
        """Uncalibrated scores of one clip against ``[N, D]`` text embeddings (subclass-specific space).

        Here and in every method below that takes ``samples``, a clip is its samples or, for a verifier
        with a :attr:`tower`, its :class:`models.verifier.scorer.TowerLayers`."""
        raise NotImplementedError

    def class_texts(self) -> np.ndarray:
        raise NotImplementedError

    def match(self, texts: list[str]) -> list[Match]:
        return self.index.match(texts, self.encoder)

    def class_probabilities(self, samples: np.ndarray) -> dict[str, float]:
        """Calibrated probability of every ontology class for one clip (one audio forward)."""
        raw = self.raw_scores(samples, self.class_texts())
        if self.class_offsets is not None:
            raw = raw + self.class_offsets
        p = self.calibration.prob(raw)
        return {c: float(v) for c, v in zip(self.index.classes, p)}

    def verify(self, samples: np.ndarray, texts: list[str], probs: dict[str, float] | None = None) -> list[EventScore]:
        """Per phrase: its ontology class (and nearest), presence probability and judgement.

        A phrase that matches no class (or one that an AudioSet name matches clearly better: "music", which the
        ontology would call Singing) lands, with a verifier that has one, on the closest class of the tagger's
        AudioSet vocabulary (:class:`OpenVocabulary`), and is judged by that output. Otherwise it is scored as
        its own text (the scorer's text space is the encoder's) and that probability reported as evidence, but
        never judged: the scorer and its thresholds were fitted on the classes only, so it stays uncertain
        (``reason``).
        """
        matches = self.match(texts)
        probs = probs if probs is not None else self.class_probabilities(samples)
        inexact = [i for i, m in enumerate(matches) if m.similarity < 1.0]  # a class's own phrase stays with its class
        known = [matches[i].similarity if matches[i].event is not None else None for i in inexact]
        opened = {inexact[j]: v for j, v in self.open_vocabulary_scores(samples, [texts[i] for i in inexact], known).items()}
        rest = [i for i, m in enumerate(matches) if m.event is None and i not in opened]
        free = dict(zip(rest, self.free_text_probabilities(samples, [texts[i] for i in rest]))) if rest else {}
        cal = self.calibration
        out = []
        for i, m in enumerate(matches):
            if i in opened:
                name, sim, p = opened[i]
                out.append(EventScore(m.text, name, sim, p, cal.reading(p), name, None, "audioset"))
                continue
            p = probs[m.event] if m.event is not None else free[i]
            out.append(EventScore(m.text, m.event, m.similarity, p, cal.reading(p, m.reason), m.nearest, m.reason,
                                  "ontology" if m.event is not None else None))
        return out

    def open_vocabulary_scores(self, samples, texts: list[str], known: list[float | None]) -> dict[int, tuple[str, float, float]]:
        """Phrases that land on an AudioSet class (a verifier with :class:`OpenVocabulary`): their position →
        (class, similarity, calibrated probability). ``known``: each phrase's similarity to its ontology class (None:
        it matched none); the AudioSet class must beat it by :attr:`OpenVocabulary.margin`. Others are not in the result."""
        return {}

    def free_text_probabilities(self, samples: np.ndarray, texts: list[str]) -> list[float]:
        return [float(v) for v in self.calibration.prob(self.raw_scores(samples, self.encode_texts(texts)))]

    def timelines(self, samples: np.ndarray) -> list[Timeline]:
        """Every class's calibrated probability over the clip's time (:mod:`models.verifier.events`), ontology first, then
        the tagger's AudioSet vocabulary where the verifier has one. Here, for a verifier without frames (CLAP): one
        frame, the whole clip."""
        p = np.array(list(self.class_probabilities(samples).values()))
        return [Timeline("ontology", self.index.classes, np.zeros(1), np.array([len(samples) / self.sample_rate]), p[:, None], p,
                         self.calibration.present_above, self.class_phrases())]

    def class_phrases(self) -> list[str]:
        """Each class's first phrase (its plainest words: "bird", "crickets chirping"), for sentences about it."""
        first: dict[str, str] = {}
        for cls, phrase in self.index.phrases:
            first.setdefault(cls, phrase)
        return [first.get(c, c) for c in self.index.classes]

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        return self.encoder.encode(texts)

    @property
    def tower(self) -> str | None:
        """The signature of the frozen pretrained encoder it reads (``models.loading.tower_signature``), when it
        can score a clip from that encoder's layers (:class:`models.verifier.scorer.TowerLayers`) instead of its samples."""
        return None

    @property
    def hears_clip(self) -> bool:
        """Whether a clip given as its :attr:`tower`'s layers must also carry its samples (a member hears it itself)."""
        return False

    def prepare(self, samples: np.ndarray) -> None:
        """Hear what can be heard of a clip before its tower's layers exist (a fused verifier's clip-only members),
        so that the call with the layers costs only the rest. Nothing to do for a single head."""

    def info(self) -> dict:
        return {"verifier": self.name, "classes": len(self.index.classes), "absent_below": self.calibration.absent_below,
                "present_above": self.calibration.present_above, "tower": self.tower, "hears_clip": self.hears_clip}


class EmbeddedVerifier(Verifier):
    def __init__(self, name: str, scorer, index: OntologyIndex, calibration: Calibration, encoder: TextEncoder | None = None):
        super().__init__(name=name, index=index, calibration=calibration, encoder=encoder or shared_encoder())
        self.scorer = scorer.eval()
        self._class_texts = index.class_embeddings()

    def class_texts(self) -> np.ndarray:
        return self._class_texts

    @property
    def tower(self) -> str | None:
        return getattr(self.scorer.cfg, "tower", None)  # a head on a frozen Whisper; None for the log-mel CNN

    def raw_scores(self, samples: np.ndarray, texts: np.ndarray) -> np.ndarray:
        return self.scorer.score_clip(samples, texts)

    open_vocabulary: OpenVocabulary | None = None

    def timelines(self, samples: np.ndarray) -> list[Timeline]:
        """The scorer's frame logits calibrated as its clip logits are (offsets included): one forward for both."""
        fs = self.scorer.score_frames(samples, self._class_texts)
        offsets = np.zeros(len(self.index.classes)) if self.class_offsets is None else self.class_offsets
        out = [Timeline("ontology", self.index.classes, fs.starts, fs.ends, self.calibration.prob(fs.logits + offsets[:, None]),
                        self.calibration.prob(fs.clip + offsets), self.calibration.present_above, self.class_phrases())]
        if self.open_vocabulary is not None and fs.audioset is not None:
            own = self.audioset_own()
            probs = self.open_vocabulary.calibration.prob(fs.audioset[own])
            names = [self.open_vocabulary.names[i] for i in own]
            out.append(Timeline("audioset", names, fs.starts, fs.ends, probs, probs.max(1) if probs.size else np.zeros(len(own)),
                                float(self.open_vocabulary.calibration.prob(0.0)), [n.split(",")[0].strip().lower() for n in names]))
        return out

    def audioset_own(self) -> list[int]:
        """The AudioSet classes outside the ontology: those :meth:`verify` would judge by the tagger's output rather than
        an ontology class (the same margin), less "Silence", which is no sound. Matched once, then kept."""
        if self._audioset_own is None:
            vocab = self.open_vocabulary
            matches = self.match(vocab.names)
            self._audioset_own = [i for i, m in enumerate(matches)
                                  if vocab.names[i] != "Silence" and (m.event is None or (m.similarity < 1.0 and m.similarity + vocab.margin <= 1.0))]
        return self._audioset_own

    _audioset_own: list[int] | None = None

    def open_vocabulary_scores(self, samples, texts: list[str], known: list[float | None]) -> dict[int, tuple[str, float, float]]:
        vocab = self.open_vocabulary
        if vocab is None or not texts:
            return {}
        idx, sims = vocab.nearest(self.encoder.encode([normalise_phrase(t) for t in texts]))
        close = [j for j in range(len(texts)) if sims[j] >= vocab.min_similarity and (known[j] is None or sims[j] >= known[j] + vocab.margin)]
        if not close:
            return {}
        logits = self.scorer.audioset_logits(samples)
        return {j: (vocab.names[idx[j]], round(float(sims[j]), 4), float(vocab.calibration.prob(logits[idx[j]]))) for j in close}


class ClapVerifier(Verifier):
    """A transformers CLAP checkpoint: audio embedding · text embedding, calibrated.

    Class texts are "the sound of <phrase>" for each class's canonical phrase. Calibration and
    thresholds come from ``earwitness-calibration.json`` in the checkpoint directory when it is
    there (fitted on labelled validation audio), else from the defaults passed in.
    """

    def __init__(self, name: str, model, processor, index: OntologyIndex, calibration: Calibration,
                 encoder: TextEncoder | None = None, device: str = "cpu"):
        super().__init__(name=name, index=index, calibration=calibration, encoder=encoder or shared_encoder())
        self.model, self.processor, self.device = model.eval().to(device), processor, device
        self.model_rate = int(processor.feature_extractor.sampling_rate)
        first = {}
        for cls, phrase in index.phrases:
            first.setdefault(cls, phrase)
        self._class_texts = self.encode_texts([first[c] for c in index.classes])

    @classmethod
    def load(cls, source: str, index: OntologyIndex, calibration: Calibration | None = None, device: str = "cpu") -> ClapVerifier:
        from transformers import ClapModel, ClapProcessor

        local = Path(source).is_dir()
        model = ClapModel.from_pretrained(source, local_files_only=local)
        processor = ClapProcessor.from_pretrained(source, local_files_only=local)
        if local and (Path(source) / "earwitness-calibration.json").exists():
            calibration = Calibration(**json.loads((Path(source) / "earwitness-calibration.json").read_text()))
        return cls(Path(source).name if local else source, model, processor, index, calibration or Calibration(a=10.0, b=-2.0), device=device)

    def class_texts(self) -> np.ndarray:
        return self._class_texts

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        batch = self.processor.tokenizer([f"the sound of {t}" for t in texts], padding=True, split_special_tokens=True, return_tensors="pt").to(self.device)
        emb = self.model.get_text_features(**batch)
        emb = getattr(emb, "pooler_output", emb)
        return torch.nn.functional.normalize(emb, dim=-1).cpu().numpy()

    @torch.inference_mode()
    def raw_scores(self, samples: np.ndarray, texts: np.ndarray) -> np.ndarray:
        audio = np.asarray(samples, dtype=np.float32)
        if self.model_rate != self.sample_rate:
            import soxr

            audio = soxr.resample(audio, self.sample_rate, self.model_rate).astype(np.float32)
        fused = bool(getattr(self.model.config.audio_config, "enable_fusion", False))
        feats = self.processor.feature_extractor(
            audio, sampling_rate=self.model_rate, return_tensors="pt", truncation="fusion" if fused else "rand_trunc"
        ).to(self.device)
        emb = self.model.get_audio_features(**{k: v for k, v in feats.items() if k in ("input_features", "is_longer")})
        emb = getattr(emb, "pooler_output", emb)
        emb = torch.nn.functional.normalize(emb, dim=-1)[0].cpu().numpy()
        return np.asarray(texts, dtype=np.float32) @ emb  # cosine; the calibration carries CLAP's scale


class FusedVerifier(Verifier):
    """Embedded verifiers heard together: their calibrated logits, weighted (weights chosen on validation), then
    calibrated again. A member on a served model's frozen tower (the Whisper head) can read that model's layers; the
    others (the AudioSet tagger) hear the clip, which comes with the layers (:class:`~models.verifier.scorer.TowerLayers`)."""

    @property
    def tower(self) -> str | None:
        return next((m.tower for m in self.members if m.tower is not None), None)

    @property
    def hears_clip(self) -> bool:
        return self.tower is not None and any(m.tower is None for m in self.members)

    def __init__(self, name: str, members: list[EmbeddedVerifier], weights: list[float], calibration: Calibration):
        super().__init__(name=name, index=members[0].index, calibration=calibration, encoder=members[0].encoder)
        self.members, self.weights = members, [float(w) for w in weights]
        self.heard = LruCache(64)  # (clip length, SHA-256 of its samples, member) → that member's probabilities (prepare)
        self._hearing: dict[tuple, Future] = {}  # the same, while prepare() computes them
        self._lock = threading.Lock()

    def prepare(self, samples: np.ndarray) -> None:
        """The members that hear the clip itself hear it now, beside generation (the guard's shared path sends the
        clip first, the model's layers after the answer); their probabilities wait, keyed by the clip's samples. A
        call with the layers that comes while they are computed waits for them rather than hearing the clip twice."""
        clip = np.ascontiguousarray(samples, dtype=np.float32)
        for i, m in enumerate(self.members):
            key = self._key(clip, i)
            with self._lock:
                if m.tower is not None or key in self._hearing or self.heard.get(key) is not None:
                    continue
                self._hearing[key] = pending = Future()
            try:
                probs = m.class_probabilities(clip)
                self.heard.put(key, probs)
                pending.set_result(probs)
            except BaseException as exc:
                pending.set_exception(exc)
                raise
            finally:
                with self._lock:
                    self._hearing.pop(key, None)

    @staticmethod
    def _key(clip: np.ndarray, member: int) -> tuple:
        return clip.size, hashlib.sha256(memoryview(clip)).digest(), member

    def _member_probabilities(self, i: int, samples) -> dict[str, float]:
        """A member's probabilities. On the shared path (a tower's layers with the clip), a clip-only member's come
        from what :meth:`prepare` heard of this very clip, else are heard now; a plain clip is just heard."""
        m = self.members[i]
        if m.tower is None and isinstance(samples, TowerLayers) and samples.samples is not None:
            clip = np.ascontiguousarray(samples.samples, dtype=np.float32)
            key = self._key(clip, i)
            with self._lock:
                kept, pending = self.heard.get(key), self._hearing.get(key)
            if kept is not None:
                return kept
            if pending is not None:
                try:
                    return pending.result()
                except Exception:  # noqa: BLE001 - prepare failed: hear it here
                    pass
            probs = m.class_probabilities(clip)
            self.heard.put(key, probs)  # a prepare() that starts late finds it
            return probs
        return m.class_probabilities(samples)

    def fused(self, parts: list[np.ndarray]) -> np.ndarray:
        """The members' probabilities (one array each) as one calibrated probability."""
        return self.calibration.prob(fuse_logits(self.weights, parts))

    def class_probabilities(self, samples: np.ndarray) -> dict[str, float]:
        parts = [self._member_probabilities(i, samples) for i in range(len(self.members))]  # one forward each, at most
        fused = self.fused([np.array([p[c] for c in self.index.classes]) for p in parts])
        return {c: float(v) for c, v in zip(self.index.classes, fused)}

    def free_text_probabilities(self, samples: np.ndarray, texts: list[str]) -> list[float]:
        return [float(v) for v in self.fused([np.array(m.free_text_probabilities(samples, texts)) for m in self.members])]

    def timelines(self, samples: np.ndarray) -> list[Timeline]:
        """The members' ontology timelines on the finest member's frames (each class's probability interpolated at
        those frames' centres), fused per frame as per clip; then the tagger's AudioSet timeline as it is."""
        parts = [m.timelines(samples) for m in self.members]
        onto = [p[0] for p in parts]
        grid = max(onto, key=lambda t: len(t.starts))
        centres = (grid.starts + grid.ends) / 2
        resampled = [np.stack([np.interp(centres, (t.starts + t.ends) / 2, row) for row in t.probs]) for t in onto]
        fused = Timeline("ontology", self.index.classes, grid.starts, grid.ends, self.fused(resampled), self.fused([t.clip for t in onto]),
                         self.calibration.present_above, grid.phrases)
        return [fused, *(t for p in parts for t in p[1:])]

    def open_vocabulary_scores(self, samples, texts: list[str], known: list[float | None]) -> dict[int, tuple[str, float, float]]:
        """The member with an AudioSet vocabulary (the tagger) judges phrases outside the ontology alone."""
        member = next((m for m in self.members if m.open_vocabulary is not None), None)
        return member.open_vocabulary_scores(samples, texts, known) if member is not None else {}
