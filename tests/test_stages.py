"""Training stages as commands over directories, on tiny random configs of both production architectures.

* LISTEN on Qwen2-Audio and on the Qwen2.5-Omni thinker trains the audio adapter and nothing else; DPO over it trains
  LoRA r=16, α=32 on the language model alone, and its adapter carries LISTEN's audio adapter.
* The stage chain on earwitness-tiny, as ``train recipe`` runs it: ``train base`` → ``train listen`` → ``train dpo`` →
  ``export --merge``, each evaluated (``eval``), each writing ``stage.json`` that names its input by the previous
  stage's fingerprint, finished stages skipped on a rerun.
* Its DPO stage again on a real S3 server (moto): ``--from``, ``--corpus`` and ``--out`` store URIs, the adapter
  published into an adapter store there, ``eval`` and ``export --merge`` of the stage's URI; the Serve app serves that
  adapter from the store and answers as it does in process. A store URI holding no finished stage, or no corpus, is
  refused.
* ``--resume`` after a SIGINT reaches the adapter of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.families import audio_adapter_modules, language_model_prefix
from tests.conftest import S3_BUCKET, drop_served_copies
from tests.test_dpo import BUILDERS, NO, QUESTION, TONE_A, TONE_Q, YES, _clips
from tests.test_formats import user_datasets  # noqa: F401 - a fixture: a user's AudioCaps and Clotho directories
from train.dpo import AudioDPOConfig, train_dpo
from train.listen import ListenConfig, apply_audio_adapter, train_listen
from train.options import last_checkpoint
from train.stages import STAGE_FILE, fingerprint, stage_fingerprint

ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(tensorboard=False, logging_steps=1, seed=0)


def _in_adapter(name: str, modules: list[str]) -> bool:
    return any(f".{m}." in f".{name}" for m in modules)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_listen_trains_the_audio_adapter_then_dpo_the_language_model(family, tmp_path):
    import copy

    from datasets import Dataset

    processor, model = BUILDERS[family]()
    clips = {k: str(tmp_path / v) for k, v in _clips(tmp_path).items()}
    rows = Dataset.from_list([dict(prompt=QUESTION, chosen=NO, audio=clips["tone"]), dict(prompt=TONE_Q, chosen=TONE_A, audio=clips["tone"]),
                              dict(prompt=QUESTION, chosen=NO, audio=clips["chirp"])])
    untouched, modules = copy.deepcopy(model), audio_adapter_modules(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    listen_config = ListenConfig(max_steps=2, batch_size=3, learning_rate=5e-2, dataloader_num_workers=2, **QUIET)  # decoded in workers
    listen_dir = train_listen(model, processor, rows, tmp_path / "listen", listen_config)
    listened = apply_audio_adapter(copy.deepcopy(untouched), listen_dir)
    changed = {k for k, v in listened.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(_in_adapter(k, modules) for k in changed), sorted(changed)[:5]
    assert json.loads((listen_dir / "earwitness_listen.json").read_text())["trained"] == modules

    pairs = Dataset.from_list([dict(prompt=QUESTION, chosen=NO, rejected=YES, audio=clips["tone"], rejected_audio=None),
                               dict(prompt=TONE_Q, chosen=TONE_A, rejected=TONE_A, audio=clips["tone"], rejected_audio=clips["noise"])])
    adapter_before = {k: v.clone() for k, v in listened.state_dict().items() if _in_adapter(k, modules)}
    config = AudioDPOConfig(lora_r=16, lora_alpha=32, lora_dropout=0.0, modules_to_save=modules, train_saved_modules=False,
                            max_steps=2, batch_size=2, learning_rate=2e-2, **QUIET)
    dpo_dir = train_dpo(listened, processor, pairs, tmp_path / "dpo", config)
    saved = load_file(dpo_dir / "adapter_model.safetensors")
    adapter_config = json.loads((dpo_dir / "adapter_config.json").read_text())
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (16, 32)
    lm = language_model_prefix(untouched)
    lora = {k: v for k, v in saved.items() if "lora_" in k}
    assert lora and all(f".{lm}.layers." in k for k in lora), "LoRA outside the language model"
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k), "LoRA did not train"

    served = apply_audio_adapter(copy.deepcopy(untouched), dpo_dir)  # the DPO adapter carries LISTEN's audio adapter, as trained
    for key, value in adapter_before.items():
        assert torch.equal(served.state_dict()[key], value), key


# ------------------------------------------------------------------------------------------ the chain on earwitness-tiny


def _cli(*argv: str) -> None:
    from earwitness.cli import main

    assert main(list(argv)) == 0


STEPS = ("--max-steps", "2", "--batch-size", "2", "--logging-steps", "1", "--learning-rate", "1e-2")


@pytest.fixture(scope="module")
def chain(corpus, tmp_path_factory):
    """``earwitness train recipe --model tiny``'s loop, each stage cut short: base → eval → listen → eval → dpo → eval →
    export, each a command over the previous stage's directory."""
    from earwitness.cli import main
    from train.recipe import run_recipe

    root = tmp_path_factory.mktemp("chain")
    started = time.time()
    evals = ("--presence-per-sampling", "2")
    extra = {"base": ("--epochs", "0.5"), "listen": ("--max-rows", "16", *STEPS),
             "dpo": ("--pairs-per-kind", "1", "--save-steps", "1", *STEPS), "eval-base": evals, "eval-listen": evals, "eval-dpo": evals}
    ran = []
    run_recipe("tiny", corpus, root, extra=extra, run=lambda argv: (ran.append(argv[:2]), main(list(argv))))
    seconds = time.time() - started
    run_recipe("tiny", corpus, root, extra=extra, run=lambda argv: ran.append(argv[:2]))  # a finished recipe: every stage skipped
    return root, seconds, ran


