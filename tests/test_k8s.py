"""k8s/: every kustomize-rendered manifest against the Kubernetes and CRD schemas, the Serve config inside
the RayService against Serve's schema and serving.config.Settings, the rules with promtool, the dashboard.

Schemas: core kinds with `kubernetes-validate` (strict); RayService / PodMonitor / ServiceMonitor /
PrometheusRule with the CRDs' openAPIV3Schema vendored in k8s/schemas (sources in its README), validated
by `openapi-schema-validator` with unknown fields refused, as the API server's strict field validation does.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
OVERLAYS = ["cpu-demo", "gpu-production", "gpu-omni"]
GPU_OVERLAYS = {"gpu-production": "qwen2-audio-7b-instruct", "gpu-omni": "qwen2.5-omni-7b"}  # vLLM, weights from the model cache
RULES = K8S / "base" / "monitoring" / "earwitness-rules.yaml"
RULE_TESTS = K8S / "base" / "monitoring" / "earwitness-rules.test.yaml"
DASHBOARD = K8S / "base" / "monitoring" / "earwitness-dashboard.json"
K8S_VERSION = "1.37.0"
CRDS = {  # (apiVersion, kind) -> vendored schema
    ("ray.io/v1", "RayService"): "rayservice-ray-v1.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor-monitoring-v1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-monitoring-v1.json",
}


def _kustomize_major(text: str) -> int:
    match = re.search(r"(?:kustomize/|Kustomize Version: )v(\d+)\.", text) or re.fullmatch(r"\s*v?(\d+)\.\d+.*", text.strip() or "x")
    return int(match.group(1)) if match else 0


@cache
def _kustomize_command() -> list[str] | None:
    """kustomize >= 4 (the `labels` and `patches` fields), standalone or built into kubectl."""
    candidates = [(["kustomize", "version"], ["kustomize", "build"]), (["kubectl", "version", "--client"], ["kubectl", "kustomize"])]
    for probe, command in candidates:
        if shutil.which(probe[0]):
            out = subprocess.run(probe, capture_output=True, text=True, timeout=60)
            if _kustomize_major(out.stdout + out.stderr) >= 4:
                return command
    return None


@cache
def render(overlay: str) -> tuple[dict, ...]:
    command = _kustomize_command()
    if command is None:
        # kubectl (with kustomize 5) is part of this machine image; no registry here ships kustomize >= 4
        pytest.skip("needs kustomize >= 4, standalone or built into kubectl >= 1.21; neither is installed")
    out = subprocess.run([*command, str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def _one(docs, kind: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def _strict(schema):
    """Refuse unknown fields (fieldValidation=Strict) where the schema doesn't say it keeps them."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema:
            if not schema.get("x-kubernetes-preserve-unknown-fields"):
                schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@cache
def _crd_validator(filename: str):
    from openapi_schema_validator import OAS30Validator

    vendored = json.loads((K8S / "schemas" / filename).read_text())
    return OAS30Validator(_strict(vendored["openAPIV3Schema"]))


def _errors(doc: dict) -> list[str]:
    key = (doc["apiVersion"], doc["kind"])
    if key in CRDS:
        validator = _crd_validator(CRDS[key])
        return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [str(exc)]
    return []


def _pod_templates(rayservice: dict) -> dict[str, dict]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    out = {"head": cluster["headGroupSpec"]["template"]}
    out.update({g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]})
    return out


def _serve_config(rayservice: dict) -> dict:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_manifest_validates_against_its_schema(overlay):
    docs = render(overlay)
    kinds = sorted(d["kind"] for d in docs)
    cache = ["Job", "PersistentVolumeClaim"] if overlay in GPU_OVERLAYS else []  # the model cache and the Job filling it
    assert kinds == sorted(["ConfigMap", "Namespace", "PodMonitor", "PrometheusRule", "RayService", "ServiceMonitor", *cache])
    for doc in docs:
        assert _errors(doc) == [], f"{doc['kind']}/{doc['metadata']['name']}"
    # the pod templates inside the RayService, also against Kubernetes' own PodTemplateSpec (resource quantities, probes...)
    for group, template in _pod_templates(_one(docs, "RayService")).items():
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group}, "template": template}
        assert _errors(wrapped) == [], group


