"""Served model names: the base model, its default adapter and named LoRA adapters.

Naming (the request's ``model`` field, and the ids ``GET /v1/models`` lists):

* ``<model>``            the base weights plus the model's default adapter (when it has one);
* ``<model>:base``       the base weights alone;
* ``<model>:<adapter>``  the base weights plus the named adapter; the bare ``<adapter>`` is accepted too.

Every id is one Ray Serve *multiplexed model id*: the ingress sends each request with
``handle.options(multiplexed_model_id=id)``, so Serve routes it to a replica that already holds that
adapter, and each replica keeps its most recently used adapters loaded (``max_loaded_adapters``).

Names must match :data:`MODEL_NAME` (no path separators, no ``..``); anything else, or an unknown
name, is a 404 ``model_not_found`` — a name reaches the file system only as ``<adapter_store>/<name>``.

Adapters live in a store: an entry of ``adapters`` (or ``adapter``) may be a URI, and with ``adapter_store`` set,
any name matching :data:`ADAPTER_NAME` is looked up as ``<adapter_store>/<name>`` when first asked for, so rolling
out an adapter is writing it there and asking for its id (models/store.py copies it into the local cache once).
An adapter that is not there is a 404 ``model_not_found``; one that cannot be served (no LoRA config, unreadable
weights, trained for another base) a 503 ``adapter_unavailable`` naming it, and the replica serves the others.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from models.families import unwrap
from models.store import NotInStore, StoreError, is_uri, join, local_copy, subdirectories_with
from serving.errors import ApiError

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
log = logging.getLogger("earwitness.adapters")
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,47}$")
BASE = "base"
DEFAULT = "default"


class UnknownModel(KeyError):
    pass


class BadAdapter(ValueError):
    """An adapter that cannot be applied to the served model; the message says why (no paths in it)."""


@dataclass(frozen=True)
class Catalog:
    """What one deployment serves: a model name, its default adapter (or None) and named adapters."""

    model: str
    default: str | None = None  # adapter name the bare model id uses
    paths: dict[str, str] = field(default_factory=dict)  # adapter name -> directory or URI
    store: str | None = None  # directory or URI holding more adapters as <store>/<name>, found when asked for

    @classmethod
    def build(cls, model: str, shipped: dict[str, str], extra: dict[str, str], default_dir: str | None, store: str | None = None) -> "Catalog":
        """The model's shipped adapters, the settings' named ones, and the default (by directory)."""
        paths: dict[str, str] = {}
        for name, path in {**shipped, **extra}.items():
            if not ADAPTER_NAME.fullmatch(name) or name == BASE:
                raise ValueError(f"adapter name {name!r} must match {ADAPTER_NAME.pattern} and not be {BASE!r}")
            paths[name] = str(path)
        default = None
        if default_dir:
            default = next((n for n, p in paths.items() if _same_location(p, str(default_dir))), None)
            if default is None:
                default = DEFAULT if DEFAULT not in paths else "default-adapter"
                paths[default] = str(default_dir)
        return cls(model=model, default=default, paths=paths, store=store)

    @property
    def default_id(self) -> str:
        return self.model

    def ids(self, in_store: list[str] = ()) -> list[tuple[str, str | None]]:
        """``(model id, adapter name or None)`` for everything served, the default first; ``in_store``: the adapter
        names found in the adapter store (:func:`store_adapters`), listed after the configured ones."""
        out: list[tuple[str, str | None]] = [(self.model, self.default)]
        if self.default is not None:
            out.append((f"{self.model}:{BASE}", None))
        out += [(f"{self.model}:{name}", name) for name in sorted(self.paths) if name != self.default]
        out += [(f"{self.model}:{name}", name) for name in sorted(set(in_store)) if ADAPTER_NAME.fullmatch(name)
                and name not in self.paths and name != BASE]
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
        if suffix in self.paths or (self.store and ADAPTER_NAME.fullmatch(suffix)):
            return f"{self.model}:{suffix}", suffix
        raise UnknownModel(requested)

    def location(self, name: str) -> str:
        """Where adapter ``name`` is: its configured directory or URI, else ``<store>/<name>``."""
        if name in self.paths:
            return self.paths[name]
        if self.store and ADAPTER_NAME.fullmatch(name):
            return join(self.store, name)
        raise UnknownModel(name)

    def to_dict(self) -> dict:
        return {"model": self.model, "default": self.default, "paths": dict(self.paths), "store": self.store}

    @classmethod
    def from_dict(cls, data: dict) -> "Catalog":
        return cls(model=data["model"], default=data.get("default"), paths=dict(data.get("paths") or {}), store=data.get("store"))


def _same_location(a: str, b: str) -> bool:
    if is_uri(a) or is_uri(b):
        return a.rstrip("/") == b.rstrip("/")
    return Path(a).resolve() == Path(b).resolve()


def store_adapters(store: str, options: dict | None = None) -> list[str]:
    """The adapters in the adapter store now: its subdirectories holding an ``adapter_config.json``. An unreadable
    store lists none (logged): the models list must not fail because the store is down."""
    try:
        return subdirectories_with(store, "adapter_config.json", options)
    except StoreError as exc:
        log.warning("adapter store listing failed: %s", exc)
        return []


def fetch_adapter(name: str, location: str, options: dict | None = None) -> Path:
    """Adapter ``name``'s local directory (copied from the store once), or the client's error: 404 when nothing
    is there, 503 ``adapter_unavailable`` when the store cannot be read. Store locations stay out of messages."""
    try:
        path = local_copy(location, options)
    except NotInStore:
        path = None
    except StoreError as exc:
        log.warning("adapter %s: store read failed: %s", name, exc)
        raise ApiError(503, "adapter_unavailable", f"adapter {name!r} could not be read from the adapter store; retry shortly",
                       {"Retry-After": "5"}, param="model") from None
    if path is None or not path.exists():
        raise ApiError(404, "model_not_found", f"adapter {name!r} is not in the adapter store; see GET /v1/models", param="model")
    return path


def unavailable(name: str, reason: str) -> ApiError:
    """The 503 for an adapter that is there but cannot be served (the replica keeps serving the others)."""
    return ApiError(503, "adapter_unavailable", f"adapter {name!r} cannot be served: {reason}", param="model")


def lora_problem(path: Path, model=None) -> str | None:
    """Why the PEFT LoRA directory ``path`` cannot be applied (to ``model``, when given), or None.

    Read before anything is injected into the model: its config, its weights' header (a truncated or corrupt
    file fails here), and each tensor's shape against the module it adapts, so an adapter trained for another
    base is refused with the first module that does not fit rather than half-loaded.
    """
    try:
        config = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return "no readable adapter_config.json (not a PEFT adapter directory)"
    if str(config.get("peft_type", "")).upper() != "LORA":
        return f"peft_type {config.get('peft_type')!r} is not LORA"
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        return "no adapter_model.safetensors"
    from safetensors import safe_open

    try:
        with safe_open(str(weights), "pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception:  # noqa: BLE001 - safetensors raises several types for a damaged file
        return "adapter_model.safetensors is not a readable safetensors file"
    if model is None:
        return None
    return _shape_problem(shapes, _base_shapes(model))


def _base_shapes(model) -> dict[str, tuple[int, ...]]:
    """The base weights' shapes by the names PEFT saves them under (PEFT's own wrappers and LoRA tensors left out)."""

    out = {}
    for name, param in unwrap(model).named_parameters():
        if "lora_" in name or ".modules_to_save." in name:
            continue
        out[name.replace(".base_layer.", ".").replace(".original_module.", ".")] = tuple(param.shape)
    return out


def _shape_problem(adapter: dict[str, tuple[int, ...]], base: dict[str, tuple[int, ...]]) -> str | None:
    for key, shape in sorted(adapter.items()):
        name = key.removeprefix("base_model.model.")
        for part, axis, dim in ((".lora_A.weight", 1, 1), (".lora_B.weight", 0, 0)):
            if name.endswith(part):
                module = name[: -len(part)]
                target = base.get(module + ".weight")
                if target is None:
                    return f"it adapts {module}, which this model does not have (trained for another base?)"
                if shape[axis] != target[dim]:
                    return f"its LoRA for {module} expects {shape[axis]} features, the model has {target[dim]} (trained for another base)"
                break
        else:
            if "lora_" in name:
                continue  # a LoRA tensor of another kind (embedding, magnitude): PEFT checks it
            if name not in base:
                return f"it replaces {name}, which this model does not have (trained for another base?)"
            if shape != base[name]:
                return f"its {name} is {list(shape)}, the model's is {list(base[name])} (trained for another base)"
    return None


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
        """Load adapter ``path`` as ``name``; :class:`BadAdapter` (the model left as it was) when it cannot apply."""
        from peft import PeftModel

        with self.lock:
            if name in self.loaded:
                return
            model = self.backend.model
            problem = lora_problem(Path(path), model)
            if problem:
                raise BadAdapter(problem)
            try:
                if hasattr(model, "peft_config"):
                    self._merge(model, None)
                    model.load_adapter(path, adapter_name=name, is_trainable=False)
                else:
                    model = PeftModel.from_pretrained(model, path, adapter_name=name, is_trainable=False)
                    self.backend.model = model
            except Exception as exc:  # noqa: BLE001 - what the shape check could not see; take the half-load out
                if name in (getattr(model, "peft_config", None) or {}) and len(model.peft_config) > 1:
                    model.delete_adapter(name)
                raise BadAdapter(f"PEFT could not load it ({type(exc).__name__})") from exc
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
        self.backend.contrast.clear()
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