@pytest.mark.slow
def test_stage_chain_writes_stage_records_that_chain(chain, corpus):
    root, seconds, ran = chain
    print(f"recipe base -> eval -> listen -> eval -> dpo -> eval -> export: {seconds:.0f} s")
    assert len(ran) == 7, ran
    records = {d: json.loads((root / d / STAGE_FILE).read_text()) for d in ("base", "eval-base", "listen", "eval-listen", "dpo", "eval-dpo", "export")}
    for stage, previous in (("eval-base", "base"), ("listen", "base"), ("eval-listen", "listen"), ("dpo", "listen"), ("eval-dpo", "dpo"),
                            ("export", "dpo")):
        assert records[stage]["input"]["fingerprint"] == stage_fingerprint(root / previous), (stage, previous)
    base, listen, dpo, evaluated, merged = (records[d] for d in ("base", "listen", "dpo", "eval-dpo", "export"))
    assert base["input"] is None and base["config"]["samplings"] == ["positive"] and base["metrics"]["steps"] > 0
    assert listen["input"]["base"]["name"] == "base" and listen["input"]["adapter"] is None
    assert dpo["input"]["fingerprint"] == fingerprint([root / "listen" / STAGE_FILE, *(root / "listen" / "adapter").glob("adapter_*")])
    assert dpo["corpus"]["fingerprint"] == listen["corpus"]["fingerprint"] == base["corpus"]["fingerprint"] and dpo["config"]["lora_r"] == 16
    assert dpo["config_help"]["beta"].startswith("DPO β") and dpo["versions"]["trl"] and dpo["wall_s"] > 0
    assert dpo["metrics"]["steps"] == 2 and "rewards/accuracies" in dpo["metrics"]
    assert (root / "dpo" / "checkpoint-1" / "optimizer.pt").exists() and (root / "dpo" / "checkpoint-1" / "rng_state.pth").exists()
    assert list((root / "dpo" / "runs").rglob("events.out.tfevents.*")) and list((root / "eval-dpo" / "runs").rglob("events.out.tfevents.*"))
    assert 0.0 <= evaluated["metrics"]["presence_accuracy"] <= 1.0 and evaluated["input"]["adapter"].endswith("adapter")
    assert (root / "export" / "model.safetensors").exists() and merged["adapter"] == str(root / "dpo" / "adapter")
    gathered = json.loads((root / "results.json").read_text())
    assert list(gathered["results"]) == ["baseline (positive-only)", "+ LISTEN", "+ DPO (shipped)"]
    assert gathered["stages"]["dpo"]["input"] == dpo["input"]["fingerprint"]


