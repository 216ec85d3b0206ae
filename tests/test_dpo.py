"""DPO stage on real tiny models: Qwen2-Audio (models.tiny) and a Qwen2.5-Omni thinker built from a config.

Everything is local: tokenizers are trained here, audio files are written here. The Omni processor is the
real ``Qwen2_5OmniProcessor`` with a Whisper feature extractor, but without a video processor: transformers'
video processors need torchvision, which this project does not install (``models.omni.AudioOmniProcessor``
leaves that one, unused, slot empty).
"""

from __future__ import annotations

import copy
import json
import math
import time

import numpy as np
import pytest
import soundfile as sf
import torch

from models.tiny import CHAT_TEMPLATE, TinySize, build_untrained, train_tokenizer
from train.dpo import completion_logps, make_trainer, train_dpo
from train.dpo_collator import AudioPreferenceCollator, load_audio_file
from models.families import family_of, language_model_lora_pattern, model_class_of_type
from train.lora import lora_config

SR = 16_000
QUESTION = "Is there a dog barking in the audio?"
YES, NO = "Yes, I can hear a dog barking.", "No, I cannot hear a dog barking."
TONE_Q, TONE_A = "Is there a tone in the audio?", "Yes, I can hear a tone."
TEXTS = [QUESTION, YES, NO, TONE_Q, TONE_A, "Did you hear rain? yes no"] * 10
TINY = TinySize(chunk_s=2, mel_bins=16, audio_dim=32, audio_layers=1, audio_heads=2, text_dim=32, text_layers=1, text_heads=2, text_kv_heads=1)
NOT_LANGUAGE = ("audio_tower", "visual", "multi_modal_projector", "lm_head", "embed_tokens")


# ------------------------------------------------------------------------------------------ builders


def build_qwen2_audio():
    return build_untrained(TEXTS, TINY, vocab_size=300, seed=0)


def build_omni_thinker():
    """A random Qwen2.5-Omni thinker (audio + vision + text towers) and its processor, from local parts."""
    from models.omni import AudioOmniProcessor
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2_5OmniThinkerConfig,
        Qwen2_5OmniThinkerForConditionalGeneration,
        Qwen2VLImageProcessorPil,
        WhisperFeatureExtractor,
    )

    torch.manual_seed(0)
    backend = train_tokenizer(TEXTS, 300).backend_tokenizer
    backend.add_special_tokens(["<|IMAGE|>", "<|VIDEO|>", "<|vision_bos|>", "<|vision_eos|>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        extra_special_tokens={
            "audio_token": "<|AUDIO|>", "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>",
            "image_token": "<|IMAGE|>", "video_token": "<|VIDEO|>",
            "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
        },
    )
    extractor = WhisperFeatureExtractor(feature_size=16, sampling_rate=SR, hop_length=320, chunk_length=2, n_fft=640)
    processor = AudioOmniProcessor(
        image_processor=Qwen2VLImageProcessorPil(), video_processor=None, feature_extractor=extractor,
        tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
    )
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5OmniThinkerConfig(
        audio_config=dict(num_mel_bins=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64, d_model=32,
                          n_window=25, output_dim=32, max_source_positions=50),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=[0], window_size=28),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        audio_token_index=tokenizer.audio_token_id, image_token_index=tokenizer.image_token_id,
        video_token_index=tokenizer.video_token_id, audio_start_token_id=ids("<|audio_bos|>"),
        audio_end_token_id=ids("<|audio_eos|>"), user_token_id=ids("<|im_start|>"),
    )
    # Real Omni configs carry this extra key; the rope-index code reads it even for audio-only prompts.
    config.vision_start_token_id = ids("<|vision_bos|>")
    return processor, Qwen2_5OmniThinkerForConditionalGeneration(config)


BUILDERS = {"qwen2-audio": build_qwen2_audio, "qwen2.5-omni-thinker": build_omni_thinker}


# ------------------------------------------------------------------------------------------ data


def _clips(directory):
    t = np.arange(int(1.5 * SR)) / SR
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    rng = np.random.default_rng(0)
    noise_44k = (0.1 * rng.standard_normal((44_100, 2))).astype(np.float32)  # 1 s stereo 44.1 kHz: resampled
    chirp_t = np.arange(int(0.8 * SR)) / SR
    chirp = (0.3 * np.sin(2 * np.pi * (300 + 900 * chirp_t) * chirp_t)).astype(np.float32)
    sf.write(directory / "tone.flac", tone, SR)
    sf.write(directory / "noise.wav", noise_44k, 44_100)
    sf.write(directory / "chirp.flac", chirp, SR)
    return {"tone": "tone.flac", "noise": "noise.wav", "chirp": "chirp.flac"}


def _rows(audio):
    """Three pairs; the last one is ACPO input-contrastive (same text both sides, rejected hears other audio)."""
    return [
        dict(prompt=QUESTION, chosen=NO, rejected=YES, audio=audio["tone"], rejected_audio=None, kind="listen_absent"),
        dict(prompt=QUESTION, chosen=NO, rejected=YES, audio=audio["chirp"], rejected_audio=None, kind="acpo_output_contrastive"),
        dict(prompt=TONE_Q, chosen=TONE_A, rejected=TONE_A, audio=audio["tone"], rejected_audio=audio["noise"], kind="acpo_input_contrastive"),
    ]


