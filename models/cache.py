"""The one on-disk cache shared by data builds, pretrained parts and tests."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where downloads and converted artefacts live (``$EARWITNESS_CACHE`` or ``~/.cache/earwitness``)."""
    return Path(os.environ.get("EARWITNESS_CACHE") or Path.home() / ".cache" / "earwitness")
