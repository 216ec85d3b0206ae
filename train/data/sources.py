"""The project's real sound sources: which Debian packages, which of their files, and what each one is.

The labelled file lists (``sources.csv``, ``extra_sources.csv``) are mapped to ontology classes by the
label rules; every clip keeps its package and path, and a group key that joins one recording's takes.
Fetching the packages is :mod:`train.data.fetching`, decoding them :mod:`train.data.decoding`, and the
split by recording :mod:`train.data.splits`.
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from train.data.archives import archive_file, is_archived
from train.data.ontology import DATA_DIR, load_ontology

#: The core Debian sound sources (their files are listed in ``train/data/sources.csv``).
CORE_PACKAGES: tuple[str, ...] = (
    "scratch", "tuxpaint-stamps-default", "qabcs-data", "gcompris-qt-data", "sonic-pi-samples",
    "hydrogen-drumkits", "lmms-common", "minetest-data", "scorched3d-data", "searchandrescue-data",
    "lincity-ng-data", "etw-data", "bucklespring-data", "lugaru-data", "triplea",
    "asterisk-core-sounds-en-wav", "ktuberling-data", "kajongg", "pocketsphinx-testdata",
    "sound-icons", "gnome-audio", "sound-theme-freedesktop",
)
#: More packages with labelled real recordings (``train/data/extra_sources.csv``); mostly games, so
#: some of their files sit inside the games' archives (``train.data.archives``).
EXTRA_PACKAGES: tuple[str, ...] = (
    "0ad-data", "7kaa-data", "ardentryst", "bambam", "berusky2-data", "brainparty-data", "btanks-data",
    "castle-game-engine-doc", "caveexpress-data", "circuslinux-data", "clanlib-doc", "crossfire-client",
    "dustracing2d-data", "flare-game", "foobillardplus-data", "freedink-data", "frozen-bubble-data",
    "gambas3-examples", "gemdropx", "gl-117-data", "gnome-shell-pomodoro-data", "hannah-data",
    "libreoffice-common", "madbomber-data", "micropolis-data", "minetest-mod-unified-inventory",
    "mirrormagic-data", "netpanzer-data", "open-invaders-data", "openclonk-data", "openttd-opensfx",
    "orage-data", "pangzero", "pekka-kana-2-data", "plee-the-bear-data", "redeclipse-data",
    "simutrans-pak64", "supertux-data", "supertuxkart-data", "trackballs-data", "trophy-data", "tuxfootball",
    "tuxmath-data", "ufoai-sound", "ukui-media", "wx3.2-examples", "xboard", "xemacs21-basesupport",
)
#: Every package the project may use (the project's list of Debian sound sources); nothing else is fetched.
PACKAGES: tuple[str, ...] = CORE_PACKAGES + EXTRA_PACKAGES
#: The labelled file lists, one per group of packages.
SOURCE_TABLES: tuple[Path, ...] = (DATA_DIR / "sources.csv", DATA_DIR / "extra_sources.csv")
#: A few tens of MB that still cover a dozen classes; used by the tests.
SMALL_PACKAGES: tuple[str, ...] = ("minetest-data", "bucklespring-data", "scratch", "openttd-opensfx")


@dataclass(frozen=True)
class SourceClip:
    """A labelled source recording; ``id`` is stable across builds (derived from package+path)."""

    id: str
    label: str
    kind: str
    package: str
    path: str
    group: str


def clip_id(package: str, path: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9]+", "_", Path(path.removeprefix("rcc:")).stem).strip("_")[:32]
    return f"{package}.{stem}.{hashlib.sha1(f'{package}:{path}'.encode()).hexdigest()[:8]}"


_VARIANT_TOKENS = re.compile(
    r"(?:^|_)(?:cut|la|lr|soft|softest|hard|hardest|med|medium|hi|lo|mid|low|high|left|right|open|close|closed|short|long|old|v)(?=_|$)"
)


def recording_group(package: str, path: str) -> str:
    """Group key for near-duplicates: package + directory + stem without digits/variant words.

    ``bd_01``/``bd_02`` velocity layers, ``door_open``/``door_close`` takes and
    ``Water1..5`` loops of one recording session all land in one group, hence one split.
    """
    if path.startswith("cat:"):  # a sound catalogue: each entry is its own recording
        return f"{package}:{path}"
    p = path.split(":", 1)[1] if path.startswith("rcc:") or is_archived(path) else path  # the path without its kind
    stem = Path(p).stem.lower()
    # hex-coded take names ("6b-0", "1d-1": one keyboard's keys) are numbers too
    stem = re.sub(r"(?<![a-z0-9])(?=[a-f]*[0-9])[0-9a-f]+(?![a-z0-9])", "", stem)
    stem = re.sub(r"[0-9]+", "", stem)
    stem = re.sub(r"[^a-z]+", "_", stem).strip("_")
    stem = _VARIANT_TOKENS.sub("", stem).strip("_")
    return f"{package}:{Path(p).parent}:{stem}"


@dataclass(frozen=True)
class _Rule:
    csv_label: str
    pattern: re.Pattern | None
    target: str | None
    note: str


def _load_rules(path: Path = DATA_DIR / "label_rules.csv") -> list[_Rule]:
    with path.open(newline="", encoding="utf-8") as fh:
        return [
            _Rule(r["csv_label"], re.compile(r["path_regex"], re.I) if r["path_regex"] else None,
                  None if r["class"] == "-" else r["class"], r["note"])
            for r in csv.DictReader(fh)
        ]


def apply_label_rules(csv_label: str, path: str, rules: Sequence[_Rule]) -> tuple[str | None, str]:
    """Map a file-list label + path to an ontology class (or None with the reason it is excluded)."""
    for rule in rules:
        if rule.csv_label == csv_label and (rule.pattern is None or rule.pattern.search(path)):
            return rule.target, rule.note or "excluded by label rule"
    return None, f"no label rule for {csv_label!r}"


def table_rows(tables: Sequence[Path] = SOURCE_TABLES) -> Iterable[dict]:
    for table in tables:
        with table.open(newline="", encoding="utf-8") as fh:
            yield from csv.DictReader(fh)


def package_files(tables: Sequence[Path] = SOURCE_TABLES) -> dict[str, list[str]]:
    """Package → the files (archives for archived members) its rows need unpacked."""
    out: dict[str, set[str]] = defaultdict(set)
    for row in table_rows(tables):
        if not row["path"].startswith("rcc:"):
            out[row["package"]].add(archive_file(row["path"]).lstrip("/"))
    return {k: sorted(v) for k, v in out.items()}


def labelled_sources(packages: Iterable[str] = PACKAGES, tables: Sequence[Path] = SOURCE_TABLES) -> tuple[list[SourceClip], Counter]:
    """Project-owned labelled file lists (``sources.csv``: a trimmed, speech-balanced copy of the core
    list; ``extra_sources.csv``: more packages), mapped to ontology classes by the label rules.

    Returns the clips and a counter of excluded rows by reason.
    """
    wanted = set(packages)
    rules = _load_rules()
    onto = load_ontology()
    clips: list[SourceClip] = []
    excluded: Counter = Counter()
    for row in table_rows(tables):
        if row["package"] not in wanted:
            continue
        label, why = apply_label_rules(row["label"], row["path"], rules)
        if label is None:
            excluded[f"label rule: {why}"] += 1
            continue
        if label not in onto:
            excluded[f"label {label!r} not in ontology"] += 1
            continue
        clips.append(SourceClip(clip_id(row["package"], row["path"]), label, onto[label].kind,
                                row["package"], row["path"], recording_group(row["package"], row["path"])))
    return clips, excluded
