"""The lookup's shared-prefix pass: every question about a scene reads one pass over its audio, with the same numbers."""

import random

import torch

from tests.test_binding import _synthetic
from train.binding import Learner
from train.data.qa import QARow
from train.lookup import continuation, lookup_losses, make_batch, oracle_tokens, prefix_ids, presence_margins


def _tiny(tiny_checkpoint):
    from models.loading import load
    from models.registry import resolve
    from train.binding import checkpoint_lm

    processor, model = load(resolve(str(tiny_checkpoint)), device="cpu")
    return processor.tokenizer, model, checkpoint_lm(model)


def test_shared_prefix_margins_equal_one_pass_per_question(tiny_checkpoint):
    tok, model, lm = _tiny(tiny_checkpoint)
    phrases = ["dog", "rain", "door"]
    word_ids = [tok.encode(" " + p, add_special_tokens=False) for p in phrases]
    data = _synthetic(5, random.Random(0), word_ids, phrases, positions=8)
    rows = data.questions[::-1]  # scenes interleaved out of order: the margins must come back in the rows' order
    learner = Learner(model.config.text_config, tok, "oracle", "chat", word_ids, torch.zeros(4), torch.ones(4), seed=0, lm=lm)
    lm.eval()
    with torch.no_grad():
        expected = learner.margins(data, rows)
    tokens = lambda ids: oracle_tokens(lm.model.embed_tokens.weight, word_ids, data.active[[data.rows_of[s] for s in ids]])
    shared = presence_margins(lm, tok, tokens, rows, 8, scenes_per_batch=2)
    assert torch.allclose(torch.from_numpy(shared).float(), expected, atol=1e-4)


def test_the_layout_is_the_served_prompt_split_after_the_audio(tiny_checkpoint):
    from train.data.conversations import IGNORE, prompt_ids

    tok, _, _ = _tiny(tiny_checkpoint)
    ids, labels = continuation(tok, "Do you hear a dog?", "Yes", 4)
    prompt = prompt_ids(tok, "Do you hear a dog?", 4)
    assert prefix_ids(tok, 4) + ids[: len(prompt) - len(prefix_ids(tok, 4))] == prompt
    first = next(i for i, v in enumerate(labels) if v != IGNORE)
    assert labels[first] == tok.encode("Yes", add_special_tokens=False)[0] and first == len(prompt) - len(prefix_ids(tok, 4))


def test_shared_prefix_gradients_equal_one_pass_per_question(tiny_checkpoint):
    """The margin loss through the shared prefix trains the layers as separate sequences would."""
    tok, model, lm = _tiny(tiny_checkpoint)
    phrases = ["dog", "rain"]
    word_ids = [tok.encode(" " + p, add_special_tokens=False) for p in phrases]
    data = _synthetic(3, random.Random(1), word_ids, phrases, positions=6)
    rows = [QARow(scene_id=q.scene_id, split="train", audio="", kind="presence", question=q.question, answer=q.answer,
                  phrase=q.phrase, label=q.phrase, sampling="positive" if q.answer == "Yes" else "random") for q in data.questions]
    learner = Learner(model.config.text_config, tok, "oracle", "chat", word_ids, torch.zeros(4), torch.ones(4), seed=0, lm=lm)
    layer = lm.model.layers[0].self_attn.q_proj.weight
    target = torch.tensor([r.answer == "Yes" for r in rows], dtype=torch.float32)
    torch.nn.functional.binary_cross_entropy_with_logits(learner.margins(data, rows), target).backward()
    expected, layer.grad = layer.grad.clone(), None
    by_scene = {}
    for r in rows:
        by_scene.setdefault(r.scene_id, []).append(r)
    batch = make_batch(tok, by_scene, 6)
    audio = oracle_tokens(lm.model.embed_tokens.weight, word_ids, data.active[[data.rows_of[s] for s in batch.scenes]])
    yes, no = (tok.encode(w, add_special_tokens=False)[0] for w in ("Yes", "No"))
    head = torch.tensor(prefix_ids(tok, 6)[:-6])
    _, margin, _ = lookup_losses(lm, head, audio, batch, tok.pad_token_id, yes, no)
    margin.backward()
    assert torch.allclose(layer.grad, expected, atol=1e-5, rtol=1e-3)