def test_the_validation_does_catch_mistakes():
    rayservice = copy.deepcopy(_one(render("cpu-demo"), "RayService"))
    rayservice["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] = "yes"
    rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    errors = _errors(rayservice)
    assert any("enableInTreeAutoscaling" in e for e in errors) and any("readinesProbe" in e for e in errors)
    configmap = copy.deepcopy(_one(render("cpu-demo"), "ConfigMap"))
    configmap["dataa"] = {}
    assert _errors(configmap)


@pytest.mark.parametrize("overlay, model", [("cpu-demo", "earwitness-tiny"), *GPU_OVERLAYS.items()])
def test_serve_config_is_a_valid_serve_config_of_settings(overlay, model):
    from ray.serve.schema import ServeDeploySchema

    from serving.app import build
    from serving.config import Settings

    config = _serve_config(_one(render(overlay), "RayService"))
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert app["import_path"] == "serving.app:app_builder" and app["route_prefix"] == "/"
    settings = Settings(**app["args"])  # extra="forbid": a misspelt field fails here
    assert settings.model == model
    assert settings.engine == ("vllm" if overlay in GPU_OVERLAYS else "transformers")
    assert settings.ingress_replicas == 1  # /metrics through the serve service: one ingress (see servicemonitor)
    model_server = build(settings)._bound_deployment.init_args[0]._bound_deployment  # Ingress(ModelServer, ...)
    autoscaling = model_server._deployment_config.autoscaling_config
    assert autoscaling is not None
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (settings.model_min_replicas, settings.model_max_replicas)
    assert autoscaling.target_ongoing_requests == settings.target_ongoing_requests
    assert model_server._deployment_config.max_queued_requests == settings.max_queued_requests


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_gpu_overlay_shape(overlay):
    docs = render(overlay)
    rayservice = _one(docs, "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    args = _serve_config(rayservice)["applications"][0]["args"]
    assert args["engine"] == "vllm" and args["model_gpus"] == 1 and args["model_source"].startswith("hf://")
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    head_container = head["template"]["spec"]["containers"][0]
    assert not any("gpu" in k for part in head_container["resources"].values() for k in part)
    (gpu,) = cluster["workerGroupSpecs"]
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    assert gpu["maxReplicas"] >= args["model_max_replicas"]  # one GPU pod per model replica at the top
    container = gpu["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["image"].endswith("-cuda")  # the image's vLLM variant (k8s/image/Dockerfile VARIANT=gpu)
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "earwitness-hub-token"
    # the weights: the model cache volume (ReadWriteMany, outlives pods), filled once by the Job with the URI the
    # Serve config reads, at the same cache path the replicas read
    (claim,) = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    job = _one(docs, "Job")["spec"]["template"]["spec"]
    assert job["containers"][0]["args"] == [args["model_source"]] and job["containers"][0]["command"][-1] == "models.store"
    for spec, c in ((gpu["template"]["spec"], container), (job, job["containers"][0])):
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        cache = {e["name"]: e.get("value") for e in c["env"]}["EARWITNESS_STORE_CACHE"]
        mount = next(path for path in mounts if cache.startswith(path + "/"))
        assert volumes[mounts[mount]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert all(d["metadata"].get("namespace") == _one(docs, "Namespace")["metadata"]["name"] for d in docs if d["kind"] != "Namespace")


def test_gpu_overlays_are_generated_from_the_serving_configs():
    """One place for the settings: each GPU overlay's Serve config is its serving/configs file plus the cluster's
    own settings (k8s/sync_overlays.py), so `serve run` on a GPU node and the RayService serve the same model alike."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sync_overlays", K8S / "sync_overlays.py")
    sync = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sync)
    assert set(sync.OVERLAYS) == set(GPU_OVERLAYS)
    for overlay, (source, own) in sync.OVERLAYS.items():
        for name, text in sync.render(overlay).items():
            assert (K8S / "overlays" / overlay / name).read_text() == text, "run: python k8s/sync_overlays.py"
        served = _serve_config(_one(render(overlay), "RayService"))
        local = yaml.safe_load((ROOT / "serving" / "configs" / source).read_text())
        args, local_args = served["applications"][0]["args"], local["applications"][0]["args"]
        cluster = {**sync.CLUSTER_ARGS, **own}  # what only a cluster sets; everything else is the serving config's
        assert {k: v for k, v in args.items() if k not in cluster} == {k: v for k, v in local_args.items() if k not in cluster}
        assert {k: args[k] for k in cluster} == cluster
        assert {k: v for k, v in served.items() if k != "applications"} == {k: v for k, v in local.items() if k != "applications"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_resources_and_probes(overlay):
    rayservice = _one(render(overlay), "RayService")
    for group, template in _pod_templates(rayservice).items():
        for container in template["spec"]["containers"]:
            assert {"requests", "limits"} <= set(container["resources"]), group
            assert container["readinessProbe"]["httpGet"]["path"] == "/readyz", group
            assert container["livenessProbe"]["httpGet"]["path"] == "/healthz", group
            assert container["startupProbe"]["httpGet"]["path"] == "/healthz", group
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert ports["serve"] == 8000 and ports["metrics"] == 8080, group
    assert rayservice["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_monitors_select_what_kuberay_creates(overlay):
    docs = render(overlay)
    rayservice = _one(docs, "RayService")
    service_monitor = _one(docs, "ServiceMonitor")
    # KubeRay labels the serve service `ray.io/serve: <RayService name>-serve` and names its port `serve`
    assert service_monitor["spec"]["selector"]["matchLabels"] == {"ray.io/serve": f"{rayservice['metadata']['name']}-serve"}
    assert service_monitor["spec"]["endpoints"][0]["port"] == "serve" and service_monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    pod_monitor = _one(docs, "PodMonitor")
    wanted = pod_monitor["spec"]["selector"]["matchLabels"]
    for group, template in _pod_templates(rayservice).items():
        assert wanted.items() <= template["metadata"]["labels"].items(), group
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    dashboard = _one(docs, "ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["earwitness-dashboard.json"])["uid"] == "earwitness"


def test_prometheusrule_is_generated_from_the_rules_file():
    generated = yaml.safe_load((K8S / "base" / "monitoring" / "prometheusrule.yaml").read_text())
    assert generated["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"], "run: python k8s/sync_rules.py"


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian package 'prometheus'; .ci/run installs it)")
    return path


def test_promtool_check_rules():
    out = subprocess.run([_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_rule_unit_tests():
    out = subprocess.run([_promtool(), "test", "rules", str(RULE_TESTS)], capture_output=True, text=True, timeout=120, cwd=RULE_TESTS.parent)
    assert out.returncode == 0, out.stdout + out.stderr


def test_rules_cover_the_guard_series_and_alerts():
    text = RULES.read_text()
    for name in ("earwitness_guard_verdicts_total", "earwitness_guard_overrides_total", "earwitness_verifier_failures_total"):
        assert name in text
    alerts = {r["alert"] for g in yaml.safe_load(text)["groups"] for r in g["rules"] if "alert" in r}
    assert {"EarwitnessLatencySLOFastBurn", "EarwitnessHighErrorRate", "EarwitnessNoRateHigh", "EarwitnessNoRateLow", "EarwitnessVerifierUnavailable"} <= alerts


def test_dashboard_uses_only_recorded_or_exported_series():
    recorded = {r["record"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "record" in r}
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    used = {name for e in exprs for name in re.findall(r"earwitness:[a-z0-9_:]+", e)}
    assert used and used <= recorded, used - recorded
    assert {"earwitness:answers_no:ratio_rate5m", "earwitness:request_latency_seconds:p95_5m", "earwitness:guard_overrides:ratio_rate5m"} <= used
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_ray_container_sets_what_a_local_run_sets(overlay):
    """The proxy callback (request ids, header timeout), and capped malloc arenas: the ingress holds many
    decoded bodies at once, and glibc's default arenas keep each thread's peak resident."""
    from serving.proxy import proxy_env
    from serving.runtime import MALLOC_ENV

    for name, template in _pod_templates(_one(render(overlay), "RayService")).items():
        for container in template["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert {k: env.get(k) for k in MALLOC_ENV} == MALLOC_ENV, (name, container["name"])
            callback = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
            assert env.get(callback) == proxy_env()[callback], (name, container["name"])
