"""Real encoded audio and tiny real models for tests."""

from __future__ import annotations

import socket
import subprocess
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import soundfile as sf

from loadtests.clips import FORMATS, encode  # noqa: F401 - the tests' audio files are the load tests' own
from train.data.formats import write_clotho_csv


def free_port() -> int:
    """A loopback TCP port that is free now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tone(seconds: float = 2.0, sample_rate: int = 44_100, channels: int = 2, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    wave = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([wave] * channels, axis=1) if channels > 1 else wave


TINY_TEXTS = [
    "Is there a sound of a dog barking in the audio?",
    "Did you hear rain in the audio? Answer with yes or no.",
    "yes",
    "no",
    "A dog barks, then a door slams while rain falls.",
] * 20


def build_tiny_checkpoint(directory: Path) -> Path:
    """A small random Qwen2-Audio with its own tokenizer and processor, saved like a real checkpoint."""
    from models.tiny import TinySize, build_untrained

    size = TinySize(chunk_s=10, mel_bins=32, audio_dim=32, audio_layers=1, audio_heads=2, text_dim=32, text_layers=1, text_heads=2, text_kv_heads=1)
    processor, model = build_untrained(TINY_TEXTS, size, vocab_size=300, seed=0)
    processor.save_pretrained(directory)
    model.save_pretrained(directory)
    return directory


def wait_ready(url: str, timeout_s: float, poll_s: float = 0.5) -> bool:
    """Poll ``url``/readyz until it answers 200 or ``timeout_s`` passes; returns whether it became ready."""
    import time

    import httpx

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(poll_s)
    return False


@contextmanager
def local_s3(bucket: str):
    """A real S3 server (moto's REST endpoint on a loopback port) holding ``bucket``; yields ``(s3fs filesystem,
    store_options)``, the options a replica's settings would carry for an S3-compatible endpoint."""
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = {"s3": {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing",
                          "client_kwargs": {"region_name": "us-east-1"}}}
        boto3.client("s3", endpoint_url=options["s3"]["endpoint_url"], region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=bucket)
        yield s3fs.S3FileSystem(skip_instance_cache=True, **options["s3"]), options
    finally:
        server.stop()


def _sound(path, seconds: float, sr: int, channels: int, kind: str, seed: int) -> None:
    """A synthesised clip (a tone or noise), written as the user's file would be: any rate, any channel count."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    mono = 0.3 * np.sin(2 * np.pi * (220 + 110 * seed) * t) if kind == "tone" else 0.2 * rng.standard_normal(t.size)
    sf.write(path, np.repeat(mono[:, None], channels, axis=1).astype(np.float32), sr)


def write_user_datasets(tmp_path: Path) -> tuple[Path, Path]:
    """Tiny AudioCaps and Clotho directories in their published layouts under ``tmp_path``, their audio synthesised (a user's
    own data sets, which the project never trains on); returns both directories."""
    caps = tmp_path / "audiocaps"
    (caps / "audio").mkdir(parents=True)
    (caps / "train.csv").write_text("audiocap_id,youtube_id,start_time,caption\n"
                                    "1,dogA_x,30,A dog barks while a man speaks\n"
                                    "2,rainB,0,Rain falls on a metal roof\n"
                                    "3,gone1,10,A siren wails\n", encoding="utf-8")  # its audio was never downloaded
    (caps / "val.csv").write_text("audiocap_id,youtube_id,start_time,caption\n"
                                  "4,bellC,5,A bell rings twice\n5,bellC,5,Church bells ringing\n", encoding="utf-8")
    (caps / "test.csv").write_text("audiocap_id,youtube_id,start_time,caption\n6,humD,0,A machine whirs steadily\n", encoding="utf-8")
    _sound(caps / "audio" / "dogA_x_30.wav", 10.0, 44_100, 2, "noise", 1)
    _sound(caps / "audio" / "YrainB.flac", 4.0, 16_000, 1, "noise", 2)
    _sound(caps / "audio" / "4.wav", 3.0, 22_050, 1, "tone", 3)  # named by its audiocap_id
    _sound(caps / "audio" / "humD.wav", 2.0, 16_000, 1, "tone", 4)

    clotho = tmp_path / "clotho"
    for split, name, captions in (("development", "birds in park.wav", ["Birds chirping in a park.", "Small birds sing.", "Birds call.",
                                                                         "Chirping birds and wind blowing.", "Birds are singing."]),
                                  ("validation", "door.wav", ["A door creaks open.", "Someone opens a door.", "A door opening.",
                                                              "A creaky door.", "The door slowly opens."]),
                                  ("evaluation", "typing.wav", ["Someone typing on a keyboard.", "Keys clicking.", "Typing fast.",
                                                                "A keyboard being typed on.", "Fingers typing."])):
        (clotho / split).mkdir(parents=True)
        write_clotho_csv(clotho / f"clotho_captions_{split}.csv", {name: captions})
        _sound(clotho / split / name, 20.0 if split == "development" else 5.0, 44_100, 1, "noise", 5)
    return caps, clotho


def cli_in_process(capsys, *args: str | Path) -> subprocess.CompletedProcess:
    """``earwitness ARGS`` run by its ``main`` in the test's process, where torch and transformers are loaded already:
    the command's own code, exit status and output, without a new interpreter's imports (several seconds)."""
    from earwitness.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(["earwitness", *args], code, out.out, out.err)
