"""Can the language model bind a question's words to its audio tokens? A diagnostic, not a stage.

The embedded model answers presence questions at chance although a linear probe reads the sounds
off its audio tokens (``train.tower_probe``). This separates the two halves of hearing. A fresh language
model of the checkpoint's own text config learns presence questions, present and absent, from

- ``oracle`` audio tokens: at each position the mean of the language model's own input embeddings
  of the phrase words of the classes the strong labels say are active there (perfect hearing, in
  the model's own word space), or
- ``encoder`` audio tokens: the checkpoint's frozen audio tower through a fresh linear projector
  (its outputs standardised first: raw, they are nearly one shared vector);

with the question laid out as

- ``chat``: the served prompt, where the answer follows the chat template and the asked-about
  phrase sits some ten tokens back, so the answer needs two attention hops (gather the phrase,
  match it against the audio), or
- ``direct``: the answer token right after the phrase (one hop: the phrase matches the audio).

It reports the ROC-AUC of logit(Yes) − logit(No) on train and validation presence questions as
training goes. Oracle tokens learnt fast in the direct layout and slowly in the chat layout say
the bottleneck is composing two hops in a small from-scratch language model, not the audio.
``earwitness train binding --audio oracle --layout chat`` runs one cell.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.loading import load
from models.registry import resolve
from models.tiny import AUDIO, AUDIO_BOS, AUDIO_EOS, IM_START
from train.data.conversations import prompt_ids
from train.data.ontology import load_ontology
from train.data.qa import read_qa_rows
from train.frozen_features import encoded_split
from train.lookup import Split, oracle_tokens, phrase_word_ids, pool_positions
from train.metrics import roc_auc

AUDIO_SOURCES = ("oracle", "encoder")
LAYOUTS = ("chat", "direct")


def sequence(tokenizer, row, n_audio: int, layout: str) -> list[int]:
    """Ids up to the position that predicts the answer; the audio placeholders stay to be replaced."""
    if layout == "chat":
        return prompt_ids(tokenizer, row.question, n_audio)
    audio = tokenizer.convert_tokens_to_ids(AUDIO)
    head = tokenizer.encode(f"{IM_START}user\n{AUDIO_BOS}", add_special_tokens=False)
    return head + [audio] * n_audio + tokenizer.encode(f"{AUDIO_EOS}\n{row.phrase}", add_special_tokens=False)


def load_split(model_dir, model, processor, corpus_dir: Path, split: str, classes: list[str], positions: int | None = None) -> Split:
    hidden, rows_of, active = encoded_split(model_dir, model, processor, corpus_dir, split, classes)
    hidden, active = pool_positions(hidden, active, positions)
    questions = [r for r in read_qa_rows(corpus_dir, split) if r.kind == "presence" and r.scene_id in rows_of]
    return Split(hidden, active, rows_of, questions)


class Learner:
    """A language model (and projector, for encoder tokens) fed audio tokens as embeddings: fresh, or
    ``lm`` (the checkpoint's own, pretrained for earwitness-small) learning on."""

    def __init__(self, text_config, tokenizer, audio: str, layout: str, word_ids, mean: torch.Tensor, std: torch.Tensor, seed: int,
                 lm=None):
        from transformers import Qwen2ForCausalLM

        torch.manual_seed(seed)
        self.lm = lm if lm is not None else Qwen2ForCausalLM(text_config)
        for words in (self.lm.model.embed_tokens.weight, self.lm.lm_head.weight):
            words.requires_grad_(lm is None)  # a given (pretrained) model keeps its word embeddings: the oracle tokens are made of them
        self.projector = torch.nn.Linear(mean.shape[-1], text_config.hidden_size)
        self.tokenizer, self.audio, self.layout, self.word_ids = tokenizer, audio, layout, word_ids
        self.mean, self.std = mean, std
        self.audio_id = tokenizer.convert_tokens_to_ids(AUDIO)
        self.yes, self.no = (tokenizer.encode(w, add_special_tokens=False)[0] for w in ("Yes", "No"))

    def parameters(self) -> list[torch.nn.Parameter]:
        lm = [p for p in self.lm.parameters() if p.requires_grad]
        return lm + (list(self.projector.parameters()) if self.audio == "encoder" else [])

    def margins(self, data: Split, rows: list) -> torch.Tensor:
        """logit(Yes) − logit(No) at each row's answer position."""
        idx = [data.rows_of[r.scene_id] for r in rows]
        embed = self.lm.model.embed_tokens
        if self.audio == "oracle":
            tokens = oracle_tokens(embed.weight, self.word_ids, data.active[idx])
        else:
            tokens = self.projector((data.hidden[idx] - self.mean) / self.std)
        seqs = [sequence(self.tokenizer, r, tokens.shape[1], self.layout) for r in rows]
        width = max(map(len, seqs))
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        inputs = embed(ids)
        inputs = inputs.masked_scatter((ids == self.audio_id)[..., None], tokens.to(inputs.dtype))
        last = mask.sum(1) - 1
        hidden = self.lm.model(inputs_embeds=inputs, attention_mask=mask).last_hidden_state[torch.arange(len(rows)), last]
        logits = self.lm.lm_head(hidden)  # the answer position only: a 49 k vocabulary at every position would cost more than the layers
        return logits[:, self.yes] - logits[:, self.no]

    @torch.no_grad()
    def auc(self, data: Split, rows: list, batch_size: int = 128) -> float:
        self.lm.eval()
        margins = torch.cat([self.margins(data, rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)])
        self.lm.train()
        return roc_auc(np.array([r.answer == "Yes" for r in rows]), margins.numpy())


LM_INITS = ("fresh", "checkpoint")
AUDIO_TRAINS = ("all", "projector")


def checkpoint_lm(model):
    """The checkpoint's language model and head as one ``Qwen2ForCausalLM`` (a copy: the checkpoint stays as it is)."""
    from transformers import Qwen2ForCausalLM

    text_config = model.config.text_config
    lm = Qwen2ForCausalLM(text_config)
    lm.model.load_state_dict(model.model.language_model.state_dict())
    lm.lm_head.load_state_dict(model.lm_head.state_dict())
    return lm.float().train()


def run(model_dir: str | Path, corpus_dir: str | Path, audio: str = "oracle", layout: str = "chat", steps: int = 1000,
        batch_size: int = 64, learning_rate: float = 3e-4, eval_every: int = 250, eval_questions: int = 600,
        seed: int = 0, progress: bool = True, lm_init: str = "fresh", positions: int | None = None,
        oracle_steps: int = 0, audio_trains: str = "all", eval_full: bool = False, audio_learning_rate: float | None = None) -> list[dict]:
    """Train one (audio, layout) cell; returns ``[{step, audio, loss, train_auc, validation_auc, elapsed_s}]``.

    ``lm_init="checkpoint"`` starts from the checkpoint's own language model (for earwitness-small,
    the pretrained SmolLM2 layers) instead of a fresh one; ``positions`` pools the audio tokens;
    ``oracle_steps`` first teaches the lookup on oracle tokens (the sounds' written names), then
    ``steps`` more on ``audio`` tokens: a curriculum, text before audio. ``audio_trains="projector"``
    freezes the language model for the audio steps (LISTEN's split: the lookup learnt on text, the
    projector learns to speak to it). ``eval_full`` also scores validation at the tower's full length
    (``validation_full_auc``): whether a lookup learnt on pooled tokens holds on the served ones.
    ``audio_learning_rate``: the audio steps' own rate after an oracle phase (a fresh projector alone learns
    at a higher one than pretrained layers).
    """

    if audio not in AUDIO_SOURCES or layout not in LAYOUTS or lm_init not in LM_INITS or audio_trains not in AUDIO_TRAINS:
        raise ValueError(f"audio must be one of {AUDIO_SOURCES}, layout one of {LAYOUTS}, lm_init one of {LM_INITS}, "
                         f"audio_trains one of {AUDIO_TRAINS}")
    corpus_dir = Path(corpus_dir)
    processor, model = load(resolve(str(model_dir)), device="cpu")
    ontology = load_ontology(corpus_dir / "ontology.json")
    data = {split: load_split(model_dir, model, processor, corpus_dir, split, ontology.names, positions) for split in ("train", "validation")}
    if eval_full and positions is not None:
        data["validation_full"] = load_split(model_dir, model, processor, corpus_dir, "validation", ontology.names, None)
    flat = data["train"].hidden.reshape(-1, data["train"].hidden.shape[-1])
    learner = Learner(model.config.text_config, processor.tokenizer, audio, layout, phrase_word_ids(ontology, processor.tokenizer),
                      flat.mean(0), flat.std(0).clamp(min=1e-6), seed, lm=checkpoint_lm(model) if lm_init == "checkpoint" else None)
    history, done = [], 0
    for source, n in (("oracle", oracle_steps if audio != "oracle" else 0), (audio, steps)):
        if n:
            learner.audio = source
            if source == "encoder" and audio_trains == "projector":
                learner.lm.requires_grad_(False)
            rate = audio_learning_rate if done and audio_learning_rate else learning_rate
            history += [{**h, "step": h["step"] + done, "audio": source}
                        for h in fit(learner, data, n, batch_size, rate, eval_every, eval_questions, seed, progress)]
            done += n
    return history


def fit(learner: Learner, data: dict[str, Split], steps: int, batch_size: int = 64, learning_rate: float = 3e-4, eval_every: int = 250,
        eval_questions: int = 600, seed: int = 0, progress: bool = True) -> list[dict]:
    """Train ``learner`` on ``data['train']``, scoring a fixed sample of each split every ``eval_every`` steps."""
    rng = random.Random(seed)
    held = {split: rng.sample(d.questions, min(eval_questions, len(d.questions))) for split, d in data.items()}
    params = learner.parameters()
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.01)
    history, start = [], time.time()
    bar = tqdm(total=steps, desc=f"binding {learner.audio}/{learner.layout}", disable=not progress, unit="step")
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate * min(1.0, step / 50)
        rows = rng.sample(data["train"].questions, min(batch_size, len(data["train"].questions)))
        target = torch.tensor([r.answer == "Yes" for r in rows], dtype=torch.float32)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(learner.margins(data["train"], rows), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        bar.update(1)
        if step % eval_every == 0 or step == steps:
            record = {"step": step, "loss": round(loss.item(), 4), "elapsed_s": round(time.time() - start, 1),
                      **{f"{split}_auc": round(learner.auc(data[split], held[split]), 3) for split in data}}
            history.append(record)
            bar.set_postfix({k: v for k, v in record.items() if k.endswith("_auc")})
    bar.close()
    return history


def table(cells: dict[tuple[str, ...], list[dict]]) -> str:
    """One row per evaluation of each cell, keyed ``(audio, layout)`` or ``(audio, layout, language model)``."""
    full = any("validation_full_auc" in h for history in cells.values() for h in history)
    lines = ["| audio tokens | layout | language model | step | train ROC-AUC | validation ROC-AUC |" + (" validation, unpooled |" if full else ""),
             "| --- | --- | --- | ---: | ---: | ---: |" + (" ---: |" if full else "")]
    for (audio, layout, *lm), history in cells.items():
        lm_name = lm[0] if lm else "fresh"
        lines += [f"| {h.get('audio', audio)} | {layout} | {lm_name} | {h['step']} | {h['train_auc']:.3f} | {h['validation_auc']:.3f} |"
                  + (f" {h['validation_full_auc']:.3f} |" if "validation_full_auc" in h else (" – |" if full else "")) for h in history]
    return "\n".join(lines)
