"""Where each pretrained part comes from, for model cards: wheel, version, hash, licence, upstream model."""

from __future__ import annotations

from collections.abc import Iterable

from models.pretrained.parts import PARTS, part


def provenance(name: str) -> dict:
    """The part's upstream model and licence, and every wheel (with its pinned hash) and file it is built from."""
    p = part(name)
    return {
        "part": p.name,
        "original_model": p.original,
        "licence": p.licence,
        "wheels": [
            {"package": w.package, "version": w.version, "sha256": w.sha256, "licence": w.licence, "homepage": w.homepage}
            for w in p.wheels()
        ],
        "files": {role: [f"{pkg}:{member}" for pkg, member in members] for role, members in p.files.items()},
    }


def provenance_markdown(names: Iterable[str] | None = None) -> str:
    """A markdown table of the parts' provenance (all known parts by default)."""
    rows = ["| part | original model | licence | wheel (PyPI) | sha256 |", "| --- | --- | --- | --- | --- |"]
    for name in names if names is not None else PARTS:
        info = provenance(name)
        for w in info["wheels"]:
            rows.append(f"| {name} | `{info['original_model']}` | {info['licence']} | "
                        f"`{w['package']}=={w['version']}` ({w['licence']}) | `{w['sha256']}` |")
    return "\n".join(rows) + "\n"
