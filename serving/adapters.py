"""Served model names: the base model, its default adapter and named LoRA adapters.

Naming (the request's ``model`` field, and the ids ``GET /v1/models`` lists):

* ``<model>``            the base weights plus the model's default adapter (when it has one);
* ``<model>:base``       the base weights alone;
* ``<model>:<adapter>``  the base weights plus the named adapter; the bare ``<adapter>`` is accepted too.

Every id is one Ray Serve *multiplexed model id*: the ingress sends each request with
``handle.options(multiplexed_model_id=id)``, so Serve routes it to a replica that already holds that
adapter, and each replica keeps its most recently used adapters loaded (``max_loaded_adapters``).

Names must match :data:`MODEL_NAME` (no path separators, no ``..``); anything else, or an unknown
name, is a 404 ``model_not_found`` — a name never reaches the file system.
"""

from __future__ import annotations

import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,47}$")
BASE = "base"
DEFAULT = "default"


class UnknownModel(KeyError):
    pass


@dataclass(frozen=True)
class Catalog:
    """What one deployment serves: a model name, its default adapter (or None) and named adapters."""

    model: str
    default: str | None = None  # adapter name the bare model id uses
    paths: dict[str, str] = field(default_factory=dict)  # adapter name -> directory

    @classmethod
    def build(cls, model: str, shipped: dict[str, str], extra: dict[str, str], default_dir: str | None) -> "Catalog":
        """The model's shipped adapters, the settings' named ones, and the default (by directory)."""
        paths: dict[str, str] = {}
        for name, path in {**shipped, **extra}.items():
            if not ADAPTER_NAME.fullmatch(name) or name == BASE:
                raise ValueError(f"adapter name {name!r} must match {ADAPTER_NAME.pattern} and not be {BASE!r}")
            paths[name] = str(path)
        default = None
        if default_dir:
            default = next((n for n, p in paths.items() if Path(p).resolve() == Path(default_dir).resolve()), None)
            if default is None:
                default = DEFAULT if DEFAULT not in paths else "default-adapter"
                paths[default] = str(default_dir)
        return cls(model=model, default=default, paths=paths)

    @property
    def default_id(self) -> str:
        return self.model

    def ids(self) -> list[tuple[str, str | None]]:
        """``(model id, adapter name or None)`` for everything served, the default first."""
        out: list[tuple[str, str | None]] = [(self.model, self.default)]
        if self.default is not None:
            out.append((f"{self.model}:{BASE}", None))
        out += [(f"{self.model}:{name}", name) for name in sorted(self.paths) if name != self.default]
        return out

    def resolve(self, requested: str | None) -> tuple[str, str | None]:
        """A requested name as ``(canonical id, adapter name or None)``; raises :class:`UnknownModel`."""
        if not requested:
            return self.model, self.default
        if not MODEL_NAME.fullmatch(requested):
            raise UnknownModel(requested)
        if requested == self.model:
            return self.model, self.default
        suffix = requested[len(self.model) + 1 :] if requested.startswith(self.model + ":") else requested
        if suffix == BASE:
            return (f"{self.model}:{BASE}" if self.default is not None else self.model), None
        if suffix == self.default or (suffix == DEFAULT and self.default is not None):
            return self.model, self.default
        if suffix in self.paths:
            return f"{self.model}:{suffix}", suffix
        raise UnknownModel(requested)

    def to_dict(self) -> dict:
        return {"model": self.model, "default": self.default, "paths": dict(self.paths)}

    @classmethod
    def from_dict(cls, data: dict) -> "Catalog":
        return cls(model=data["model"], default=data.get("default"), paths=dict(data.get("paths") or {}))


class PeftAdapters:
    """LoRA adapters on a transformers backend: load, switch per batch, unload; one generation at a time.

    The backend's model becomes a ``PeftModel`` holding every loaded adapter; a batch runs with one
    adapter active and merged into the weights (``set_adapter`` + ``merge_adapter``) or with none
    (unmerged, ``disable_adapter``). A lock serialises switching
    and generation, so two batches never see each other's adapter.
    """

    def __init__(self, backend):
        self.backend = backend
        self.lock = threading.Lock()
        model = backend.model
        self.loaded: set[str] = set(getattr(model, "peft_config", {}) or {})
        self.merged: str | None = None  # the adapter whose LoRA is folded into the base weights right now

    def load(self, name: str, path: str) -> None:
        from peft import PeftModel

        with self.lock:
            if name in self.loaded:
                return
            model = self.backend.model
            if hasattr(model, "peft_config"):
                self._merge(model, None)
                model.load_adapter(path, adapter_name=name, is_trainable=False)
            else:
                model = PeftModel.from_pretrained(model, path, adapter_name=name, is_trainable=False)
                self.backend.model = model
            model.to(self.backend.device).eval()
            self.loaded.add(name)

    def unload(self, name: str) -> None:
        with self.lock:
            if name not in self.loaded or len(self.loaded) == 1:
                return  # PEFT keeps at least one adapter; an idle one costs only its LoRA weights
            model = self.backend.model
            if self.merged == name:
                self._merge(model, None)
            if getattr(model, "active_adapter", None) == name:
                model.set_adapter(next(n for n in self.loaded if n != name))
            model.delete_adapter(name)
            self.loaded.discard(name)

    @contextmanager
    def active(self, name: str | None):
        with self.lock:
            model = self.backend.model
            if not hasattr(model, "peft_config"):
                if name is not None:
                    raise UnknownModel(name)
                yield
                return
            if name is not None and name not in self.loaded:
                raise UnknownModel(name)
            self._merge(model, name)
            if name is None:
                with model.disable_adapter():
                    yield
                return
            yield

    def _merge(self, model, name: str | None) -> None:
        """Keep the adapter in use merged into the base weights (unmerged for the base or another adapter).

        Merged, a LoRA layer runs its base matmul only: on the embedded model the default adapter's
        answer took about 15% longer unmerged. Switching costs one unmerge and one merge, and makes
        the caches computed with the old weights (blank-audio prefixes and scores) stale.
        """
        if self.merged == name:
            return
        from serving.backends.contrast import clear_blank_caches

        clear_blank_caches(self.backend)
        if self.merged is not None:
            model.unmerge_adapter()
            self.merged = None
        if name is not None:
            model.set_adapter(name)
            model.merge_adapter()
            self.merged = name

    def generate(self, prompts, name: str | None):
        with self.active(name):
            return self.backend.generate(prompts)


class LoadedAdapter:
    """What the multiplexed loader hands back; Serve calls ``__del__`` when it evicts the adapter."""

    def __init__(self, model_id: str, name: str | None, ref=None, unload=None):
        self.model_id, self.name, self.ref = model_id, name, ref
        self._unload = unload

    def __del__(self):
        unload, self._unload = getattr(self, "_unload", None), None
        if unload is not None:
            try:
                unload()
            except Exception:  # noqa: BLE001 - eviction must not fail the request that caused it
                pass
