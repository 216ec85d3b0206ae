"""The verifier's training pieces that need no corpus: the low-pass augmentation and the model card."""

from __future__ import annotations

import json

import numpy as np
import torch

from models.verifier.scorer import ScorerConfig
from models.verifier.card import model_card
from models.verifier.checkpoint import EMBEDDED_VERIFIER_DIR
from train.verifier import LOWPASS_HZ, lowpass_log_gains, recording_augment


def test_lowpass_gains_keep_the_band_below_the_cutoff_and_remove_the_one_above():
    cfg = ScorerConfig()
    for hz in LOWPASS_HZ:
        gains = lowpass_log_gains(cfg, hz).numpy()
        kept = gains > -1e-3
        assert kept[0] and not kept[-1]
        assert np.all(np.diff(gains) <= 1e-6), "a low-pass removes more the higher the bin"
        assert gains.shape == (cfg.n_mels,) and (gains < -20).any()  # bins wholly above: nothing left
    four, five = (int((lowpass_log_gains(cfg, hz) > -1e-3).sum()) for hz in LOWPASS_HZ)
    assert four < five < cfg.n_mels  # 4 kHz keeps fewer bins than 5.5 kHz, both fewer than all


def test_recording_augment_low_pass_floors_the_high_bins_of_mean_and_max():
    cfg = ScorerConfig()
    n, floor = cfg.n_mels, -13.8
    x = torch.zeros(64, 2 * n, 20)
    yf = torch.ones(64, 3, 20)
    gains = [lowpass_log_gains(cfg, 4000.0)]
    out, _ = recording_augment(x.clone(), yf, np.random.default_rng(0), n, floor, gains)
    top = out[:, n - 4 : n].amax(dim=(1, 2)), out[:, 2 * n - 4 :].amax(dim=(1, 2))
    cut = (top[0] <= floor + 1e-4) & (top[1] <= floor + 1e-4)
    assert 5 <= int(cut.sum()) <= 40  # about 30% of the clips, mean and max channels alike
    plain, _ = recording_augment(x.clone(), yf, np.random.default_rng(0), n, floor, None)
    assert int(((plain[:, n - 4 : n].amax(dim=(1, 2))) <= floor + 1e-4).sum()) < int(cut.sum())


def test_model_card_reproduces_the_run_it_describes():
    doc = json.loads((EMBEDDED_VERIFIER_DIR / "verifier.json").read_text())
    doc["training"] = {**doc.get("training", {}), "epochs_run": 7, "lr": 0.01, "seed": 3, "views": 2}
    card = model_card(doc)
    sc = doc["scorer"]
    assert sc["kind"] == "whisper"  # the shipped verifier is a head on a frozen pretrained encoder
    assert f"--audio {sc['encoder']} --views 2 --width {sc['width']} --epochs 7 --lr 0.01 --seed 3" in card
    assert "## Pretrained part" in card and "sha256" in card  # provenance and licence of the fetched encoder


def test_model_card_of_a_log_mel_verifier_names_its_augmentation():
    doc = json.loads((EMBEDDED_VERIFIER_DIR / "verifier.json").read_text())
    doc["scorer"] = ScorerConfig().to_dict()
    doc["training"] = {"epochs_run": 7, "lr": 0.01, "seed": 3, "lowpass": False}
    card = model_card(doc)
    assert "--epochs 7 --lr 0.01 --seed 3 --no-lowpass" in card
    assert "low-pass" not in card.split("## Measured")[0] and "## Pretrained part" not in card
    doc["training"]["lowpass"] = True
    assert "--no-lowpass" not in model_card(doc) and "low-pass at the bandwidth" in model_card(doc)
