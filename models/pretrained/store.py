"""Converted checkpoints under ``<cache>/pretrained/<name>/``: built once, atomically, then reused."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from models.cache import cache_dir

_DONE = ".complete"


def converted_dir(name: str, cache: Path | None = None) -> Path:
    """Where part ``name`` lives once converted to a transformers checkpoint."""
    return (cache or cache_dir()) / "pretrained" / name


def build_once(name: str, build: Callable[[Path], None], cache: Path | None = None) -> Path:
    """Run ``build(tmp_dir)`` unless a finished conversion exists; an interrupted one is redone.

    Processes that start together (a model replica and a verifier replica on a fresh machine) take
    turns on a file lock: one builds, the others wait and then read its result.
    """
    import fcntl

    out = converted_dir(name, cache)
    if (out / _DONE).exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / _DONE).exists():
            return out
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        build(tmp)
        (tmp / _DONE).touch()
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return out


def is_pretrained_source(name: str) -> bool:
    """A hub id or an existing checkpoint directory, loaded with ``from_pretrained`` as is."""
    return "/" in name or Path(name).expanduser().is_dir()
