"""aiSFX, a sound-effects-library CNN (Ma & Lerch, ISMIR 2022, arXiv:2208.09096), from the ``aisfx`` wheel, as a torch module.

``aisfx==0.1.2`` ships ``checkpoint.pth``: the state dict of its best model ("X-Sequential-CE"), a 2-D CNN trained
across nine commercial sound-effects libraries labelled under the Universal Category System, not AudioSet. The
network (the DCASE cross-task baseline's 8-layer CNN): four blocks of two 3×3 convolutions (no bias) each followed by
batch norm and ReLU, 64 → 128 → 256 → 512 channels, 2×2 max pooling after the first three; the block's map is
averaged over frequency and its maximum over time is the 512-d embedding. Nine classifier heads (one per training
library, 512 → 256 → 128 → classes with ReLUs) read the embedding.

Front end (the wheel's ``librosa`` route, in torch so that it batches): 44.1 kHz audio scaled to a peak of 1;
2,048-point periodic-Hann STFT every 1,024 samples, centred with zero padding; power; 96 HTK mel bands 0–22,050 Hz,
each filter scaled to unit sum (librosa's ``norm=1``); ``log10(1 + 10⁴·mel)``; divided by 9.4578 (the paper's
min–max range). Blocks of 100 frames (2.32 s) every 50, the last partial one dropped.

The wheel's own ``librosa`` route hands the spectrogram to its blocking as ``[mels, frames]`` while the blocking
and the network read ``[frames, mels]`` (the Essentia route's layout); this module uses ``[frames, mels]``, as
the network was trained. The Essentia front end the paper used (EasyLoader's ReplayGain, Essentia's mel
weighting) is not rebuilt: the embeddings here are those of the wheel's librosa route.

Licence: the wheel's LICENSE file puts the model and paper under CC BY 4.0 (attribution: A.B. Ma and A. Lerch);
its metadata's classifier says MIT. Every card that uses the part records both (``models.pretrained.provenance``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from models.pretrained.parts import part_file
from models.pretrained.store import build_once

SAMPLE_RATE = 44_100
N_FFT, HOP = 2048, 1024
N_MELS, FMIN, FMAX = 96, 0.0, 22_050.0
SPEC_MAX = 9.457798957824707  # the paper's normalisation range (its spectrograms' maximum; minimum 0)
BLOCK, BLOCK_HOP = 100, 50  # frames: 2.32 s blocks every 1.16 s
FRAME_S = HOP / SAMPLE_RATE
STEP_FRAMES = 8  # the network's time stride (three 2×2 poolings)
STEP_S = STEP_FRAMES * FRAME_S  # 0.186 s
CHANNELS = (64, 128, 256, 512)
WEIGHTS, LAYOUT = "aisfx.safetensors", "aisfx.json"


class ConvBlock(nn.Module):
    """Two 3×3 convolutions, each batch-normed and rectified; then 2×2 max pooling (or none: the last block)."""

    def __init__(self, cin: int, cout: int, pool: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return F.max_pool2d(x, 2) if self.pool else x


def head(classes: int, dim: int = CHANNELS[-1]) -> nn.Sequential:
    """One library's classifier: ``dim → dim/2 → dim/4 → classes`` with ReLUs between."""
    return nn.Sequential(nn.Linear(dim, dim // 2), nn.ReLU(), nn.Linear(dim // 2, dim // 4), nn.ReLU(), nn.Linear(dim // 4, classes))


class SfxNet(nn.Module):
    """The aiSFX network: ``[N, frames, 96]`` normalised log-mel → 512-d embeddings, and each library head's logits."""

    def __init__(self, heads: dict[str, int]):
        super().__init__()
        cins = (1, *CHANNELS[:-1])
        self.blocks = nn.ModuleList(ConvBlock(i, o, pool=k < 3) for k, (i, o) in enumerate(zip(cins, CHANNELS)))
        self.head_names = list(heads)
        self.heads = nn.ModuleList(head(n) for n in heads.values())

    def steps(self, spec: torch.Tensor) -> torch.Tensor:
        """``[N, frames, 96]`` → ``[N, frames // 8, 512]``: the last map averaged over frequency, one step per 8 frames."""
        x = spec.unsqueeze(1)
        for block in self.blocks:
            x = block(x)
        return x.mean(dim=3).transpose(1, 2)

    def embed(self, blocks: torch.Tensor) -> torch.Tensor:
        """``[N, 100, 96]`` blocks → ``[N, 512]``: the maximum over the block's steps (the wheel's embedding)."""
        return self.steps(blocks).amax(dim=1)

    def logits(self, emb: torch.Tensor) -> torch.Tensor:
        """``[..., 512]`` → ``[..., classes of all heads]``: every library head's logits, concatenated in order."""
        return torch.cat([h(emb) for h in self.heads], dim=-1)


def mel_filters() -> np.ndarray:
    """``[1025, 96]`` HTK-mel triangles 0–22,050 Hz on the 2,048-point FFT's bins, each filter summing to 1.

    The same triangles as ``librosa.filters.mel(htk=True, norm=1)``: band edges equally spaced in
    ``2595·log10(1 + f/700)``, each triangle the minimum of its rising and falling ramp, clipped at 0.
    """
    fft_hz = np.linspace(0.0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
    lo, hi = (2595.0 * np.log10(1.0 + f / 700.0) for f in (FMIN, FMAX))
    edges = 700.0 * (10.0 ** (np.linspace(lo, hi, N_MELS + 2) / 2595.0) - 1.0)
    width = np.diff(edges)
    ramps = edges[:, None] - fft_hz[None, :]
    rising, falling = -ramps[:-2] / width[:-1, None], ramps[2:] / width[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    total = weights.sum(axis=1, keepdims=True)
    weights = weights / np.where(total > 0, total, 1.0)
    return weights.T.astype(np.float32)


class LogMel(nn.Module):
    """``[B, samples]`` at 44.1 kHz → ``[B, frames, 96]`` the network's input (peak-normalised, log-compressed, scaled)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("fb", torch.from_numpy(mel_filters()), persistent=False)
        self.register_buffer("window", torch.hann_window(N_FFT, periodic=True), persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        peak = wave.abs().amax(dim=-1, keepdim=True)
        wave = wave / torch.where(peak > 0, peak, torch.ones_like(peak))
        spec = torch.stft(wave, N_FFT, HOP, N_FFT, self.window, center=True, pad_mode="constant", return_complex=True)
        power = spec.real**2 + spec.imag**2  # [B, F, T]
        mel = torch.matmul(power.transpose(1, 2), self.fb)  # [B, T, mels]
        return torch.log10(mel * 1e4 + 1.0) / SPEC_MAX


def frame_count(n_samples: int) -> int:
    """How many frames :class:`LogMel` gives for ``n_samples`` (centred STFT)."""
    return n_samples // HOP + 1


def cut_blocks(spec: torch.Tensor) -> torch.Tensor:
    """``[frames, 96]`` → ``[blocks, 100, 96]`` as the wheel blocks (hop 50, a partial last block dropped unless it
    is the only one, which is zero-padded)."""
    frames = spec.shape[0]
    count = max(1, -(-(frames - BLOCK) // BLOCK_HOP) + 1 - int((frames - BLOCK) % BLOCK_HOP != 0))
    padded = F.pad(spec, (0, 0, 0, BLOCK))
    return torch.stack([padded[i * BLOCK_HOP : i * BLOCK_HOP + BLOCK] for i in range(count)])


# ---- conversion from the wheel's checkpoint ----------------------------------------------------------------------

_BLOCK_KEY = re.compile(r"^embedding_net\.conv_block(\d)\.")
_HEAD_KEY = re.compile(r"^fc\.(\d+)\.")


def rename(key: str) -> str:
    """A key of the wheel's ``CrossNet`` state dict → the same tensor's key in :class:`SfxNet`."""
    if m := _BLOCK_KEY.match(key):
        return f"blocks.{int(m.group(1)) - 1}." + key[m.end():]
    if m := _HEAD_KEY.match(key):
        return f"heads.{m.group(1)}." + key[m.end():]
    raise ValueError(f"unexpected tensor {key!r}: not the aiSFX checkpoint this reader knows")


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """``(SfxNet state dict, head name → classes in head order)`` from the wheel's pickled ``(state dict, datasets)``.

    Loaded with ``weights_only``: beyond tensors, the pickle may build only the numpy integers of its dataset table.
    """
    from numpy._core.multiarray import scalar  # pickled (numpy 1) as numpy.core.multiarray.scalar

    safe = [np.dtype, type(np.dtype(np.int64)), (scalar, "numpy.core.multiarray.scalar")]
    with torch.serialization.safe_globals(safe):
        state, datasets = torch.load(str(path), map_location="cpu", weights_only=True)
    order = sorted(datasets, key=lambda name: int(datasets[name][0]))
    return {rename(k): v for k, v in state.items()}, {name: int(datasets[name][1]) for name in order}


def _convert(out: Path) -> None:
    from safetensors.torch import save_file

    state, heads = read_checkpoint(part_file("aisfx", "checkpoint.pth"))
    SfxNet(heads).load_state_dict(state, strict=True)  # every tensor has its place, and every place a tensor
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / WEIGHTS))
    (out / LAYOUT).write_text(json.dumps({"heads": heads}, indent=1))
    (out / "LICENSE").write_bytes(part_file("aisfx", "LICENSE").read_bytes())


def aisfx_checkpoint() -> Path:
    """The converted network under ``<cache>/pretrained/aisfx/`` (fetched and converted on first use)."""
    return build_once("aisfx", _convert)


def flush_subnormals(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Float tensors with their subnormal values (below 1.2e-38 in magnitude) set to zero.

    The checkpoint holds about 30,000 of them (weight decay on its heads): x86 multiplies subnormals in microcode,
    which made the nine heads alone cost 30 ms per 10 s clip; flushed, 2 ms, and the outputs are unchanged."""
    tiny = torch.finfo(torch.float32).tiny
    return {k: (v.masked_fill(v.abs() < tiny, 0.0) if v.is_floating_point() else v) for k, v in state.items()}


def load_aisfx(directory: Path | None = None) -> SfxNet:
    """The aiSFX network in eval mode, every tensor of the checkpoint loaded (strict), subnormals flushed."""
    from safetensors.torch import load_file

    directory = Path(directory) if directory is not None else aisfx_checkpoint()
    net = SfxNet(json.loads((directory / LAYOUT).read_text())["heads"])
    net.load_state_dict(flush_subnormals(load_file(str(directory / WEIGHTS))), strict=True)
    return net.eval()
