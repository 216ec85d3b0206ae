"""The binding diagnostic: a fresh language model fed oracle or encoder audio tokens learns presence."""

import random
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from train.binding import Learner, checkpoint_lm, fit, run, sequence, table
from train.lookup import Split, oracle_tokens, pool_positions

pytestmark = pytest.mark.slow  # a diagnostic that trains language models


def test_oracle_tokens_are_the_mean_phrase_embedding_of_the_active_classes():
    embed = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    word_ids = [[0, 1], [2], [3, 4, 5]]
    active = torch.tensor([[[1.0, 0, 0], [1, 1, 0], [0, 0, 0]]])
    tokens = oracle_tokens(embed, word_ids, active)
    dog, rain = embed[[0, 1]].mean(0), embed[2]
    assert torch.allclose(tokens[0, 0], dog)
    assert torch.allclose(tokens[0, 1], (dog + rain) / 2)
    assert torch.equal(tokens[0, 2], torch.zeros(2))  # nothing active: nothing heard


def test_layouts_put_the_answer_after_the_template_or_right_after_the_phrase(tiny_checkpoint, corpus):
    from models.loading import load
    from models.registry import resolve
    from train.data.qa import read_qa_rows

    processor, _ = load(resolve(str(tiny_checkpoint)), device="cpu")
    tok = processor.tokenizer
    row = next(r for r in read_qa_rows(corpus, "train") if r.kind == "presence")
    chat, direct = (sequence(tok, row, 5, layout) for layout in ("chat", "direct"))
    assert tok.decode(chat).endswith("<|im_start|>assistant\n") and row.question in tok.decode(chat)
    assert tok.decode(direct).endswith(row.phrase) and row.question not in tok.decode(direct)
    audio = tok.convert_tokens_to_ids("<|AUDIO|>")
    assert chat.count(audio) == direct.count(audio) == 5


def _synthetic(n_scenes: int, rng: random.Random, word_ids: list, phrases: list[str], positions: int = 6) -> Split:
    """Scenes where each class is active (somewhere) with probability 1/2, one presence question per class."""
    active = torch.zeros((n_scenes, positions, len(phrases)))
    questions = []
    for i in range(n_scenes):
        for c, phrase in enumerate(phrases):
            present = rng.random() < 0.5
            if present:
                start = rng.randrange(positions)
                active[i, start : start + 2, c] = 1.0
            questions.append(SimpleNamespace(scene_id=f"s{i}", phrase=phrase, answer="Yes" if present else "No",
                                             question=f"Is there a sound of {phrase} in the audio?"))
    return Split(torch.zeros((n_scenes, positions, 4)), active, {f"s{i}": i for i in range(n_scenes)}, questions)


@pytest.mark.parametrize("shuffle", [False, True])
def test_oracle_tokens_in_the_direct_layout_are_learnt_and_generalise(tiny_checkpoint, shuffle):
    """One attention hop over perfect audio tokens: a one-layer model answers unseen scenes; tokens that
    belong to other scenes (a row mix-up) leave it at chance on them."""
    from models.loading import load
    from models.registry import resolve

    processor, model = load(resolve(str(tiny_checkpoint)), device="cpu")
    tok, rng = processor.tokenizer, random.Random(0)
    phrases = ["dog", "rain", "door", "bell"]
    word_ids = [tok.encode(" " + p, add_special_tokens=False) for p in phrases]
    data = {"train": _synthetic(160, rng, word_ids, phrases), "validation": _synthetic(40, rng, word_ids, phrases)}
    if shuffle:
        data["validation"] = replace(data["validation"], active=data["validation"].active.roll(1, dims=0))
    learner = Learner(model.config.text_config, tok, "oracle", "direct", word_ids, torch.zeros(4), torch.ones(4), seed=0)
    history = fit(learner, data, steps=200, batch_size=32, learning_rate=3e-3, eval_every=100, eval_questions=160, progress=False)
    assert [h["step"] for h in history] == [100, 200]
    if shuffle:
        assert 0.35 < history[-1]["validation_auc"] < 0.65, history
    else:
        assert history[-1]["validation_auc"] > 0.9, history
    assert "| oracle | direct | fresh | 200 |" in table({("oracle", "direct"): history})


def test_unknown_cell_is_refused(tiny_checkpoint, corpus):
    with pytest.raises(ValueError, match="audio must be one of"):
        run(tiny_checkpoint, corpus, audio="perfect", steps=1, progress=False)


def test_pooled_positions_average_the_tower_and_keep_every_label():
    hidden = torch.arange(8, dtype=torch.float32).reshape(1, 4, 2)
    active = torch.tensor([[[1.0, 0], [0, 0], [0, 0], [0, 1]]])
    h, a = pool_positions(hidden, active, 2)
    assert torch.equal(h, torch.tensor([[[1.0, 2.0], [5.0, 6.0]]]))
    assert torch.equal(a, torch.tensor([[[1.0, 0], [0, 1]]]))  # a short event survives the pooling
    assert pool_positions(hidden, active, None)[0] is hidden
    with pytest.raises(ValueError, match="divide"):
        pool_positions(hidden, active, 3)


def test_the_checkpoints_language_model_is_copied_not_shared(tiny_checkpoint):
    from models.loading import load
    from models.registry import resolve

    processor, model = load(resolve(str(tiny_checkpoint)), device="cpu")
    lm = checkpoint_lm(model)
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        ours = lm(input_ids=ids).logits
        theirs = model.lm_head(model.model.language_model(input_ids=ids).last_hidden_state)
    assert torch.allclose(ours, theirs, atol=1e-5)
    with torch.no_grad():
        next(lm.parameters()).add_(1.0)
    assert not torch.allclose(lm(input_ids=ids).logits, theirs, atol=1e-3)  # learning on it leaves the served model alone
    learner = Learner(model.config.text_config, processor.tokenizer, "oracle", "chat", [[1]], torch.zeros(2), torch.ones(2), seed=0, lm=lm)
    learnt = {id(p) for p in learner.parameters()}
    assert id(lm.model.embed_tokens.weight) not in learnt and not lm.model.embed_tokens.weight.requires_grad  # oracle tokens are its words
    assert id(lm.model.layers[0].self_attn.q_proj.weight) in learnt


def test_unknown_language_model_start_is_refused(tiny_checkpoint, corpus):
    with pytest.raises(ValueError, match="lm_init one of"):
        run(tiny_checkpoint, corpus, lm_init="bigger", steps=1, progress=False)


def test_the_curriculum_learns_on_oracle_tokens_then_on_the_encoders(tiny_checkpoint, corpus):
    history = run(tiny_checkpoint, corpus, audio="encoder", layout="chat", steps=2, oracle_steps=2, batch_size=4, eval_every=1,
                  eval_questions=8, progress=False)
    assert [(h["step"], h["audio"]) for h in history] == [(1, "oracle"), (2, "oracle"), (3, "encoder"), (4, "encoder")]
    assert "| encoder | chat | fresh | 4 |" in table({("encoder", "chat"): history})
