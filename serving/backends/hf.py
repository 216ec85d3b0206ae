"""The transformers engine: any Qwen2-Audio-class checkpoint, on CPU or GPU, batched greedy decoding."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from models.loading import load
from models.registry import ModelSpec
from serving.backends.base import AudioPrompt, Generation


class TransformersBackend:
    def __init__(self, name: str, processor, model, max_audio_s: float = 30.0):
        self.model_name = name
        self.processor, self.model = processor, model
        extractor = processor.feature_extractor
        self.sample_rate = int(extractor.sampling_rate)
        # The encoder hears one window; longer audio would be cut silently, so it is refused upstream.
        self.max_audio_s = float(min(max_audio_s, extractor.chunk_length))
        self.device = next(model.parameters()).device

    @classmethod
    def load(cls, spec: ModelSpec, adapter: str | None = None, device: str = "auto", dtype: str = "auto") -> "TransformersBackend":
        processor, model = load(spec, adapter=adapter, device=device, dtype=dtype)
        return cls(spec.name, processor, model, spec.max_audio_s)

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
        if contrast:
            from serving.backends.contrast import with_contrast

            generations = with_contrast(self, inputs, prompts, generations, new_tokens, out.logits)
        return generations

    def _finish(self, row: torch.Tensor, limit: int) -> Generation:
        tokenizer = self.processor.tokenizer
        ids = row[:limit].tolist()
        stops = {tokenizer.eos_token_id, tokenizer.pad_token_id}
        cut = next((i for i, t in enumerate(ids) if t in stops), len(ids))
        return Generation(text=tokenizer.decode(ids[:cut], skip_special_tokens=True).strip(), num_tokens=cut)

    def warm_up(self) -> None:
        self.generate([AudioPrompt(np.zeros(self.sample_rate, dtype=np.float32), "warm up", 2)])
