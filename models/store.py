"""Weights and adapters from a store: a local path, or a URI (``s3://``, ``gs://``, ``hf://``, ``file://``…) that
fsspec opens, copied once into a local cache that the loaders then read as a directory.

Why a copy: transformers, PEFT and vLLM read directories. A URI's copy lives under
``<cache>/store/<name>-<fingerprint>``, where the fingerprint hashes the URI and the remote listing (relative
paths, sizes and ETags or modification times), so a second replica, pod or process on the same cache finds it
and downloads nothing, and a new version written at the same URI gets a new directory. A copy appears whole or
not at all: it is downloaded into a temporary directory beside it and renamed into place (``rename`` is atomic on
one file system), so a reader never sees half of one and two replicas racing each keep a complete copy.

Which protocols work is fsspec's registry: ``file://`` and ``memory://`` always, ``hf://`` with huggingface_hub,
``s3://`` with s3fs, ``gs://`` with gcsfs (the GPU image installs s3fs). ``options`` are fsspec storage options
per protocol (``{"s3": {"endpoint_url": ...}}``: the setting ``store_options``), e.g. an S3-compatible endpoint;
credentials come from the environment as each library reads them (AWS_*, a pod's service account).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path

from models.cache import cache_dir

log = logging.getLogger("earwitness.store")
URI = re.compile(r"^([a-z][a-z0-9+.-]*)://", re.IGNORECASE)
COMPLETE = ".earwitness-store.json"  # written last inside a copy: what it was copied from
VERSION_KEYS = ("ETag", "etag", "blob_id", "md5Hash", "mtime", "LastModified", "updated")  # S3, HF, GCS, local: a file's version


class StoreError(RuntimeError):
    """A URI that cannot be copied: nothing there, no access, or no fsspec implementation of its protocol."""


class NotInStore(StoreError):
    """Nothing at the URI."""


def is_uri(location: str | os.PathLike) -> bool:
    return bool(URI.match(str(location)))


def join(base: str, name: str) -> str:
    """``base``/``name`` for a URI or a local directory."""
    return f"{base.rstrip('/')}/{name}" if is_uri(base) else str(Path(base) / name)


def store_cache() -> Path:
    """Where URI copies live: ``$EARWITNESS_STORE_CACHE`` (a volume that outlives pods), else the package cache."""
    return Path(os.environ.get("EARWITNESS_STORE_CACHE") or cache_dir() / "store")


def _filesystem(uri: str, options: dict | None):
    import fsspec

    protocol = URI.match(uri).group(1).lower()
    try:
        return fsspec.core.url_to_fs(uri, **dict((options or {}).get(protocol, {})))
    except (ImportError, ValueError) as exc:  # fsspec: "Install s3fs to access S3", "Protocol not known: x"
        raise StoreError(f"{uri}: cannot open {protocol}:// ({exc})") from exc


def subdirectories_with(location: str, marker: str, options: dict | None = None) -> list[str]:
    """Names of ``location``'s subdirectories that hold a file ``marker`` (a directory or a URI; one listing call on a
    store). Nothing there is an empty list; an unreadable store a :class:`StoreError`."""
    if not is_uri(location):
        return sorted(p.parent.name for p in Path(location).glob(f"*/{glob.escape(marker)}") if p.is_file())
    fs, root = _filesystem(location, options)
    try:
        fs.invalidate_cache(root)  # fsspec keeps listings per filesystem instance: a rollout since the last one must show
        found = fs.glob(f"{root.rstrip('/')}/*/{marker}")
    except FileNotFoundError:
        return []
    except (PermissionError, OSError) as exc:
        raise StoreError(f"{location}: cannot list ({exc})") from exc
    return sorted(p.rstrip("/").split("/")[-2] for p in found)


def _listing(fs, root: str) -> dict[str, dict]:
    """Relative path -> fsspec info of every file under ``root`` (one entry, '', for a single file)."""
    try:
        if fs.isfile(root):
            return {"": fs.info(root)}
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        found = {}
    except PermissionError as exc:
        raise StoreError(f"{root}: access denied ({exc})") from exc
    base = root.rstrip("/")
    return {path[len(base) + 1 :]: info for path, info in found.items() if info.get("type") != "directory"}


def _fingerprint(uri: str, listing: dict[str, dict]) -> str:
    entries = sorted(
        (rel, int(info.get("size") or 0), str(next((info[k] for k in VERSION_KEYS if info.get(k)), "")))
        for rel, info in listing.items()
    )
    return hashlib.sha256(json.dumps([uri, entries]).encode()).hexdigest()[:16]


def _kept_copy(cache: Path, name: str, location: str) -> Path | None:
    """The newest complete copy of ``location`` in ``cache``, or None."""
    copies = []
    for marker in cache.glob(f"{glob.escape(name)}-*/{COMPLETE}"):
        try:
            if json.loads(marker.read_text()).get("uri") == location:
                copies.append(marker.parent)
        except (OSError, ValueError):
            continue
    return max(copies, key=lambda p: (p / COMPLETE).stat().st_mtime, default=None)


def local_copy(location: str | os.PathLike, options: dict | None = None, cache: Path | None = None) -> Path:
    """A local directory (or file) holding what ``location`` names: the path itself, or its cached copy.

    Raises :class:`NotInStore` when a URI names nothing, :class:`StoreError` when it cannot be read.
    """
    location = str(location)
    if not is_uri(location):
        return Path(location).expanduser()
    if location.lower().startswith("file://"):
        return Path(location[len("file://") :])
    fs, root = _filesystem(location, options)
    name = re.sub(r"[^A-Za-z0-9._-]", "_", root.rstrip("/").rsplit("/", 1)[-1])[:48] or "root"
    cache = cache or store_cache()
    try:
        listing = _listing(fs, root)
    except Exception as exc:  # noqa: BLE001 - the store unreachable (each library its own errors): a kept copy serves
        kept = _kept_copy(cache, name, location)
        if kept is None:
            raise StoreError(f"{location}: {exc}") from exc
        log.warning("%s unreachable (%s); serving the copy kept at %s", location, exc, kept)
        return kept
    if not listing:
        raise NotInStore(f"{location}: nothing there")
    target = cache / f"{name}-{_fingerprint(location, listing)}"
    if (target / COMPLETE).is_file() or (target.is_file()):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".partial-{target.name}-{uuid.uuid4().hex[:8]}"
    try:
        if "" in listing:  # a single file
            fs.get_file(root, str(staging))
        else:
            for rel in listing:
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            # one call for all files: the async stores (s3fs, gcsfs, hf) fetch them concurrently
            fs.get([f"{root.rstrip('/')}/{rel}" for rel in listing], [str(staging / rel) for rel in listing])
            (staging / COMPLETE).write_text(json.dumps({"uri": location, "files": len(listing)}))
        try:
            os.rename(staging, target)
        except OSError:  # another process put a complete copy there first
            if not ((target / COMPLETE).is_file() or target.is_file()):
                raise
    except FileNotFoundError as exc:
        raise NotInStore(f"{location}: {exc}") from exc
    except PermissionError as exc:
        raise StoreError(f"{location}: access denied ({exc})") from exc
    finally:
        if staging.is_dir():
            shutil.rmtree(staging, ignore_errors=True)
        elif staging.exists():
            staging.unlink()
    return target


def publish(directory: str | os.PathLike, uri: str, options: dict | None = None, last: tuple[str, ...] = ()) -> str:
    """Copy a local directory (a trained adapter, a stage) to ``uri``, where an ``adapter_store``, ``model_source`` or a
    later stage reads it; a local ``uri`` is a plain directory copy.

    ``last``: top-level file names uploaded after everything else, and removed from ``uri`` before anything is: a
    stage's ``stage.json``, so that a reader who finds it finds the whole stage (a store has no rename to make a
    directory appear at once)."""
    directory = Path(directory)
    if not is_uri(uri):
        shutil.copytree(directory, uri, dirs_exist_ok=True)
        return str(uri)
    fs, root = _filesystem(uri, options)
    root = root.rstrip("/")
    for name in last:
        if fs.exists(f"{root}/{name}"):
            fs.rm_file(f"{root}/{name}")
    files = sorted((p for p in directory.rglob("*") if p.is_file()), key=lambda p: (p.relative_to(directory).as_posix() in last, str(p)))
    for path in files:
        fs.put_file(str(path), f"{root}/{path.relative_to(directory).as_posix()}")
    fs.invalidate_cache()
    return uri


def work_dir(uri: str) -> Path:
    """The local directory in which an output bound for ``uri`` is written before :func:`publish` uploads it; named by
    the URI, so a run resumed on the same cache volume finds its checkpoints there."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", uri.rstrip("/").rsplit("/", 1)[-1])[:48] or "root"
    return store_cache() / "outputs" / f"{name}-{hashlib.sha256(uri.encode()).hexdigest()[:12]}"


def environment_options() -> dict:
    """fsspec storage options from ``$EARWITNESS_STORE_OPTIONS`` (JSON per protocol), the variable the served settings'
    ``store_options`` read too: the commands reach the store that serving reads."""
    return json.loads(os.environ.get("EARWITNESS_STORE_OPTIONS") or "{}")


def main(argv: list[str] | None = None) -> int:
    """``python -m models.store URI [--options JSON]``: copy URI into the store cache and print where (the cache
    Job of k8s/ runs this once, so that replicas find the copy); options default to ``$EARWITNESS_STORE_OPTIONS``,
    which the served settings read too."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("uri")
    parser.add_argument("--options", default=None, help='fsspec storage options per protocol, JSON: {"s3": {"endpoint_url": "..."}}')
    args = parser.parse_args(argv)
    print(local_copy(args.uri, json.loads(args.options) if args.options else environment_options()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
