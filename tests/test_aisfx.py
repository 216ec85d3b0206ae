"""aiSFX from the pinned ``aisfx`` wheel: every tensor of its checkpoint has its place in the torch module, and the
module's embeddings equal the wheel's own code's.

The reference (``tests/fixtures/aisfx_reference.json``) is the wheel's code run in a separate environment
(librosa 0.9.2, numpy 1.24, torch 2.13): its ``spectrogram_librosa`` front end, transposed to ``[frames, mels]``
(its blocking reads that layout), ``spectrogram_normalize`` and ``model_get_embedding`` (hop 0.5, partial block
dropped) on the clips of ``tests/aisfx_clips.py``. Measured difference: 1.1e-5 at most (embedding values up to 7).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.pretrained.wheels import WheelError
from tests.aisfx_clips import RECORDING, recording, synthetic_clip

REFERENCE = json.loads((Path(__file__).parent / "fixtures" / "aisfx_reference.json").read_text())
TOLERANCE = 1e-4  # absolute, and relative to the value: float32 on both sides, different FFTs


@pytest.fixture(scope="module")
def net():
    from models.pretrained.aisfx import load_aisfx

    try:
        return load_aisfx()
    except WheelError as e:
        pytest.skip(f"the aisfx wheel is unavailable: {e}")


def embed(net, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from models.pretrained.aisfx import LogMel, cut_blocks

    with torch.inference_mode():
        spec = LogMel()(torch.from_numpy(samples)[None])[0]
        return spec.numpy(), net.embed(cut_blocks(spec)).numpy()


def test_every_tensor_of_the_checkpoint_has_its_place(net):
    from models.pretrained.aisfx import SfxNet, flush_subnormals, read_checkpoint
    from models.pretrained.parts import part_file

    state, heads = read_checkpoint(part_file("aisfx", "checkpoint.pth"))
    assert len(state) == 4 * 12 + 9 * 6 and len(heads) == 9 and heads["prosfx"] == 78 and sum(heads.values()) == 378
    fresh = SfxNet(heads)
    assert set(fresh.state_dict()) == set(state)
    fresh.load_state_dict(state, strict=True)
    flushed = flush_subnormals(state)
    for key, tensor in net.state_dict().items():
        assert torch.equal(tensor, flushed[key]), key
        if tensor.is_floating_point():  # only values below float32's smallest normal were zeroed
            assert (tensor - state[key]).abs().max() < torch.finfo(torch.float32).tiny, key
    assert sum(p.numel() for p in net.parameters()) == 6_212_922


def test_the_mel_filters_are_unit_sum_htk_triangles():
    from transformers.audio_utils import mel_filter_bank

    from models.pretrained.aisfx import mel_filters

    fb = mel_filters()
    assert fb.shape == (1025, 96)
    assert np.allclose(fb.sum(0), 1.0, atol=1e-6)
    other = mel_filter_bank(1025, 96, 0.0, 22_050.0, 44_100, norm=None, mel_scale="htk")  # an independent build
    assert np.allclose(fb, other / other.sum(0, keepdims=True), atol=1e-6)


@pytest.mark.parametrize("clip", ["synthetic", "recording"])
def test_the_embedding_equals_the_wheels_code(net, clip):
    if clip == "synthetic":
        samples = synthetic_clip()
    else:
        from models.cache import cache_dir

        unpacked = cache_dir() / "unpacked"
        if not (unpacked / RECORDING[0] / RECORDING[1]).exists():
            pytest.skip(f"{RECORDING[0]} is not unpacked (earwitness data fetch)")
        samples = recording(unpacked)
    ref = REFERENCE["clips"][clip]
    spec, emb = embed(net, samples)
    assert spec.shape[0] == ref["frames"]
    np.testing.assert_allclose(spec.mean(0), ref["spec_band_mean"], atol=1e-5)
    np.testing.assert_allclose(spec.mean(1), ref["spec_frame_mean"], atol=1e-5)
    np.testing.assert_allclose(emb, np.array(ref["embedding"]), atol=TOLERANCE, rtol=TOLERANCE)


def test_the_provenance_names_both_licences_and_the_paper():
    from models.pretrained.provenance import provenance, provenance_markdown
    from models.pretrained.wheels import WHEELS

    info = provenance("aisfx")
    assert info["licence"] == "CC BY 4.0" and info["wheels"][0]["licence"] == "MIT (metadata) / CC BY 4.0 (LICENSE file)"
    assert "2208.09096" in info["original_model"] and "ISMIR 2022" in info["original_model"]
    assert info["wheels"][0]["sha256"] == "bfe219950715af179e9a1653e7117cc1852baef267cd6596c42cad74afe1d194"
    assert WHEELS["aisfx"].filename == "aisfx-0.1.2-py2.py3-none-any.whl"
    assert "aisfx==0.1.2" in provenance_markdown(["aisfx"])


def test_bfloat16_channels_last_steps_stay_with_float32(net):
    """The served member runs the convolutions in bfloat16 (channels-last): its steps stay within cosine 0.999 of float32's."""
    from models.pretrained.aisfx import LogMel
    from models.verifier.scorer import AisfxFrontend

    frontend = AisfxFrontend()
    wave = torch.from_numpy(synthetic_clip())[None]
    with torch.inference_mode():
        exact = net.steps(LogMel()(wave))
        fast = frontend.features(wave, sample_rate=44_100)[..., :512]
    assert fast.shape == exact.shape == (1, 27, 512)
    cos = torch.nn.functional.cosine_similarity(fast, exact, dim=-1)
    assert float(cos.min()) > 0.999


