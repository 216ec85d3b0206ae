from __future__ import annotations

import os
import shutil
import tempfile

import httpx
import pytest

from tests.helpers import build_tiny_checkpoint, free_port, local_s3, wait_ready

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen2-audio"))


@pytest.fixture(scope="session")
def verifier_checkpoint(tmp_path_factory):
    """The shipped verifier (models/earwitness-verifier), or a small untrained one until it is trained."""
    from tests.guard_helpers import verifier_dir

    return verifier_dir(tmp_path_factory)


@pytest.fixture(scope="session")
def server(tiny_checkpoint, verifier_checkpoint, tmp_path_factory):
    """One real Ray Serve application on a loopback port for the whole session."""
    from serving.config import Settings
    from serving.runtime import start, stop

    settings = Settings(
        model=str(tiny_checkpoint),
        verifier=str(verifier_checkpoint),
        verifier_cpus=0,  # fits beside the model on a 2-CPU test Ray, variants included
        port=free_port(),
        direct_port=free_port(),  # Serve's direct ingress too: the fast path is tested with everything else
        max_upload_mb=1.0,
        max_queued_requests=32,
        request_timeout_s=30,
        body_timeout_s=3,  # a body that stops arriving is cut off quickly (tests/test_hostile_inputs.py)
        header_timeout_s=3,  # and headers that do
        num_cpus=2,
        ray_temp_dir=tempfile.mkdtemp(prefix="ew-ray-"),  # short: Ray puts unix sockets under it
    )
    start(settings)
    url = f"http://{settings.host}:{settings.port}"
    wait_ready(url, 60)
    yield url, settings
    stop()


S3_BUCKET = "earwitness"


@pytest.fixture(scope="session")
def s3():
    """A real S3 server (moto) holding the bucket ``earwitness`` and an s3fs client on it; yields ``(fs, store_options)``."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    with local_s3(S3_BUCKET) as (fs, options):
        yield fs, options


def drop_served_copies(prefix: str) -> None:
    """Remove the store cache's copies of URIs under ``prefix``: a Serve app's replicas copy into the store cache of
    their own environment, not a test's temporary one."""
    import json

    from models.store import COMPLETE, store_cache

    for marker in store_cache().glob(f"*/{COMPLETE}"):
        if json.loads(marker.read_text())["uri"].startswith(prefix):
            shutil.rmtree(marker.parent, ignore_errors=True)


@pytest.fixture()
def client(server):
    url, _ = server
    with httpx.Client(base_url=url, timeout=30) as c:
        yield c


# A real small corpus (minetest-data, bucklespring-data, scratch), fetched with apt-get into the cache.
N_TRAIN = 48
SEED = 7


def fetchable() -> bool:
    from models.cache import cache_dir
    from train.data import sources as S

    cache = cache_dir()
    if all((cache / "unpacked" / p / ".complete").exists() for p in S.SMALL_PACKAGES):
        return True
    return shutil.which("apt-get") is not None and shutil.which("dpkg-deb") is not None


@pytest.fixture(scope="session")
def small_roots():
    from train.data import sources as S
    from train.data.fetching import fetch

    if not fetchable():
        pytest.skip("apt-get/dpkg-deb unavailable and no cached packages")
    roots, failed = fetch(S.SMALL_PACKAGES)
    assert not failed, f"could not fetch the test packages: {failed}"
    return roots


@pytest.fixture(scope="session")
def corpus(small_roots, tmp_path_factory):
    from train.data import sources as S
    from train.data.build import build_corpus

    out = tmp_path_factory.mktemp("corpus") / "c"
    build_corpus(out, n_train=N_TRAIN, seed=SEED, packages=S.SMALL_PACKAGES, progress=False)
    return out


@pytest.fixture(scope="session")
def guard_clips(corpus) -> dict:
    """A scene where a sound is confidently present and one where it is confidently absent, as the shipped verifier
    judges them (tests.guard_helpers.pick_clips). Judged once per session: it scores every scene of the corpus, most of a
    minute on two cores. The guard's modules only read it."""
    from tests.guard_helpers import pick_clips, shipped_verifier

    if shipped_verifier() is None:
        pytest.skip("needs the shipped verifier (models/earwitness-verifier)")
    return pick_clips(corpus)


@pytest.fixture(scope="session")
def frozen_small(tmp_path_factory):
    """earwitness-small's architecture on the frozen pretrained Whisper tiny.en tower (the verifier's encoder), projector
    untrained, with the shipped adapter (a LoRA on the language model only): the model the shared-encoder path
    serves. The shipped earwitness-small's top tower layers are distilled, so its tower is its own."""
    import shutil

    from models.pretrained.wheels import WheelError
    from models.registry import SMALL_DIR
    from models.small import SmallSpec, build_untrained, save_trained
    from train.stages import point_adapter_at

    out = tmp_path_factory.mktemp("frozen-small") / "earwitness-small-frozen"
    try:
        processor, model = build_untrained(SmallSpec(), seed=0)
    except WheelError as e:
        pytest.skip(f"pretrained wheels unavailable: {e}")
    save_trained(model, processor, out, SmallSpec())
    shutil.copytree(SMALL_DIR / "adapter", out / "adapter")
    point_adapter_at(out / "adapter", out.name)
    return out
