"""The command line and the Serve config file, run for real."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from serving.app import app_builder
from serving.config import Settings, scaled_to_cores
from tests.helpers import cli_in_process, encode, tone

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "earwitness", *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_ask_answers_in_process(tiny_checkpoint, tmp_path):
    clip = tmp_path / "clip.flac"
    clip.write_bytes(encode(tone(2.0, 22_050, 1), 22_050, "flac"))
    result = _cli("ask", str(clip), "Is there a dog?", "--model", str(tiny_checkpoint), "--max-tokens", "4")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["model"] == tiny_checkpoint.name and answer["answer_kind"] in {"yes", "no", "other", "unparsed"}


def test_ask_reports_bad_audio_as_an_error(tiny_checkpoint, tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all" * 10)
    result = _cli("ask", str(bad), "Is there a dog?", "--model", str(tiny_checkpoint))
    assert result.returncode == 2
    assert json.loads(result.stderr.strip().splitlines()[-1])["error"]["code"] == "unsupported_audio_format"


def test_ask_checks_the_file_before_loading_a_model(tmp_path):
    result = _cli("ask", str(tmp_path / "missing.wav"), "Is there a dog?", "--model", str(tmp_path / "no-such-model"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cannot read" in result.stderr and "missing.wav" in result.stderr


def test_ask_names_its_own_truncate_flag(tiny_checkpoint, tmp_path, capsys):
    long = tmp_path / "long.wav"
    long.write_bytes(encode(tone(12.0, 16_000, 1), 16_000, "wav"))  # over the tiny model's 10 s window
    result = cli_in_process(capsys, "ask", str(long), "Is there a dog?", "--model", str(tiny_checkpoint))
    error = json.loads(result.stderr.strip().splitlines()[-1])["error"]
    assert (result.returncode, error["code"]) == (2, "audio_too_long") and "--truncate" in error["message"] and "truncate=true" not in error["message"]
    assert "``" not in _cli("--help").stdout


@pytest.mark.parametrize("question, code", [("", "empty_question"), ("   ", "empty_question"), ("x" * 5000, "question_too_long")])
def test_ask_refuses_what_http_refuses_before_loading_a_model(tmp_path, question, code):
    """The same error as the API's 422 (code and param), before any model loads (the model named does not exist)."""
    clip = tmp_path / "clip.wav"
    clip.write_bytes(encode(tone(1.0, 16_000, 1), 16_000, "wav"))
    result = _cli("ask", str(clip), question, "--model", str(tmp_path / "no-such-model"))
    error = json.loads(result.stderr.strip().splitlines()[-1])["error"]
    assert (result.returncode, error["code"], error["param"]) == (2, code, "question"), result.stderr[-500:]


def test_ask_refuses_a_text_file_before_loading_a_model(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not audio\n" * 20)
    result = _cli("ask", str(text), "Is there a dog?", "--model", str(tmp_path / "no-such-model"))
    assert result.returncode == 2 and json.loads(result.stderr.strip().splitlines()[-1])["error"]["code"] == "unsupported_audio_format"


@pytest.mark.slow
def test_ask_runs_the_guard_and_reports_the_audio_as_http_does(tiny_checkpoint, tmp_path, capsys):
    from tests.guard_helpers import shipped_verifier

    if shipped_verifier() is None:
        pytest.skip("needs the shipped verifier")
    quiet = tmp_path / "silence.wav"
    quiet.write_bytes(encode(np.zeros(16_000, dtype=np.float32), 16_000, "wav"))
    result = cli_in_process(capsys, "ask", str(quiet), "Is there a sound of a dog barking in the audio?", "--model", str(tiny_checkpoint),
                  "--max-tokens", "4", "--guard", "annotate")
    assert result.returncode == 0, result.stderr[-2000:]
    body = json.loads(result.stdout.strip().splitlines()[-1])
    assert body["guard"]["policy"] == "annotate" and body["guard"]["verdict"] != "skipped"
    assert body["audio"]["flags"] == ["digital_silence"] and body["audio"]["duration_s"] == 1.0
    off = json.loads(cli_in_process(capsys, "ask", str(quiet), "Is there a dog?", "--model", str(tiny_checkpoint), "--max-tokens", "2", "--guard", "off").stdout.strip().splitlines()[-1])
    assert off["guard"]["verdict"] == "skipped"


def test_ask_help_describes_every_argument():
    from earwitness.cli import build_parser

    parser = build_parser()
    ask = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "ask")[1]  # noqa: SLF001
    undocumented = [a.dest for a in ask._actions if a.dest != "help" and not a.help]  # noqa: SLF001
    assert not undocumented