@pytest.fixture(scope="module", params=list(BUILDERS))
def trained(request, tmp_path_factory):
    """One short DPO run per family; Qwen2-Audio reads relative file paths, Omni gets in-memory arrays."""
    from datasets import Dataset

    family = request.param
    root = tmp_path_factory.mktemp(f"dpo-{family}")
    audio = _clips(root)
    processor, model = BUILDERS[family]()
    if family == "qwen2-audio":
        rows, audio_root = _rows(audio), root
    else:
        arrays = {k: load_audio_file(root / v) for k, v in audio.items()}
        rows, audio_root = _rows(arrays), None
    dataset = Dataset.from_list(rows)
    base = copy.deepcopy(model)
    started = time.time()
    adapter_dir = train_dpo(
        model, processor, dataset, root / "out", lora_r=4, lora_alpha=8, lora_dropout=0.0, beta=0.1,
        learning_rate=2e-2, batch_size=3, max_steps=2, logging_steps=1, audio_root=audio_root, seed=0,
    )
    collator = AudioPreferenceCollator(processor, audio_root=audio_root)
    return dict(family=family, model=model.eval(), base=base.eval(), processor=processor, rows=rows, collator=collator,
                adapter_dir=adapter_dir, out=root / "out", seconds=time.time() - started)


# ------------------------------------------------------------------------------------------ tests


def test_family_and_lora_scope_before_training():
    for family, build in BUILDERS.items():
        _, model = build()
        assert family_of(model).name == family
        pattern = language_model_lora_pattern(model)
        config = lora_config(model, r=2, alpha=4, dropout=0.0, modules_to_save=None)
        assert config.target_modules == pattern
        import re

        hits = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and re.fullmatch(pattern, n)]
        assert len(hits) == 7 * model.config.get_text_config().num_hidden_layers
        assert all(".language_model." in n for n in hits)
        # bare names would have hit the encoders: that is what the pattern avoids
        bare = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in
                ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj") and ".language_model." not in n]
        assert bare, "the towers have q_proj/…-named linears"