RUNS = f"s3://{S3_BUCKET}/runs"  # the stages' outputs
ADAPTER_STORE = f"s3://{S3_BUCKET}/adapters/base"  # where serving reads the chain's base model's adapters by name


def upload_dir(fs, local: Path, key: str) -> str:
    """``local`` written file by file under ``s3://earwitness/<key>/``; returns its URI."""
    files = sorted(p for p in local.rglob("*") if p.is_file())
    fs.put([str(p) for p in files], [f"{S3_BUCKET}/{key}/{p.relative_to(local).as_posix()}" for p in files])
    fs.invalidate_cache()
    return f"s3://{S3_BUCKET}/{key}"


@pytest.fixture(scope="module")
def chain_on_s3(chain, corpus, s3, tmp_path_factory):
    """The chain's DPO stage again with its corpus and its input (the LISTEN stage) read from and its outputs written to
    S3, then ``eval`` and ``export --merge`` of it there; returns a local copy of the outputs and the commands' time."""
    from models.store import local_copy

    fs, options = s3
    corpus_uri = upload_dir(fs, corpus, "corpus")
    upload_dir(fs, chain[0] / "listen", "runs/listen")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("EARWITNESS_STORE_OPTIONS", json.dumps(options))
        env.setenv("EARWITNESS_STORE_CACHE", str(tmp_path_factory.mktemp("store")))
        started = time.time()
        _cli("train", "dpo", "--from", f"{RUNS}/listen", "--corpus", corpus_uri, "--out", f"{RUNS}/dpo", "--pairs-per-kind", "1",
             "--save-steps", "1", "--publish", f"{ADAPTER_STORE}/dpo", *STEPS)
        _cli("eval", "--model", f"{RUNS}/dpo", "--corpus", corpus_uri, "--presence-per-sampling", "2")
        _cli("export", "--merge", "--model", f"{RUNS}/dpo", "--out", f"{RUNS}/merged")
        seconds = time.time() - started
    return local_copy(RUNS, options, cache=tmp_path_factory.mktemp("downloaded")), seconds


@pytest.mark.slow
def test_stages_read_and_write_store_uris(chain, chain_on_s3):
    """``stage.json`` names the URIs; the input stage and the corpus copied from S3 have the fingerprints of the local
    ones; the eval and the merged export land beside the stage at its URI."""
    root, _, _ = chain
    copy, seconds = chain_on_s3
    print(f"train dpo -> eval -> export --merge on S3: {seconds:.0f} s")
    dpo, evaluated, merged = (json.loads((copy / d / STAGE_FILE).read_text()) for d in ("dpo", "dpo/eval", "merged"))
    local = json.loads((root / "dpo" / STAGE_FILE).read_text())
    assert dpo["input"]["from"] == f"{RUNS}/listen" and dpo["input"]["fingerprint"] == stage_fingerprint(root / "listen")
    assert dpo["corpus"] == {"path": f"s3://{S3_BUCKET}/corpus", "fingerprint": local["corpus"]["fingerprint"]} == evaluated["corpus"]
    assert dpo["metrics"]["steps"] == 2 and dpo["metrics"]["published"] == f"{ADAPTER_STORE}/dpo"
    assert (copy / "dpo" / "checkpoint-1" / "optimizer.pt").exists() and list((copy / "dpo" / "runs").rglob("events.out.tfevents.*"))
    assert evaluated["input"]["from"] == f"{RUNS}/dpo" and 0.0 <= evaluated["metrics"]["presence_accuracy"] <= 1.0
    assert merged["input"]["fingerprint"] == stage_fingerprint(copy / "dpo") and (copy / "merged" / "model.safetensors").exists()