def test_the_command_line_parses_and_lists_models_without_the_training_stack():
    """The stage flags are built from the stage configs (``train.options``) and the registry reads the family table
    without torch: ``earwitness --help``, ``train dpo --help``, ``models`` and ``ask``'s early refusals start in about
    a second, not after importing torch, transformers, PEFT and TRL (several seconds each time)."""
    code = ("import contextlib, io, sys\n"
            "from earwitness.cli import build_parser, main\n"
            "build_parser().parse_args(['train', 'dpo', '--from', 'x', '--out', 'y', '--beta', '0.2'])\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    main(['models'])\n"
            "print(sorted({'torch', 'transformers', 'peft', 'trl'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_stage_flags_are_the_stage_configs_fields():
    """Every field of LISTEN's and DPO's config is a flag with its help and, left out, the config's own default."""
    from dataclasses import fields

    from earwitness.cli import build_parser
    from train.options import AudioDPOConfig, ListenConfig, chosen

    parser = build_parser()
    for stage, config in (("listen", ListenConfig), ("dpo", AudioDPOConfig)):
        args = parser.parse_args(["train", stage, "--from", "x", "--out", "y"])
        assert args.config_class is config and chosen(args, config) == {}
        stage_parser = parser._subparsers._group_actions[0].choices["train"]._subparsers._group_actions[0].choices[stage]  # noqa: SLF001
        helps = {a.dest: a.help for a in stage_parser._actions}  # noqa: SLF001
        for f in fields(config):
            if f.name != "modules_to_save":
                assert helps[f.name] == f.metadata["help"], f.name
    args = parser.parse_args(["train", "dpo", "--from", "x", "--out", "y", "--beta", "0.2", "--no-tensorboard", "--lora-r", "4"])
    assert AudioDPOConfig(**chosen(args, AudioDPOConfig)) == AudioDPOConfig(beta=0.2, tensorboard=False, lora_r=4)


def test_models_lists_the_registry():
    result = _cli("models")
    assert result.returncode == 0
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert names[:4] == ["earwitness-small", "earwitness-tiny", "qwen2-audio-7b-instruct", "qwen2.5-omni-7b"]


def test_serve_config_args_are_settings():
    config = yaml.safe_load((ROOT / "serving/configs/local.yaml").read_text())
    app = config["applications"][0]
    assert app["import_path"] == "serving.app:app_builder"
    Settings(**app["args"])  # extra="forbid": a misspelt key fails here, not at deploy time
    assert app_builder(app["args"]) is not None


def test_serve_runs_one_model_replica_per_core_on_a_cpu(monkeypatch):
    """Concurrency pays on a CPU only across replicas (README "Concurrency on a CPU"), so ``earwitness serve``
    picks one per core when nothing chose the count, and gives Ray the CPUs they reserve."""
    for name in ("EARWITNESS_MODEL_REPLICAS", "EARWITNESS_NUM_CPUS", "EARWITNESS_MODEL_MIN_REPLICAS", "EARWITNESS_TOPOLOGY"):
        monkeypatch.delenv(name, raising=False)
    two = scaled_to_cores(Settings(_env_file=None), cores=2, gpu=False)
    assert (two.model_replicas, two.num_cpus) == (2, 3)  # two model replicas and the verifier
    assert scaled_to_cores(Settings(_env_file=None), cores=64, gpu=False).model_replicas == 4  # capped
    assert scaled_to_cores(Settings(_env_file=None, verifier=None), cores=1, gpu=False).num_cpus is None  # one: as before
    fused = scaled_to_cores(Settings(_env_file=None, topology="fused"), cores=2, gpu=False)
    assert (fused.model_replicas, fused.num_cpus) == (2, 4)  # each fused replica holds a verifier
    # what was chosen stays chosen
    assert scaled_to_cores(Settings(_env_file=None, num_cpus=2), cores=2, gpu=False).model_replicas == 1
    assert scaled_to_cores(Settings(_env_file=None, model_replicas=3), cores=2, gpu=False).model_replicas == 3
    assert scaled_to_cores(Settings(_env_file=None, model_min_replicas=1, model_max_replicas=2), cores=8, gpu=False).model_replicas == 1
    assert scaled_to_cores(Settings(_env_file=None), cores=8, gpu=True).model_replicas == 1
    assert scaled_to_cores(Settings(_env_file=None, engine="vllm"), cores=8, gpu=False).model_replicas == 1
    monkeypatch.setenv("EARWITNESS_MODEL_REPLICAS", "1")
    assert scaled_to_cores(Settings(_env_file=None), cores=8, gpu=False).model_replicas == 1


def test_unknown_setting_is_refused():
    with pytest.raises(Exception, match="max_batchsize"):
        Settings(max_batchsize=4)


def _processes_of_run(marker: str) -> list[str]:
    """Every live process whose environment carries ``marker``: all a run started (Ray's GCS, raylet, workers and
    Serve replicas inherit the CLI's environment, whatever they rename themselves to)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker.encode() in (proc / "environ").read_bytes():
                cmdline = (proc / "cmdline").read_bytes().replace(bytes(1), b" ").decode(errors="replace")
                found.append(f"{proc.name} {cmdline[:80]}")
        except OSError:  # gone, or not ours to read
            continue
    return found


STOP_SIGNALS = ("SIGTERM", "SIGINT to the group", "SIGINT to a background job")


@dataclass
class ServeRun:
    """One ``earwitness serve`` process of :func:`serve_runs`: its own port, Ray temp dir, log and environment marker."""

    proc: subprocess.Popen
    port: int
    marker: str
    log: Path


@pytest.fixture(scope="module")
def serve_runs(request, tmp_path_factory):
    """One ``earwitness serve`` per signal that this session runs :func:`test_serve_stops_cleanly` with, all started at
    once: much of a start and a stop is Ray's and Serve's processes waiting on each other, so three started together
    are up sooner than three in a row (the three tests: 104 s against 150 s), and each test still stops a service of
    its own. What a failed test left running is killed here."""
    import signal
    import uuid

    from tests.helpers import free_port

    wanted = [item.callspec.params["how"] for item in request.session.items
              if getattr(item, "originalname", "") == "test_serve_stops_cleanly" and hasattr(item, "callspec")]
    runs = {}
    for how in dict.fromkeys(wanted):
        port, temp, marker = free_port(), tempfile.mkdtemp(prefix="ew-stop-"), f"ew-run-{uuid.uuid4().hex}"
        env = {**os.environ, "EARWITNESS_PORT": str(port), "EARWITNESS_RAY_TEMP_DIR": temp, "EARWITNESS_NUM_CPUS": "2",
               "RAY_USAGE_STATS_ENABLED": "0", "EW_TEST_RUN": marker}
        log = tmp_path_factory.mktemp("serve") / "serve.log"
        # SIGINT as a background job has it (ignored) or as a terminal's foreground job has it (its default action),
        # whatever this suite inherited (a suite run under nohup or `&` has it ignored)
        disposition = signal.SIG_IGN if how.endswith("background job") else signal.SIG_DFL
        proc = subprocess.Popen([sys.executable, "-m", "earwitness", "serve"], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True, preexec_fn=lambda d=disposition: signal.signal(signal.SIGINT, d))  # its own process group, as a shell job has
        runs[how] = ServeRun(proc, port, marker, log)
    yield runs
    for run in runs.values():  # what a failed test left: the command, then every process of its run
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait(30)
        for line in _processes_of_run(run.marker):
            with contextlib.suppress(OSError):
                os.kill(int(line.split()[0]), signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize("how", STOP_SIGNALS)
def test_serve_stops_cleanly(serve_runs, how):
    """``earwitness serve`` under docker stop / systemd (SIGTERM to the process) and Ctrl-C in a terminal (SIGINT to
    the whole foreground process group, Ray's processes included), and ``kill -INT`` of a job a script started in
    the background (which a shell starts with SIGINT ignored): after serving a request it shuts Serve and Ray down
    and exits 0, with no stack trace from Ray's own signal handler and no process of that run left behind."""
    import signal

    import httpx

    from tests.helpers import wait_ready

    run = serve_runs[how]
    proc, log = run.proc, run.log
    try:
        assert wait_ready(f"http://127.0.0.1:{run.port}", 240, poll_s=1) and proc.poll() is None, log.read_text()[-2000:]
        r = httpx.post(f"http://127.0.0.1:{run.port}/v1/audio/qa", files={"file": ("a.wav", encode(tone(1.0, 16_000, 1), 16_000, "wav"))},
                       data={"question": "Is there a dog?", "max_tokens": "4"}, timeout=120)
        assert r.status_code == 200, r.text
        assert len(_processes_of_run(run.marker)) > 3, "the run's Ray processes are found by their environment"
        if how == "SIGTERM":
            proc.send_signal(signal.SIGTERM)
        elif how == "SIGINT to the group":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGINT)
        assert proc.wait(120) == 0, log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "earwitness: stopping" in text and "SIGTERM received" not in text
    deadline = time.monotonic() + 15  # a worker may take a moment to exit after the raylet is gone
    while (left := _processes_of_run(run.marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes of the run left: {left}"
