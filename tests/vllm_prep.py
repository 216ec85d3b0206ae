"""Artifacts for the vLLM tests, made in the *main* environment (transformers 5.23 + PEFT):

* ``base/``    a tiny Qwen2-Audio that vLLM's implementation accepts: a 30 s window at hop 160 (the 3000
  mel frames vLLM's input schema fixes; 32 mels — the mel count is free) and attention heads of 32
  (vLLM's CPU kernels take 32, 64, 80, …; the session checkpoint's 16 is refused);
* ``listen/``, ``dpo/`` the stage commands run on it, as a user runs them: ``earwitness data import`` of
  synthesised AudioCaps / Clotho clips, ``train listen --from base/``, ``train dpo --from listen/`` (2 steps each, a
  high learning rate so that the adapter changes the answers);
* ``adapter/`` the DPO stage's adapter (LoRA on the language-model linears + LISTEN's projector as
  ``modules_to_save``), which vLLM cannot apply to Qwen2-Audio;
* ``merged/``  that stage merged into the weights by ``earwitness export --merge --model dpo/`` (earwitness-tiny's
  own 2.5 s window and 48-wide heads are outside what vLLM's Qwen2-Audio takes, so the stages start from ``base/``);
* ``expected.json`` the transformers engine's greedy answers (base + PEFT adapter, and base) for a fixed
  clip and question, which vLLM must reproduce from ``merged/`` and ``base/``, and its audio contrast
  on ``merged/``.

    python -m tests.vllm_prep OUT_DIR
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np

QUESTION = "Is there a sound of a dog barking in the audio?"
MAX_TOKENS = 8


def clip() -> np.ndarray:
    t = np.arange(32_000) / 16_000
    return (0.3 * np.sin(2 * np.pi * 440 * t) * np.exp(-t)).astype(np.float32)


def prepare(out: Path) -> Path:
    from models.registry import ModelSpec
    from models.tiny import TinySize, build_untrained
    from serving.backends import AudioPrompt
    from serving.backends.hf import TransformersBackend
    from tests.helpers import TINY_TEXTS

    out = Path(out)
    if (out / "expected.json").exists():
        return out
    size = TinySize(chunk_s=30, mel_bins=32, hop_length=160, audio_dim=32, audio_layers=1, audio_heads=2,
                    text_dim=64, text_layers=1, text_heads=2, text_kv_heads=1)
    processor, model = build_untrained(TINY_TEXTS, size, vocab_size=300, seed=0)
    # models/tiny.py marks the text config tied, yet transformers keeps a separate lm_head for Qwen2-Audio;
    # vLLM would tie it (serving/backends/vllm.check_checkpoint refuses such a checkpoint): say what is true
    model.config.text_config.tie_word_embeddings = False
    processor.save_pretrained(out / "base")
    model.save_pretrained(out / "base")

    stage_commands(out)

    prompt = AudioPrompt(clip(), QUESTION, MAX_TOKENS)
    expected = {}
    for key, adapter in (("adapter", str(out / "adapter")), ("base", None)):
        backend = TransformersBackend.load(ModelSpec(name="base", family="qwen2-audio", source=str(out / "base"), description=""), adapter=adapter, device="cpu", dtype="float32")
        generation = backend.generate([prompt])[0]
        expected[key] = {"text": generation.text, "num_tokens": generation.num_tokens}
    # the audio contrast the transformers engine computes on the merged checkpoint, which vLLM's must match
    merged = TransformersBackend.load(ModelSpec(name="merged", family="qwen2-audio", source=str(out / "merged"), description=""), device="cpu", dtype="float32")
    g = merged.generate([AudioPrompt(clip(), QUESTION, MAX_TOKENS, contrast=True)])[0]
    expected["contrast"] = {"text": g.text, "answer_logprob": g.answer_logprob, "blank_logprob": g.blank_logprob}
    expected["changed"] = weights_changed(out / "base", out / "merged")
    (out / "expected.json").write_text(json.dumps(expected, indent=2))
    return out


def stage_commands(out: Path) -> None:
    """``data import`` → ``train listen`` → ``train dpo`` → ``export --merge``, the commands a user runs, on ``base/`` (run
    by the command's ``main`` in this process, which has torch, transformers and PEFT loaded already)."""
    from earwitness.cli import main
    from tests.helpers import write_user_datasets

    caps, clotho = write_user_datasets(out / "user-data")
    steps = ["--max-steps", "2", "--batch-size", "2", "--learning-rate", "0.3", "--no-tensorboard"]
    for argv in (["data", "import", "--audiocaps", caps, "--clotho", clotho, "--out", out / "corpus"],
                 ["train", "listen", "--from", out / "base", "--corpus", out / "corpus", "--out", out / "listen", *steps],
                 ["train", "dpo", "--from", out / "listen", "--corpus", out / "corpus", "--out", out / "dpo", "--lora-dropout", "0", *steps],
                 ["export", "--merge", "--model", out / "dpo", "--out", out / "merged"]):
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(list(map(str, argv))) == 0, argv
    shutil.copytree(out / "dpo" / "adapter", out / "adapter")


def weights_changed(base: Path, merged: Path) -> float:
    """The largest change the merge made to a weight: the stages' adapter did something."""
    from safetensors.torch import load_file

    before, after = (load_file(next(d.glob("*.safetensors"))) for d in (base, merged))
    return max((after[k].float() - before[k].float()).abs().max().item() for k in before if k in after)


if __name__ == "__main__":
    print(prepare(Path(sys.argv[1])))