@pytest.mark.slow
def test_served_stage_adapter_answers_as_in_process(chain, chain_on_s3, server, s3):
    """The DPO stage's adapter, published to an adapter store, is served as ``base:dpo`` by an app whose ``adapter_store``
    is that store, and answers as the adapter does in process."""
    import httpx

    from models.registry import resolve
    from serving.backends.base import AudioPrompt
    from serving.backends.hf import TransformersBackend
    from tests.helpers import encode, tone
    from tests.test_ops_variants import variant_app

    model, adapter = str(chain[0] / "base"), str(chain_on_s3[0] / "dpo" / "adapter")
    clip = tone(2.0, 16_000, 1)
    try:
        with variant_app(server, "stagechain", model=model, adapter_store=ADAPTER_STORE, store_options=s3[1]) as base:
            reply = httpx.post(f"{base}/v1/audio/qa", files={"file": ("clip.wav", encode(clip, 16_000, "wav"))},
                               data={"question": QUESTION, "guard": "off", "max_tokens": "8", "model": "base:dpo"}, timeout=60)
    finally:
        drop_served_copies(ADAPTER_STORE)
    assert reply.status_code == 200, reply.text
    local = TransformersBackend.load(resolve(model), adapter=adapter, device="cpu")
    assert reply.json()["answer"] == local.generate([AudioPrompt(clip, QUESTION, 8)])[0].text


@pytest.mark.slow
def test_stage_commands_on_a_local_omni_checkpoint(user_datasets, tmp_path):
    """``--from DIR`` of a saved Omni thinker: read with its audio-only processor (no torchvision), LISTEN trains its
    ``audio_tower.proj``, and DPO over it carries that; the corpus is a user's AudioCaps and Clotho (``data import``)."""
    caps, clotho = user_datasets
    corpus = tmp_path / "imported"
    _cli("data", "import", "--audiocaps", str(caps), "--clotho", str(clotho), "--out", str(corpus))
    processor, model = BUILDERS["qwen2.5-omni-thinker"]()
    processor.save_pretrained(tmp_path / "omni")
    model.save_pretrained(tmp_path / "omni")
    one = ("--max-steps", "1", "--batch-size", "2", "--no-tensorboard")
    _cli("train", "listen", "--from", str(tmp_path / "omni"), "--corpus", str(corpus), "--out", str(tmp_path / "listen"), "--max-rows", "4", *one)
    _cli("train", "dpo", "--from", str(tmp_path / "listen"), "--corpus", str(corpus), "--out", str(tmp_path / "dpo"), "--pairs-per-kind", "1", *one)
    record = json.loads((tmp_path / "dpo" / STAGE_FILE).read_text())
    assert record["input"]["base"]["family"] == "qwen2.5-omni-thinker"
    listened, aligned = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("listen", "dpo"))
    carried = [k for k in aligned if "audio_tower.proj" in k]
    assert carried and all(torch.equal(aligned[k], listened[k]) for k in carried)


# ------------------------------------------------------------------------------------------ --resume after SIGINT


RESUME_STEPS = 6


def _dpo_argv(source: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "dpo", "--from", str(source), "--corpus", str(corpus), "--out", str(out), "--pairs-per-kind", "2",
            "--max-steps", str(RESUME_STEPS), "--batch-size", "2", "--save-steps", "1", "--lora-dropout", "0", "--learning-rate", "1e-2",
            "--no-tensorboard", *extra]


def _newest_whole_checkpoint_step(out: Path) -> int | None:
    """The step of the newest ``checkpoint-N`` (the one ``--resume`` takes) once it holds its trainer state, which the
    trainer writes last; None before that."""
    newest = last_checkpoint(out)
    if newest is None:
        return None
    try:
        return json.loads((Path(newest) / "trainer_state.json").read_text())["global_step"]
    except (OSError, ValueError, KeyError):  # not yet written, or caught mid-write
        return None


