"""k8s/: every kustomize-rendered manifest against the Kubernetes and CRD schemas, the Serve config inside
the RayService against Serve's schema and serving.config.Settings, the rules with promtool, the dashboard.

Schemas: core kinds with `kubernetes-validate` (strict); RayService / PodMonitor /
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
METRICS_DIR = "/var/run/earwitness/metrics"  # each pod's replicas' metrics (Settings.metrics_dir), read by its sidecar
CRDS = {  # (apiVersion, kind) -> vendored schema
    ("ray.io/v1", "RayService"): "rayservice-ray-v1.json",
    ("ray.io/v1", "RayJob"): "rayjob-ray-v1.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor-monitoring-v1.json",
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
    path = K8S / "overlays" / overlay if (K8S / "overlays" / overlay).is_dir() else K8S / overlay  # an overlay, or k8s/training
    out = subprocess.run([*command, str(path)], capture_output=True, text=True, timeout=120)
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
    assert kinds == sorted(["ConfigMap", "Namespace", "PodMonitor", "PodMonitor", "PrometheusRule", "RayService", *cache])
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
    # several ingress replicas, on nodes of their own, each pod's replicas keeping their metrics where its sidecar reads them
    assert settings.ingress_replicas >= 2 and settings.ingress_max_per_node == 1 and settings.metrics_dir == METRICS_DIR
    ingress = build(settings)._bound_deployment
    assert ingress._replica_config.max_replicas_per_node == 1
    assert ingress.ray_actor_options["runtime_env"]["env_vars"]["PROMETHEUS_MULTIPROC_DIR"] == METRICS_DIR
    model_server = ingress.init_args[0]._bound_deployment  # Ingress(ModelServer, ...)
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


def _containers(template: dict) -> tuple[list[dict], dict]:
    """A Ray pod's Ray containers, and its earwitness-metrics sidecar."""
    containers = template["spec"]["containers"]
    (sidecar,) = [c for c in containers if c["name"] == "earwitness-metrics"]
    return [c for c in containers if c is not sidecar], sidecar


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_serves_its_replicas_metrics_from_a_sidecar(overlay):
    """Each Ray container keeps its replicas' metrics in the pod's own volume at metrics_dir; the pod's sidecar
    serves their sum on ew-metrics (python -m serving.metrics), reading the same volume."""
    rayservice = _one(render(overlay), "RayService")
    for group, template in _pod_templates(rayservice).items():
        (ray,), sidecar = _containers(template)
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        for container in (ray, sidecar):
            (name,) = [m["name"] for m in container["volumeMounts"] if m["mountPath"] == METRICS_DIR]
            assert "emptyDir" in volumes[name], group  # the pod's own: its replicas only
        assert sidecar["image"] == ray["image"], group
        assert sidecar["command"] == ["python", "-m", "serving.metrics", "--dir", METRICS_DIR, "--port", "9464"], group
        assert {p["name"]: p["containerPort"] for p in sidecar["ports"]} == {"ew-metrics": 9464}, group
        assert {"requests", "limits"} <= set(sidecar["resources"]) and sidecar["livenessProbe"]["httpGet"]["port"] == "ew-metrics", group


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_resources_and_probes(overlay):
    rayservice = _one(render(overlay), "RayService")
    for group, template in _pod_templates(rayservice).items():
        for container in _containers(template)[0]:
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
    # every pod scraped on its own: earwitness_* from each pod's sidecar, ray_* from each Ray container (no Service
    # endpoint, which would reach one pod's replicas only)
    monitors = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PodMonitor"}
    assert {name: m["spec"]["podMetricsEndpoints"][0]["port"] for name, m in monitors.items()} == {"earwitness": "ew-metrics", "earwitness-ray": "metrics"}
    for monitor in monitors.values():
        wanted = monitor["spec"]["selector"]["matchLabels"]
        port = monitor["spec"]["podMetricsEndpoints"][0]["port"]
        for group, template in _pod_templates(rayservice).items():
            assert wanted.items() <= template["metadata"]["labels"].items(), group
            assert any(p["name"] == port for c in template["spec"]["containers"] for p in c.get("ports", [])), (group, port)
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
        for container in _containers(template)[0]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert {k: env.get(k) for k in MALLOC_ENV} == MALLOC_ENV, (name, container["name"])
            callback = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
            assert env.get(callback) == proxy_env()[callback], (name, container["name"])


@pytest.mark.parametrize("variant", ["training", "training-object-store"])
def test_training_rayjob_runs_the_stage_commands_and_publishes_where_serving_reads(variant):
    """k8s/training: a RayJob (KubeRay's v1.7.0 schema) whose entrypoint is the stage commands as the CLI parses them,
    on Ray 2.60 with GPU workers, publishing the adapter into the gpu-omni overlay's adapter store; the corpus and the
    stages on the PVC, or (k8s/training-object-store) on an object store, copied through a store cache on the PVC."""
    import shlex

    import ray

    from models.store import join
    from earwitness.cli import build_parser

    docs = render(variant)
    assert sorted(d["kind"] for d in docs) == ["PersistentVolumeClaim", "RayJob"]
    for doc in docs:
        assert _errors(doc) == [], doc["kind"]
    job = _one(docs, "RayJob")
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    templates = {"head": cluster["headGroupSpec"]["template"], **{g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]}}
    for group, template in templates.items():
        assert _errors({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group}, "template": template}) == [], group
        claims = {v["persistentVolumeClaim"]["claimName"] for v in template["spec"]["volumes"] if "persistentVolumeClaim" in v}
        assert claims == {_one(docs, "PersistentVolumeClaim")["metadata"]["name"]}, group
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"

    steps = [s.strip() for s in job["spec"]["entrypoint"].split(";") if s.strip()]
    scale = shlex.split(next(s for s in steps if s.startswith("SCALE=")).split("=", 1)[1])[0]
    parsed = [build_parser().parse_args(shlex.split(s.replace("$SCALE", scale))[1:]) for s in steps if s.startswith("earwitness ")]
    assert [a.stage for a in parsed] == ["listen", "dpo"] and parsed[1].source == parsed[0].out
    on_store = variant == "training-object-store"
    assert all(a.corpus.startswith("s3://") == a.out.startswith("s3://") == on_store for a in parsed)
    for group, template in templates.items():
        env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0]["env"]}
        mounts = [m["mountPath"] for m in template["spec"]["containers"][0]["volumeMounts"]]
        assert not on_store or any(env.get("EARWITNESS_STORE_CACHE", "").startswith(m + "/") for m in mounts), group
    assert all(a.workers == workers["replicas"] and a.gpus_per_worker == 1 and a.resume and a.address == "auto" for a in parsed)
    serving = _serve_config(_one(render("gpu-omni"), "RayService"))["applications"][0]["args"]
    assert parsed[0].source == serving["model"]
    assert parsed[1].publish == join(serving["adapter_store"], parsed[1].publish.rsplit("/", 1)[1])
