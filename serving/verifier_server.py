"""The verifier deployment: the absent-sound verifier and its text encoder, scaled apart from the model.

It owns the verifier (embedded or CLAP, :func:`models.verifier.checkpoint.load_verifier`) and the
text encoder that matches mentions to ontology classes. The ingress calls it concurrently with
the model, so on a guarded request its audio forward overlaps generation.

One forward scores every class of the ontology, whatever the question, so a replica keeps the
result per clip (``verifier_cache_size``, keyed by the samples' SHA-256): the next question about
the same recording, or a retry, is verified without an audio pass, as vLLM's own caches spare the
engine a clip it has seen.

When the served model's audio tower is this verifier's frozen encoder (the same signature in both
``info()``: ``guard_share_encoder``), the ingress sends the layers the model computed instead of the
clip (:meth:`VerifierServer.assess_layers`): no encoder pass here at all, and nothing to keep, since
scoring given layers costs only the head.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging

from dataclasses import replace

import numpy as np
import torch
from ray import serve

from models.lru import LruCache
from models.verifier.checkpoint import load_verifier
from models.verifier.events import EventReport, detect
from models.verifier.scorer import TowerLayers
from serving.config import Settings
from serving.heap import freeze_startup_heap

log = logging.getLogger("earwitness.verifier")


@serve.deployment(name="VerifierServer")
class VerifierServer:
    def __init__(self, settings: dict):
        self.settings = Settings(**settings)
        log.setLevel(self.settings.verifier_log_level)
        if self.settings.verifier_log_level == "DEBUG" and not log.handlers:  # the replica's log file gets them
            log.addHandler(logging.StreamHandler())
        if self.settings.topology == "split":  # fused: the process's threads are the model's to set
            torch.set_num_threads(max(1, int(self.settings.verifier_cpus)))  # a fractional share gets one thread
        self.verifier = load_verifier(self.settings.verifier)
        self.kept = LruCache(self.settings.verifier_cache_size)
        # warm up: the audio path and the text encoder
        self.verifier.verify(np.zeros(self.verifier.sample_rate, dtype=np.float32), ["a dog barking"])
        self.verifier.timelines(np.zeros(self.verifier.sample_rate, dtype=np.float32))  # and the events' (AudioSet names matched once)
        freeze_startup_heap()
        log.info("verifier %s ready", self.verifier.name)

    def info(self) -> dict:
        return self.verifier.info()

    async def assess(self, samples: np.ndarray, texts: list[str]) -> dict:
        """Every class's probability for the clip (``kept``: without a forward), plus ``texts`` matched to classes (one call)."""
        return await asyncio.to_thread(self._assess, samples, texts)

    def class_probabilities(self, samples: np.ndarray) -> tuple[dict[str, float], bool]:
        """Every class's calibrated probability for the clip, and whether it was kept from the last time
        the clip was heard (else: one forward).

        A kept value is keyed by the clip's length and the SHA-256 of exactly the float32 samples it was
        computed from; the weights never change in a replica, so the key holds everything else it depends on.
        """
        clip = np.ascontiguousarray(samples, dtype=np.float32)
        need_key = self.kept.size > 0 or log.isEnabledFor(logging.DEBUG)
        key = (clip.size, hashlib.sha256(memoryview(clip)).digest()) if need_key else None
        probs = self.kept.get(key) if self.kept.size > 0 else None
        kept = probs is not None
        if not kept:
            probs = self.verifier.class_probabilities(clip)
            if self.kept.size > 0:
                self.kept.put(key, probs)
        if key is not None:
            log.debug("verifier: clip %s (%d samples) %s", key[1][:6].hex(), clip.size, "kept" if kept else "scored")
        return dict(probs), kept  # a copy: the kept one stays as computed, whatever a caller does with it

    async def events(self, samples: np.ndarray) -> EventReport:
        """``POST /v1/audio/events``: every class detected over the clip, with its spans (:mod:`models.verifier.events`)."""
        return await asyncio.to_thread(self._events, samples)

    def _events(self, samples: np.ndarray) -> EventReport:
        """One forward gives the timelines and the clip's class probabilities, so both are kept: a question about the
        clip after its events (or the events again) costs no audio pass."""
        clip = np.ascontiguousarray(samples, dtype=np.float32)
        key = (clip.size, hashlib.sha256(memoryview(clip)).digest()) if self.kept.size > 0 else None
        report = self.kept.get((*key, "events")) if key is not None else None
        if report is not None:
            return replace(report, kept=True)
        s, duration = self.settings, clip.size / self.verifier.sample_rate
        timelines = self.verifier.timelines(clip)
        chosen = {"ontology": s.events_threshold, "audioset": s.events_audioset_threshold}
        thresholds = {t.vocabulary: t.threshold if chosen.get(t.vocabulary) is None else chosen[t.vocabulary] for t in timelines}
        found = [d for t in timelines for d in detect(t, s.events_min_gap_s, duration, thresholds[t.vocabulary])]
        report = EventReport(self.verifier.name, sorted(found, key=lambda d: -d.probability), thresholds, duration)
        if key is not None:
            self.kept.put((*key, "events"), report)
            self.kept.put(key, dict(zip(timelines[0].names, timelines[0].clip.tolist())))
        return report

    def _assess(self, samples: np.ndarray, texts: list[str]) -> dict:
        return self._result(samples, texts, *self.class_probabilities(samples))

    async def prepare(self, samples: np.ndarray) -> None:
        """Hear the clip-only part of a verifier that also reads a tower's layers (``hears_clip``), beside generation;
        :meth:`assess_layers` then finds it done."""
        try:
            await asyncio.to_thread(self.verifier.prepare, samples)
        except Exception as exc:  # noqa: BLE001 - an optimisation: assess_layers hears the clip itself if this failed
            log.warning("prepare failed (%s): the clip is heard with its layers", type(exc).__name__)

    async def assess_layers(self, layers: np.ndarray, n_samples: int, texts: list[str], samples: np.ndarray | None = None) -> dict:
        """:meth:`assess` of a clip given as its encoder layers (``Generation.tower_layers`` of a model whose tower
        has this verifier's signature) and its length in samples: the head only, never kept (``shared``)."""
        return await asyncio.to_thread(self._assess_layers, layers, n_samples, texts, samples)

    def _assess_layers(self, layers: np.ndarray, n_samples: int, texts: list[str], samples: np.ndarray | None = None) -> dict:
        if self.verifier.tower is None:
            raise ValueError(f"verifier {self.verifier.name} reads no encoder's layers")
        clip = TowerLayers(np.asarray(layers, dtype=np.float32), int(n_samples), samples)
        return {**self._result(clip, texts, self.verifier.class_probabilities(clip), False), "shared": True}

    def _result(self, clip, texts: list[str], probs: dict[str, float], kept: bool) -> dict:
        events = [e.to_dict() for e in self.verifier.verify(clip, texts, probs)] if texts else []
        return {"probabilities": probs, "kept": kept, "events": events, **self._thresholds()}

    async def match(self, texts: list[str]) -> list[dict]:
        return await asyncio.to_thread(self._match, texts)

    def _match(self, texts: list[str]) -> list[dict]:
        return [{"text": m.text, "event": m.event, "nearest": m.nearest, "similarity": m.similarity, "reason": m.reason}
                for m in self.verifier.match(texts)] if texts else []

    async def verify(self, samples: np.ndarray, texts: list[str]) -> dict:
        """``POST /v1/audio/verify``: per phrase, class, calibrated probability, present."""
        return await asyncio.to_thread(self._verify, samples, texts)

    def _verify(self, samples: np.ndarray, texts: list[str]) -> dict:
        probs, kept = self.class_probabilities(samples)
        scores = self.verifier.verify(samples, texts, probs)
        return {"verifier": self.verifier.name, "events": [s.to_dict() for s in scores], "kept": kept, **self._thresholds()}

    def _thresholds(self) -> dict:
        c = self.verifier.calibration
        return {"absent_below": c.absent_below, "present_above": c.present_above}
