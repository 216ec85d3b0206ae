"""The transformers engine: any Qwen2-Audio-class checkpoint, on CPU or GPU, batched greedy decoding."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import numpy as np
import torch

from models.loading import frozen_tower, load
from models.pretrained.whisper import captured_layers
from models.registry import ModelSpec
from models.families import audio_tower, tower_modules
from serving.backends.base import AudioPrompt, Backend, Generation
from serving.backends.contrast import Contrast


def adapter_leaves_tower(adapter_dir: str, tower_names: list[str]) -> bool:
    """True when a PEFT adapter neither adapts nor replaces any module of the audio tower."""
    from peft import PeftConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    config = PeftConfig.from_pretrained(adapter_dir)
    saved = getattr(config, "modules_to_save", None) or []
    if any(name == m or name.endswith(f".{m}") for m in saved for name in tower_names):
        return False
    return not (getattr(config, "target_modules", None) and any(check_target_module_exists(config, name) for name in tower_names))


class TransformersBackend(Backend):
    def __init__(self, name: str, processor, model, max_audio_s: float = 30.0, tower: str | None = None):
        self.model_name = name
        self.processor, self.model = processor, model
        extractor = processor.feature_extractor
        self.sample_rate = int(extractor.sampling_rate)
        # The encoder hears one window; longer audio would be cut silently, so it is refused upstream.
        self.max_audio_s = float(min(max_audio_s, extractor.chunk_length))
        self.device = next(model.parameters()).device
        self.tower = self._signature(tower)
        self.contrast = Contrast(processor, self.sample_rate)  # the blank side of contrasts, and its caches

    def _signature(self, tower: str | None) -> str | None:
        """The frozen tower's signature (``models.loading.frozen_tower``), its dtype appended when the tower does not
        run in float32 as the pretrained part does (bfloat16 on a GPU computes other numbers)."""
        encoder = audio_tower(self.model)
        if tower is None or encoder is None:
            return None
        dtype = next(encoder.parameters()).dtype
        return tower if dtype == torch.float32 else f"{tower}/{str(dtype).removeprefix('torch.')}"

    def shared_tower(self, adapter_dirs) -> str | None:
        """The tower's signature, unless an adapter of ``adapter_dirs`` (every one this engine may serve) changes the
        tower, or is not a directory whose config says it does not."""
        if self.tower is None:
            return None
        names = tower_modules(self.model)
        return self.tower if all(Path(d, "adapter_config.json").exists() and adapter_leaves_tower(d, names) for d in adapter_dirs) else None

    @classmethod
    def load(cls, spec: ModelSpec, adapter: str | None = None, device: str = "auto", dtype: str = "auto") -> "TransformersBackend":
        processor, model = load(spec, adapter=adapter, device=device, dtype=dtype)
        return cls(spec.name, processor, model, spec.max_audio_s, frozen_tower(spec))

    def inputs(self, prompts: list[AudioPrompt]):
        """The batch's model inputs, built by the model's own chat template and processor.

        ``sanitize_control_tokens``: a question is always tokenized as text. A ``<|AUDIO|>`` or
        ``<|im_end|>`` a client writes is those characters, never a placeholder or a turn boundary, so
        each prompt holds exactly the template's one audio block.
        """
        chats = [[{"role": "user", "content": [{"type": "audio", "audio": p.samples}, {"type": "text", "text": p.question}]}] for p in prompts]
        return self.processor.apply_chat_template(
            chats,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            sanitize_control_tokens=True,
            processor_kwargs={"padding": True, "sampling_rate": self.sample_rate},
        ).to(self.device)

    @torch.inference_mode()
    def generate(self, prompts: list[AudioPrompt]) -> list[Generation]:
        tokenizer = self.processor.tokenizer
        inputs = self.inputs(prompts)
        contrast = any(p.contrast for p in prompts)
        tower = audio_tower(self.model) if self.tower and any(p.tower_layers for p in prompts) else None
        with captured_layers(tower) if tower is not None else contextlib.nullcontext({}) as heard:  # the prefill's tower pass
            out = self.model.generate(
                **inputs,
                max_new_tokens=max(p.max_new_tokens for p in prompts),
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                return_dict_in_generate=True,
                output_logits=contrast,
            )
        new_tokens = out.sequences[:, inputs["input_ids"].shape[1] :]
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        generations = [dataclasses.replace(self._finish(row, p.max_new_tokens), prompt_tokens=int(n))
                       for row, p, n in zip(new_tokens, prompts, prompt_tokens)]
        if "layers" in heard:
            # only a clip that fills the window: for a shorter one the model's tower masks the padding's frames,
            # which the encoder alone (the verifier's, its training features') attends to: other numbers
            last, middle = heard["layers"]
            full = inputs["feature_attention_mask"].bool().all(dim=1).tolist()
            generations = [dataclasses.replace(g, tower_layers=torch.stack([last[i], middle[i]]).float().cpu().numpy()) if p.tower_layers and full[i] else g
                           for i, (g, p) in enumerate(zip(generations, prompts))]
        if contrast:
            generations = self.contrast.with_contrast(self.model, inputs, prompts, generations, new_tokens, out.logits)
        return generations

    def _finish(self, row: torch.Tensor, limit: int) -> Generation:
        tokenizer = self.processor.tokenizer
        ids = row[:limit].tolist()
        stops = {tokenizer.eos_token_id, tokenizer.pad_token_id}
        cut = next((i for i, t in enumerate(ids) if t in stops), len(ids))
        return Generation(text=tokenizer.decode(ids[:cut], skip_special_tokens=True).strip(), num_tokens=cut)

    def warm_up(self) -> None:
        self.generate([AudioPrompt(np.zeros(self.sample_rate, dtype=np.float32), "warm up", 2)])
