"""Artifacts for the vLLM tests, made in the *main* environment (transformers 5.23 + PEFT):

* ``base/``    a tiny Qwen2-Audio that vLLM's implementation accepts: a 30 s window at hop 160 (the 3000
  mel frames vLLM's input schema fixes; 32 mels — the mel count is free) and attention heads of 32
  (vLLM's CPU kernels take 32, 64, 80, …; the session checkpoint's 16 is refused);
* ``adapter/`` a random LoRA adapter shaped like train/'s (language-model linears + the projector as
  ``modules_to_save``), which vLLM cannot apply to Qwen2-Audio;
* ``merged/``  that adapter merged into the weights by ``earwitness export --merge``;
* ``stage/``, ``stage-merged/`` a DPO stage trained by ``earwitness train dpo --from base/`` (on a corpus that
  ``earwitness data import`` makes of synthesised AudioCaps / Clotho clips), merged by ``earwitness export --merge
  --model stage/``: the stage commands' product, as vLLM serves it (earwitness-tiny's own 2.5 s window and 48-wide
  heads are outside what vLLM's Qwen2-Audio takes, so its stages are made on ``base/``);
* ``expected.json`` the transformers engine's greedy answers (base + PEFT adapter, and base) for a fixed
  clip and question, which vLLM must reproduce from ``merged/`` and ``base/``, its audio contrast
  on ``merged/``, and its answer and contrast with the stage's adapter and on ``stage-merged/``.

    python -m tests.vllm_prep OUT_DIR
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

QUESTION = "Is there a sound of a dog barking in the audio?"
MAX_TOKENS = 8


def clip() -> np.ndarray:
    t = np.arange(32_000) / 16_000
    return (0.3 * np.sin(2 * np.pi * 440 * t) * np.exp(-t)).astype(np.float32)


def prepare(out: Path) -> Path:
    import torch
    from peft import get_peft_model
    from transformers import Qwen2AudioForConditionalGeneration

    from models.registry import ModelSpec
    from models.tiny import TinySize, build_untrained
    from serving.backends import AudioPrompt
    from serving.backends.hf import TransformersBackend
    from tests.helpers import TINY_TEXTS
    from train.lora import lora_config

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

    base = Qwen2AudioForConditionalGeneration.from_pretrained(out / "base")
    peft_model = get_peft_model(base, lora_config(base, r=4, modules_to_save=["multi_modal_projector"]))
    gen = torch.Generator().manual_seed(3)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name or "modules_to_save" in name:
            param.data = param.data + 0.5 * torch.randn(param.shape, generator=gen)
    peft_model.save_pretrained(out / "adapter")
    processor.save_pretrained(out / "adapter")  # as train/dpo.export_adapter does
    # the shipped command, for real: earwitness export --merge
    subprocess.run(
        [sys.executable, "-m", "earwitness", "export", "--merge", "--model", str(out / "base"), "--adapter", str(out / "adapter"), "--out", str(out / "merged")],
        check=True, cwd=Path(__file__).resolve().parents[1],
    )

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
    spec = ModelSpec(name="base", family="qwen2-audio", source=str(out / "base"), description="")
    staged = TransformersBackend.load(spec, adapter=str(out / "stage" / "adapter"), device="cpu", dtype="float32").generate([prompt])[0]
    merged = TransformersBackend.load(ModelSpec(name="stage", family="qwen2-audio", source=str(out / "stage-merged"), description=""), device="cpu", dtype="float32")
    g = merged.generate([AudioPrompt(clip(), QUESTION, MAX_TOKENS, contrast=True)])[0]
    expected["stage"] = {"text": staged.text, "num_tokens": staged.num_tokens, "merged_text": g.text,
                         "answer_logprob": g.answer_logprob, "blank_logprob": g.blank_logprob, "changed": weights_changed(out / "base", out / "stage-merged")}
    (out / "expected.json").write_text(json.dumps(expected, indent=2))
    return out


def stage_commands(out: Path) -> None:
    """``data import`` → ``train dpo --from base/`` (2 steps) → ``export --merge --model stage/``, as a user runs them."""
    from tests.helpers import write_user_datasets

    caps, clotho = write_user_datasets(out / "user-data")
    for argv in (["data", "import", "--audiocaps", caps, "--clotho", clotho, "--out", out / "corpus"],
                 ["train", "dpo", "--from", out / "base", "--corpus", out / "corpus", "--out", out / "stage", "--max-steps", "2", "--batch-size", "2",
                  "--learning-rate", "5e-2", "--lora-dropout", "0", "--no-tensorboard"],
                 ["export", "--merge", "--model", out / "stage", "--out", out / "stage-merged"]):
        subprocess.run([sys.executable, "-m", "earwitness", *map(str, argv)], check=True, cwd=Path(__file__).resolve().parents[1],
                       stdout=subprocess.DEVNULL)


def weights_changed(base: Path, merged: Path) -> float:
    """The largest change the merge made to any weight: the stage's adapter did something."""
    from safetensors.torch import load_file

    before, after = (load_file(next(d.glob("*.safetensors"))) for d in (base, merged))
    return max((after[k].float() - before[k].float()).abs().max().item() for k in before if k in after)


if __name__ == "__main__":
    print(prepare(Path(sys.argv[1])))