def _interrupt_after_a_checkpoint(proc: subprocess.Popen, out: Path, timeout_s: float = 240) -> None:
    """SIGINT to a training run as soon as it has a whole checkpoint before its last step. The run is paused (SIGSTOP,
    as a terminal's Ctrl-Z) while its directory is looked at, and the SIGINT is sent before it continues: however
    loaded the machine, the run cannot move on between the look and the interrupt, nor be caught mid-checkpoint."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.monotonic() < deadline, f"no checkpoint after {timeout_s:.0f} s"
        proc.send_signal(signal.SIGSTOP)
        try:
            step = _newest_whole_checkpoint_step(out)
            if step is not None:
                assert step < RESUME_STEPS, "the run reached its last step before it could be interrupted"
                proc.send_signal(signal.SIGINT)  # pending until the run continues: the next thing it meets
                break
        finally:
            proc.send_signal(signal.SIGCONT)
        time.sleep(0.1)
    proc.wait(60)


@pytest.mark.slow
def test_resume_after_sigint_reaches_the_uninterrupted_adapter(tiny_checkpoint, corpus, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # Ctrl-C in a terminal: SIGINT's default action, whatever this process inherited (a shell starts a background
    # job, as a suite run under nohup or `&` is, with SIGINT ignored, and a Python started so never sees a SIGINT)
    proc = subprocess.Popen([sys.executable, "-m", "earwitness", *_dpo_argv(tiny_checkpoint, corpus, tmp_path / "cut")], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _interrupt_after_a_checkpoint(proc, tmp_path / "cut")
    assert proc.returncode != 0 and not (tmp_path / "cut" / "adapter").exists(), "the run finished before the interrupt"
    _cli(*_dpo_argv(tiny_checkpoint, corpus, tmp_path / "cut", "--resume"))
    _cli(*_dpo_argv(tiny_checkpoint, corpus, tmp_path / "whole"))
    cut, whole = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("cut", "whole"))
    assert cut.keys() == whole.keys()
    worst = max((cut[k] - whole[k]).abs().max().item() for k in cut)
    assert worst < 1e-5, f"resumed adapter differs by {worst:.2e}"
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "dpo_log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == RESUME_STEPS


# ------------------------------------------------------------------------------------------ streaming


def test_streamed_rows_are_the_rows_in_memory(corpus):
    """``--streaming`` reads the same LISTEN rows and DPO pairs as the in-memory path, lazily (IterableDataset)."""
    from collections import Counter

    from datasets import IterableDataset

    from train.listen import listen_rows
    from train.stages import preference_subset

    def rows(data) -> Counter:
        return Counter(tuple(str(r.get(k)) for k in ("prompt", "chosen", "rejected", "audio", "rejected_audio")) for r in data)

    streamed = listen_rows(corpus, "train", ListenConfig(streaming=True)), preference_subset(corpus, None, 0, streaming=True)
    memory = listen_rows(corpus, "train", ListenConfig()), preference_subset(corpus, None, 0)
    assert all(isinstance(d, IterableDataset) for d in streamed) and not any(isinstance(d, IterableDataset) for d in memory)
    for lazy, held in zip(streamed, memory):
        assert rows(lazy) == rows(held) and len(held) > 0


# ------------------------------------------------------------------------------------------ store URIs refused


def test_a_store_uri_without_a_finished_stage_or_a_corpus_is_refused(s3, tmp_path, monkeypatch):
    """An uploaded adapter without ``stage.json`` (a stage cut off before its upload finished) is no ``--from``, a
    prefix without ``report.json`` no ``--corpus``, and nothing at all says so; no output is written."""
    fs, options = s3
    monkeypatch.setenv("EARWITNESS_STORE_OPTIONS", json.dumps(options))
    monkeypatch.setenv("EARWITNESS_STORE_CACHE", str(tmp_path / "store"))
    upload_dir(fs, ROOT / "models" / "earwitness-tiny" / "adapter", "half/adapter")
    out = f"s3://{S3_BUCKET}/refused/out"
    for source, corpus, message in ((f"s3://{S3_BUCKET}/half", "data/corpus", "neither a finished stage"),
                                    (f"s3://{S3_BUCKET}/none", "data/corpus", "nothing there"),
                                    ("earwitness-tiny", f"s3://{S3_BUCKET}/half", "not a built corpus")):
        with pytest.raises(SystemExit, match=message):
            _cli("train", "dpo", "--from", source, "--corpus", corpus, "--out", out, "--max-steps", "1")
    assert not fs.exists(f"{S3_BUCKET}/refused")
