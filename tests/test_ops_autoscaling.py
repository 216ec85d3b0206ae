"""Settings.model_min_replicas / model_max_replicas / target_ongoing_requests reach Serve as the model
deployment's autoscaling_config (what the RayService manifests rely on), and the app serves with it."""

from __future__ import annotations

import httpx

from tests.helpers import encode, tone
from tests.test_ops_variants import variant_app


def _model_server_details(app: str) -> dict:
    from ray.serve.context import _get_global_client

    return _get_global_client().get_serve_details()["applications"][app]["deployments"]["ModelServer"]


def test_model_deployment_autoscales_on_ongoing_requests(server):
    with variant_app(server, "autoscale", model_replicas=1, model_min_replicas=1, model_max_replicas=2, target_ongoing_requests=3) as base:
        details = _model_server_details("autoscale")
        config = details["deployment_config"]["autoscaling_config"]
        assert (config["min_replicas"], config["max_replicas"], config["target_ongoing_requests"]) == (1, 2, 3.0)
        assert config["initial_replicas"] == 1
        assert details["status"] == "HEALTHY" and 1 <= len(details["replicas"]) <= 2
        r = httpx.post(f"{base}/v1/audio/qa", files={"file": ("a.wav", encode(tone(1.0, 16_000, 1), 16_000))}, data={"question": "q"}, timeout=30)
        assert r.status_code == 200, r.text


def test_fixed_replicas_without_autoscaling(server):
    details = _model_server_details("earwitness")  # the session app: model_min/max_replicas unset
    assert details["deployment_config"].get("autoscaling_config") is None
    assert details["deployment_config"]["num_replicas"] == server[1].model_replicas
