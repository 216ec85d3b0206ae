"""Topology ``fused``: each ingress replica holds the model and the verifier (serving/model_client.py).

The application is built and checked offline, then run for real as a variant beside the session server
(split): one deployment, the same guarded answers as split on real recordings. Its refusals when its
queue is full are tested with split's (tests/test_faults.py).
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from serving.app import build
from serving.config import Settings
from tests.guard_helpers import build_yes_checkpoint, shipped_verifier
from tests.test_ops_variants import variant_app

pytestmark = pytest.mark.slow  # its own Serve deployment

QUESTION = "Is there a sound of {x} in the audio?"


def test_fused_is_one_deployment_with_the_model_and_verifier_resources():
    app = build(Settings(topology="fused", model_cpus=2, verifier_cpus=0.5, model_gpus=1, model_min_replicas=1, model_max_replicas=3))
    ingress = app._bound_deployment
    assert ingress.name == "Ingress"
    model, *rest = ingress.init_args
    assert model is None and len(rest) == 1  # settings only, no handles: model and verifier live in the replica
    assert ingress.ray_actor_options["num_cpus"] == 2.5 and ingress.ray_actor_options["num_gpus"] == 1
    assert ingress._deployment_config.autoscaling_config.max_replicas == 3


def test_fused_tensor_parallel_bundle_holds_the_verifier_too():
    app = build(Settings(topology="fused", engine="vllm", tensor_parallel_size=2, model_cpus=1, verifier_cpus=1, model_gpus=2))
    ingress = app._bound_deployment
    assert ingress._replica_config.placement_group_bundles == [{"CPU": 2.0}, {"GPU": 1.0}, {"GPU": 1.0}]
    assert ingress.ray_actor_options["num_cpus"] == 2.0


def test_fused_refuses_a_separate_ingress_scale():
    with pytest.raises(ValueError, match="ingress_replicas"):
        build(Settings(topology="fused", ingress_replicas=2))


def _app_deployments(name: str) -> set[str]:
    from ray.serve.context import _get_global_client

    return set(_get_global_client().get_serve_details()["applications"][name]["deployments"])


def _qa(base: str, path, question: str, policy: str) -> dict:
    with open(path, "rb") as f:
        r = httpx.post(f"{base}/v1/audio/qa", files={"file": ("clip.flac", f.read())}, data={"question": question, "guard": policy}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_fused_guards_as_split_does(server, guard_clips, tmp_path_factory):
    """The always-yes model and the shipped verifier, fused: an absent sound is caught and corrected, a present one kept."""
    clips = guard_clips
    ckpt = build_yes_checkpoint(tmp_path_factory.mktemp("yes-fused"))
    with variant_app(server, "fused-yes", topology="fused", model=str(ckpt), verifier=str(shipped_verifier()), verifier_cpus=0) as base:
        assert _app_deployments("fused-yes") == {"Ingress"}
        absent = clips["absent"]
        question = QUESTION.format(x=absent["phrase"])
        annotated = _qa(base, absent["path"], question, "annotate")
        assert annotated["answer"] == "yes" and annotated["guard"]["verdict"] == "unsupported"
        (claim,) = annotated["guard"]["claims"]
        assert claim["event"] == absent["event"] and claim["present"] is False and claim["contrast"] is not None
        corrected = _qa(base, absent["path"], question, "correct")
        assert (corrected["answer"], corrected["original_answer"]) == ("No.", "yes")
        present = clips["present"]
        kept = _qa(base, present["path"], QUESTION.format(x=present["phrase"]), "correct")
        assert kept["answer"] == "yes" and kept["guard"]["claims"][0]["present"] is not False
        r = httpx.post(f"{base}/v1/audio/verify", files={"file": ("a.flac", Path(absent["path"]).read_bytes())}, data={"events": absent["phrase"]}, timeout=30)
        assert r.status_code == 200 and r.json()["events"][0]["event"] == absent["event"]
        assert httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]
