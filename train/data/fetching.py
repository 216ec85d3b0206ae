"""Fetch the source packages: ``apt-get download`` into a cache and unpack (whole, or only the listed files).

Nothing here is committed audio: packages are downloaded at build time into a cache
(``$EARWITNESS_CACHE`` or ``~/.cache/earwitness``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from models.cache import cache_dir
from train.data.sources import EXTRA_PACKAGES, PACKAGES, package_files


class FetchError(RuntimeError):
    """A package could not be downloaded or unpacked."""


# --------------------------------------------------------------------------- fetching


def _apt_download(pkg: str, debs: Path) -> None:
    result = subprocess.run(["apt-get", "download", pkg], cwd=debs, capture_output=True, text=True)
    if result.returncode != 0:
        raise FetchError(f"apt-get download {pkg} failed: {result.stderr.strip()[-400:]}")


def _find_deb(pkg: str, debs: Path) -> Path | None:
    found = sorted(debs.glob(f"{pkg}_*.deb"))
    return found[-1] if found else None


def fetch_package(pkg: str, cache: Path | None = None, files: Sequence[str] | None = None) -> Path:
    """Download (``apt-get download``) and unpack (``dpkg-deb -x``) one package; return its root.

    With ``files`` (paths inside the package), only those are unpacked: a game's 1.4 GB package
    may hold 60 MB of the sounds the corpus uses. Idempotent: a finished unpack leaves a
    ``.complete`` marker (listing what was unpacked) and is reused while it covers ``files``.
    """
    if pkg not in PACKAGES:
        raise FetchError(f"{pkg} is not one of the project's source packages")
    cache = cache or cache_dir()
    root = cache / "unpacked" / pkg
    if _unpacked_covers(root, files):
        return root
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    deb = _find_deb(pkg, debs)
    if deb is None:
        if shutil.which("apt-get") is None:
            raise FetchError("apt-get is not available on this machine")
        try:
            _apt_download(pkg, debs)
        except FetchError:
            if os.geteuid() != 0:
                raise
            subprocess.run(["apt-get", "update"], capture_output=True, check=False)  # stale or empty lists
            _apt_download(pkg, debs)
        deb = _find_deb(pkg, debs)
        if deb is None:
            raise FetchError(f"apt-get download {pkg} produced no .deb")
    tmp = Path(tempfile.mkdtemp(prefix=f".{pkg}-", dir=cache / "debs"))
    try:
        _unpack(deb, tmp, files)
        if root.exists():
            shutil.rmtree(root)
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(root)
    except (subprocess.CalledProcessError, OSError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FetchError(f"could not unpack {deb.name}: {exc}") from exc
    (root / ".complete").write_text(deb.name + "\n" + "".join(f"{f}\n" for f in sorted(set(files or ()))))
    return root


def _unpacked_covers(root: Path, files: Sequence[str] | None) -> bool:
    """Whether a finished unpack holds ``files`` (a whole unpack, listing none, holds everything)."""
    marker = root / ".complete"
    if not marker.exists():
        return False
    listed = marker.read_text().splitlines()[1:]
    return not listed or (files is not None and set(files) <= set(listed))


def _unpack(deb: Path, into: Path, files: Sequence[str] | None) -> None:
    """``dpkg-deb -x``, or only ``files`` out of the package's data tarball."""
    if not files:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(into)], check=True, capture_output=True)
        return
    members = into / ".members"
    members.write_text("".join(f"./{f.lstrip('/')}\n" for f in sorted(set(files))))
    try:
        subprocess.run(["bash", "-o", "pipefail", "-c", 'dpkg-deb --fsys-tarfile "$0" | tar -x -C "$1" -T "$2"',
                        str(deb), str(into), str(members)], check=True, capture_output=True)
    finally:
        members.unlink(missing_ok=True)


def fetch(packages: Iterable[str] = PACKAGES, cache: Path | None = None, progress: bool = False) -> tuple[dict[str, Path], dict[str, str]]:
    """Fetch several packages; failures are returned (package → reason), never raised.

    Extra packages unpack only the files their table lists; core packages unpack whole (GCompris'
    bundles are found by scanning).
    """
    from tqdm import tqdm

    roots: dict[str, Path] = {}
    failed: dict[str, str] = {}
    needed = package_files()
    for pkg in tqdm(list(packages), desc="fetch packages", unit="pkg", disable=not progress):
        try:
            roots[pkg] = fetch_package(pkg, cache, needed.get(pkg) if pkg in EXTRA_PACKAGES else None)
        except FetchError as exc:
            failed[pkg] = str(exc)
    return roots, failed