def test_training_logs_finite_loss_and_curve(trained):
    rows = [json.loads(line) for line in (trained["out"] / "dpo_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= set(row)
        assert all(math.isfinite(row[k]) for k in row)
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # LoRA B starts at 0: policy == reference
    assert (trained["out"] / "dpo_curve.png").stat().st_size > 1000
    note = json.loads((trained["adapter_dir"] / "earwitness_dpo.json").read_text())
    assert note["family"] == trained["family"] and note["global_step"] == 2
    assert trained["seconds"] < 60


def test_lora_trained_and_scoped_to_language_model(trained):
    model = trained["model"]
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b.values())
    lora_modules = [n for n, _ in model.named_modules() if n.endswith(".lora_A")]
    assert len(lora_modules) == 7 * model.config.get_text_config().num_hidden_layers
    assert all(n.startswith("model.language_model.layers.") for n in lora_modules)
    assert not any(part in n for n in lora_modules for part in NOT_LANGUAGE)
    assert not any("lora" in n for n, _ in model.named_parameters() if any(p in n for p in NOT_LANGUAGE[:3]))
    config = json.loads((trained["adapter_dir"] / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and "language_model" in config["target_modules"]


def test_exported_adapter_reloads_with_same_logits(trained):
    from peft import PeftModel

    batch = trained["collator"](trained["rows"][:2])
    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    fresh = copy.deepcopy(trained["base"])
    reloaded = PeftModel.from_pretrained(fresh, str(trained["adapter_dir"])).eval()
    with torch.no_grad():
        expected = trained["model"](**inputs).logits
        got = reloaded(**inputs).logits
        base = trained["base"](**inputs).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(base, expected, atol=1e-4), "training changed nothing"


def test_collator_gives_each_side_its_own_audio(trained):
    collator, rows = trained["collator"], trained["rows"]
    batch = collator(rows)
    n = len(rows)
    assert set(batch) >= {"input_ids", "attention_mask", "completion_mask", "input_features", "feature_attention_mask"}
    assert batch["input_ids"].shape[0] == batch["input_features"].shape[0] == batch["feature_attention_mask"].shape[0] == 2 * n
    tokenizer = trained["processor"].tokenizer
    for i, row in enumerate(rows):
        chosen, rejected = batch["input_features"][i], batch["input_features"][n + i]
        if row["rejected_audio"] is None:
            assert torch.equal(chosen, rejected)
        else:
            assert not torch.allclose(chosen, rejected)
        # every row holds exactly the audio tokens its own clip expands to, and its completion ends the turn
        for r in (i, n + i):
            frames = int(batch["feature_attention_mask"][r].sum())
            n_audio = int((batch["input_ids"][r] == tokenizer.convert_tokens_to_ids("<|AUDIO|>")).sum())
            assert n_audio == ((frames - 1) // 2 + 1 - 2) // 2 + 1
            completion = batch["input_ids"][r][batch["completion_mask"][r].bool()]
            assert tokenizer.decode(completion) == (row["chosen"] if r < n else row["rejected"]) + "<|im_end|>"


def test_collator_reads_every_audio_form(trained, tmp_path):
    """Paths (relative to audio_root), float arrays, and datasets.Audio cells (decoded, or raw bytes) agree."""
    collator = trained["collator"]
    wave = collator.audio(trained["rows"][0]["audio"])
    sf.write(tmp_path / "clip.flac", wave, SR)
    raw = {"bytes": (tmp_path / "clip.flac").read_bytes(), "path": None}
    decoded_44k = {"array": load_audio_file(tmp_path / "clip.flac", 44_100), "sampling_rate": 44_100}
    assert np.allclose(collator.audio(raw), wave, atol=1e-4)
    assert np.allclose(collator.audio(list(wave)), wave)
    resampled = collator.audio(decoded_44k)
    assert abs(len(resampled) - len(wave)) <= 2 and np.corrcoef(resampled[:len(wave) - 2], wave[:len(wave) - 2])[0, 1] > 0.99


def test_input_contrastive_sides_differ_only_by_audio(trained):
    row = trained["rows"][-1]
    assert row["chosen"] == row["rejected"] and row["rejected_audio"] is not None
    batch = trained["collator"]([row])
    # the noise clip is shorter, so the rejected prompt has fewer audio tokens; the answers are identical
    chosen_completion = batch["input_ids"][0][batch["completion_mask"][0].bool()]
    rejected_completion = batch["input_ids"][1][batch["completion_mask"][1].bool()]
    assert torch.equal(chosen_completion, rejected_completion)
    for model in (trained["base"], trained["model"]):
        chosen, rejected = completion_logps(model, batch)
        assert torch.isfinite(chosen).all() and torch.isfinite(rejected).all()
        assert abs(float(chosen[0] - rejected[0])) > 1e-4, "the rejected side's audio never reached the model"


def test_batching_does_not_change_log_probs(trained):
    """Rows are right-padded to the longest one; each row's log-probs must be what it gets alone."""
    collator, rows, model = trained["collator"], trained["rows"], trained["model"]
    batch_chosen, batch_rejected = completion_logps(model, collator(rows))
    for i, row in enumerate(rows):
        alone_chosen, alone_rejected = completion_logps(model, collator([row]))
        torch.testing.assert_close(batch_chosen[i], alone_chosen[0], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(batch_rejected[i], alone_rejected[0], rtol=1e-5, atol=1e-4)


def test_reference_is_the_adapter_disabled_policy(tmp_path):
    """TRL keeps no reference copy with PEFT: its reference log-probs are the base model's (also with a
    trained ``modules_to_save`` copy of lm_head, which PEFT bypasses when adapters are disabled)."""
    from datasets import Dataset

    audio = _clips(tmp_path)
    processor, model = build_qwen2_audio()
    base = copy.deepcopy(model).eval()
    trainer = make_trainer(model, processor, Dataset.from_list(_rows(audio)), tmp_path / "out", lora_r=2, lora_alpha=4,
                           batch_size=3, max_steps=1, audio_root=tmp_path, modules_to_save=["lm_head"])
    assert trainer.ref_model is None
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.5)
    trainer.model.eval()
    batch = trainer.data_collator(_rows(audio))
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    base_chosen, base_rejected = completion_logps(base, batch)
    policy_chosen, _ = completion_logps(trainer.model, batch)
    torch.testing.assert_close(ref_chosen, base_chosen, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(ref_rejected, base_rejected, rtol=1e-4, atol=1e-3)
    assert not torch.allclose(policy_chosen, base_chosen, atol=1e-2)


def test_export_merged_matches_adapter(trained, tmp_path):
    from transformers import AutoProcessor

    from models.loading import export_merged

    omni = trained["family"] == "qwen2.5-omni-thinker"
    if omni:
        # The torchvision-free Omni stand-in cannot be rebuilt by AutoProcessor, so it is handed over explicitly,
        # with a loaded base model.
        out = export_merged(copy.deepcopy(trained["base"]), trained["adapter_dir"], tmp_path / "merged",
                            processor=trained["processor"])
    else:
        # A base checkpoint directory without a processor: the one train_dpo saved with the adapter is used.
        trained["base"].save_pretrained(tmp_path / "base")
        out = export_merged(tmp_path / "base", trained["adapter_dir"], tmp_path / "merged")
    merged = model_class_of_type(trained["model"].config.model_type).from_pretrained(out).eval()
    if not omni:
        assert AutoProcessor.from_pretrained(out).tokenizer.get_vocab() == trained["processor"].tokenizer.get_vocab()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    batch = trained["collator"](trained["rows"][:1])
    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, trained["model"](**inputs).logits, rtol=1e-4, atol=1e-4)
