"""The small Qwen2-Audio family: config, tokenizer, feature extractor and processor built from scratch.

Everything here is built locally (no hub): a byte-level BPE tokenizer with Qwen's special and audio
tokens and chat template, a Whisper-style feature extractor whose window fits short clips, and a
``Qwen2AudioConfig`` whose encoder positions match that window (the encoder insists on exactly
``2 * max_source_positions`` mel frames).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2AudioConfig,
    Qwen2AudioForConditionalGeneration,
    Qwen2AudioProcessor,
    WhisperFeatureExtractor,
)

SAMPLE_RATE = 16_000
PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
AUDIO, AUDIO_BOS, AUDIO_EOS = "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END, AUDIO, AUDIO_BOS, AUDIO_EOS]

# Qwen-style ChatML. Parts are matched on their ``type`` (not ``'audio' in part``), because a
# datasets table fills absent keys with None and would make every text part look like audio.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'audio' %}<|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class TinySize:
    """Sizes of a small Qwen2-Audio; defaults are the embedded model's, tests pass smaller ones."""

    chunk_s: int = 10
    mel_bins: int = 64
    hop_length: int = 640  # 40 ms frames: 6.25 audio tokens a second (Qwen2-Audio's 10 ms gives 25)
    audio_dim: int = 128
    audio_layers: int = 2
    audio_heads: int = 4
    text_dim: int = 192
    text_layers: int = 3
    text_heads: int = 4
    text_kv_heads: int = 2
    max_positions: int = 1024

    @property
    def max_source_positions(self) -> int:
        return self.chunk_s * SAMPLE_RATE // self.hop_length // 2


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2000) -> PreTrainedTokenizerFast:
    """Byte-level BPE over ``texts`` with ChatML and audio special tokens (any text stays encodable)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return chatml_tokenizer(tok)


def chatml_tokenizer(backend: Tokenizer) -> PreTrainedTokenizerFast:
    """A ``tokenizers`` backend as the Qwen2-Audio processor reads it: ChatML end and pad, audio tokens named."""
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=PAD,
        padding_side="left",
        extra_special_tokens={"audio_token": AUDIO, "audio_bos_token": AUDIO_BOS, "audio_eos_token": AUDIO_EOS},
    )


def build_processor(tokenizer: PreTrainedTokenizerFast, size: TinySize) -> Qwen2AudioProcessor:
    extractor = WhisperFeatureExtractor(
        feature_size=size.mel_bins,
        sampling_rate=SAMPLE_RATE,
        hop_length=size.hop_length,
        chunk_length=size.chunk_s,
        n_fft=2 * size.hop_length,
    )
    return Qwen2AudioProcessor(feature_extractor=extractor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def build_config(tokenizer: PreTrainedTokenizerFast, size: TinySize) -> Qwen2AudioConfig:
    config = Qwen2AudioConfig(
        audio_config=dict(
            d_model=size.audio_dim,
            encoder_layers=size.audio_layers,
            encoder_attention_heads=size.audio_heads,
            encoder_ffn_dim=size.audio_dim * 4,
            num_mel_bins=size.mel_bins,
            max_source_positions=size.max_source_positions,
        ),
        text_config=dict(
            model_type="qwen2",
            vocab_size=len(tokenizer),
            hidden_size=size.text_dim,
            intermediate_size=size.text_dim * 4,
            num_hidden_layers=size.text_layers,
            num_attention_heads=size.text_heads,
            num_key_value_heads=size.text_kv_heads,
            max_position_embeddings=size.max_positions,
            tie_word_embeddings=False,  # transformers keeps a separate lm_head here; say so for other engines
            bos_token_id=tokenizer.convert_tokens_to_ids(IM_START),
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        audio_token_index=tokenizer.convert_tokens_to_ids(AUDIO),
    )
    config.earwitness_tiny_size = asdict(size)
    return config


def build_untrained(texts: Iterable[str], size: TinySize = TinySize(), vocab_size: int = 2000, seed: int = 0):
    """A randomly initialised tiny model with its processor: the starting point of base training."""
    import torch

    torch.manual_seed(seed)
    tokenizer = train_tokenizer(texts, vocab_size)
    processor = build_processor(tokenizer, size)
    model = Qwen2AudioForConditionalGeneration(build_config(tokenizer, size))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return processor, model
