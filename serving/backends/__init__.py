"""Model backends: one interface, one implementation per engine."""

from serving.backends.base import AudioPrompt, Backend, Generation

__all__ = ["AudioPrompt", "Backend", "Generation"]
