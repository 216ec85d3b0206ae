"""The Qwen2.5-Omni thinker's processor for audio prompts, without torchvision.

transformers' ``Qwen2_5OmniProcessor`` insists on a video processor, and its video processors need torchvision, which
this project does not install: ``AudioOmniProcessor`` leaves that one slot empty (audio prompts never touch it) and
saves what it has. ``load_audio_omni_processor`` reads one from a checkpoint's tokenizer and feature extractor.
"""

from __future__ import annotations

from pathlib import Path

from transformers import Qwen2_5OmniProcessor


class AudioOmniProcessor(Qwen2_5OmniProcessor):
    """``Qwen2_5OmniProcessor`` with no video processor."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None  # torchvision-only class; audio prompts never touch it
        return super().check_argument_for_proper_class(argument_name, argument)

    def save_pretrained(self, save_directory, **kwargs):
        """The tokenizer (carrying the chat template) and the feature extractor; the stock one saves every slot, None included."""
        if self.chat_template and not self.tokenizer.chat_template:
            self.tokenizer.chat_template = self.chat_template
        self.tokenizer.save_pretrained(save_directory)
        self.feature_extractor.save_pretrained(save_directory)


def load_audio_omni_processor(source: str | Path, local_files_only: bool = False) -> AudioOmniProcessor:
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil, WhisperFeatureExtractor

    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
    extractor = WhisperFeatureExtractor.from_pretrained(source, local_files_only=local_files_only)
    return AudioOmniProcessor(image_processor=Qwen2VLImageProcessorPil(), video_processor=None, feature_extractor=extractor,
                              tokenizer=tokenizer, chat_template=tokenizer.chat_template)