def test_a_clip_shorter_than_one_step_is_padded_to_one():
    from models.verifier.scorer import scorer_from_config

    scorer = scorer_from_config({"kind": "aisfx"}).eval()
    try:
        feats, valid = scorer.frontend(np.full(100, 0.01, np.float32))
    except WheelError as e:
        pytest.skip(f"the aisfx wheel is unavailable: {e}")
    assert feats.shape == (1, 1, 890) and valid.all() and torch.isfinite(feats).all()


@pytest.mark.slow  # trains a head (on the small corpus' aiSFX feature cache)
def test_a_head_on_it_ships_only_itself_with_attribution_and_serves_the_scores_it_was_calibrated_on(corpus, tmp_path):
    """Trained from the feature cache, served from audio: the same frames, so the same logits; the card names the
    paper, both licences and the pinned wheel."""
    import soundfile as sf
    from safetensors.torch import load_file

    from models.verifier.checkpoint import load_verifier
    from train.features import aisfx_features
    from train.verifier import train_whisper_verifier

    try:
        card = train_whisper_verifier(corpus, tmp_path, encoder="aisfx", views=0, epochs=2, progress=False)
    except WheelError as e:
        pytest.skip(f"the aisfx wheel is unavailable: {e}")
    state = load_file(str(tmp_path / "scorer.safetensors"))
    assert not any("conv" in k or "blocks." in k for k in state) and sum(v.numel() for v in state.values()) < 500_000
    assert json.loads((tmp_path / "verifier.json").read_text())["scorer"]["kind"] == "aisfx"
    assert 0.0 <= card["metrics"]["test_roc_auc"] <= 1.0
    readme = (tmp_path / "README.md").read_text()
    for needed in ("CC BY 4.0", "MIT", "arXiv:2208.09096", "Ma and", "aisfx==0.1.2", "--audio aisfx"):
        assert needed in readme, needed
    verifier = load_verifier(str(tmp_path))
    feats, rows = aisfx_features(corpus, "test", progress=False)
    sid, row = sorted(rows.items())[0]
    texts = verifier.class_texts()
    with torch.no_grad():
        from_cache = verifier.scorer(torch.from_numpy(np.asarray(feats[row : row + 1], dtype=np.float32)), torch.from_numpy(texts))[0].numpy()
    served = verifier.raw_scores(sf.read(corpus / "scenes" / "test" / f"{sid}.flac", dtype="float32")[0], texts)
    assert np.allclose(served, from_cache, atol=0.05)  # float16 cache against float32 serving
    assert np.corrcoef(served, from_cache)[0, 1] > 0.999
