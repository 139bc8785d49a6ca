"""docker/k8s: every built-in resource validates offline against the Kubernetes OpenAPI schemas shipped
in the kubernetes-validate package (strict: unknown fields fail), the KEDA ScaledObject against a schema
written for it (tests/deploy/schemas/), and the manifests are checked as one system: selectors, ports,
config references, probes, grace periods, GPU requests, and the streams KEDA watches."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from .helpers import K8S_DIR, ROOT, SHIPPED_MODELS, k8s_resources, load_yaml, missing, settings_env_names

RESOURCES = k8s_resources()
# Custom resources have no schema in the Kubernetes OpenAPI document: KEDA's is checked on its own.
BUILTIN = [(p, d) for p, d in RESOURCES if d["apiVersion"] != "keda.sh/v1alpha1"]
IDS = [f"{p.name}:{d['kind']}/{d['metadata']['name']}" for p, d in BUILTIN]
# The oldest Kubernetes we support and the newest the installed package knows.
K8S_VERSIONS = ["1.29", None]
KEDA_SCHEMA = Path(__file__).parent / "schemas" / "keda-scaledobject.schema.json"


def kubernetes_validate():
    try:
        import kubernetes_validate.utils as kv  # noqa: PLC0415
    except ImportError:
        missing("kubernetes-validate", "pip install kubernetes-validate")
    return kv


def by_kind(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for _, d in RESOURCES if d["kind"] == kind}


def containers(workload: dict) -> list[dict]:
    return workload["spec"]["template"]["spec"]["containers"]


@pytest.mark.parametrize("version", K8S_VERSIONS, ids=lambda v: v or "latest")
@pytest.mark.parametrize("path,resource", BUILTIN, ids=IDS)
def test_resource_validates_against_kubernetes_schema(path, resource, version):
    kv = kubernetes_validate()
    version = version or kv.latest_version()
    try:
        kv.validate(resource, version, strict=True)
    except kv.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{path.name}: {resource['kind']}/{resource['metadata']['name']}: {where}: {exc.message}")


def test_strict_validation_really_rejects_mistakes():
    kv = kubernetes_validate()
    deployment = copy.deepcopy(by_kind("Deployment")["s2amnet-api"])
    containers(deployment)[0]["readinessProbe"]["httpGett"] = {"path": "/readyz", "port": 8000}
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, "1.29", strict=True)
    deployment = copy.deepcopy(by_kind("Deployment")["s2amnet-api"])
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, "1.29", strict=True)


# ---------------------------------------------------------------------------------------------- KEDA
def keda_errors(doc: dict) -> list[str]:
    import jsonschema  # noqa: PLC0415

    schema = json.loads(KEDA_SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def scaled_object() -> dict:
    objs = by_kind("ScaledObject")
    assert list(objs) == ["s2amnet-worker"]
    return objs["s2amnet-worker"]


def test_scaled_object_matches_its_schema():
    assert keda_errors(scaled_object()) == []


def test_keda_schema_rejects_mistakes():
    bad = copy.deepcopy(scaled_object())
    bad["spec"]["triggers"][0]["metadata"]["lagCount"] = 16  # must be a string
    bad["spec"]["triggers"][1]["metadata"]["consumergroup"] = "workers"  # misspelt
    bad["spec"]["maxReplicas"] = 3  # HPA's name, not KEDA's
    errors = keda_errors(bad)
    assert any("lagCount" in e for e in errors) and any("consumergroup" in e for e in errors)
    assert any("maxReplicas" in e for e in errors)
    no_group = copy.deepcopy(scaled_object())
    del no_group["spec"]["triggers"][0]["metadata"]["consumerGroup"]
    assert keda_errors(no_group), "lagCount needs consumerGroup"


def test_keda_scales_the_gpu_worker_deployment_on_consumer_group_lag():
    from app.queue.constants import GROUP, job_stream  # noqa: PLC0415

    spec = scaled_object()["spec"]
    target = spec["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    worker = by_kind("Deployment")[target["name"]]
    assert "nvidia.com/gpu" in containers(worker)[0]["resources"]["limits"]
    assert 1 <= spec["minReplicaCount"] < spec["maxReplicaCount"]
    redis_service = by_kind("Service")["redis"]
    redis_port = redis_service["spec"]["ports"][0]["port"]
    streams = set()
    for trig in spec["triggers"]:
        md = trig["metadata"]
        assert trig["type"] == "redis-streams"
        assert md["consumerGroup"] == GROUP
        assert "lagCount" in md, "scale on the consumer-group lag"
        host, port = md["address"].rsplit(":", 1)
        assert host.split(".")[0] == "redis" and int(port) == redis_port
        assert host in {"redis", f"redis.{redis_service['metadata']['namespace']}.svc.cluster.local"}
        streams.add(md["stream"])
    models = set(SHIPPED_MODELS) | {p.parent.name for p in (ROOT / "weights").glob("*/manifest.json")}
    assert streams == {job_stream(m) for m in models}
    # lagCount = one full batch waiting per worker.
    config = by_kind("ConfigMap")["s2amnet-settings"]["data"]
    assert {t["metadata"]["lagCount"] for t in spec["triggers"]} == {config["S2AMNET_MAX_BATCH_SIZE"]}


def test_kustomization_lists_every_manifest_but_the_example_secret():
    kustomization = load_yaml(K8S_DIR / "kustomization.yaml")
    listed = set(kustomization["resources"])
    files = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == files - {"secret.example.yaml"}
    images = {i["name"] for i in kustomization["images"]}
    used = {
        c["image"].split(":")[0]
        for kind in ("Deployment", "StatefulSet")
        for w in by_kind(kind).values()
        for c in containers(w)
    }
    assert {"s2amnet", "s2amnet-gpu"} <= used and images == {"s2amnet", "s2amnet-gpu"}


# ---------------------------------------------------------------------------------------------- wiring
def workloads() -> list[dict]:
    return list(by_kind("Deployment").values()) + list(by_kind("StatefulSet").values())


def test_every_kind_is_validated_somewhere():
    assert {d["kind"] for _, d in RESOURCES} - {d["kind"] for _, d in BUILTIN} == {"ScaledObject"}


def test_everything_is_in_the_namespace():
    for _, d in RESOURCES:
        if d["kind"] == "Namespace":
            continue
        assert d["metadata"]["namespace"] == "s2amnet", d["metadata"]["name"]


def test_selectors_match_pod_labels():
    for w in workloads():
        selector = w["spec"]["selector"]["matchLabels"]
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), w["metadata"]["name"]
    pod_labels = [w["spec"]["template"]["metadata"]["labels"] for w in workloads()]
    for kind in ("Service", "PodDisruptionBudget"):
        for name, obj in by_kind(kind).items():
            sel = obj["spec"]["selector"]
            sel = sel.get("matchLabels", sel)
            assert any(sel.items() <= labels.items() for labels in pod_labels), (
                f"{kind}/{name} selects nothing"
            )


def test_service_target_ports_are_container_ports():
    for name, svc in by_kind("Service").items():
        sel = svc["spec"]["selector"]
        pods = [w for w in workloads() if sel.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        ports = {p.get("name") for w in pods for c in containers(w) for p in c.get("ports", [])}
        ports |= {p["containerPort"] for w in pods for c in containers(w) for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports, f"Service/{name}: targetPort {port['targetPort']}"


def test_config_references_exist_and_settings_are_known():
    configmaps = by_kind("ConfigMap")
    secrets = {d["metadata"]["name"]: d for d in (doc for _, doc in RESOURCES if doc["kind"] == "Secret")}
    known = settings_env_names()
    for w in workloads():
        for c in containers(w):
            for ref in c.get("envFrom", []):
                if "configMapRef" in ref:
                    assert ref["configMapRef"]["name"] in configmaps
                if "secretRef" in ref:
                    assert ref["secretRef"]["name"] in secrets, "documented in secret.example.yaml"
            env_names = {e["name"] for e in c.get("env", [])}
            for arg in c.get("args", []):
                for var in re.findall(r"\$\((\w+)\)", arg):
                    assert var in env_names, f"$({var}) in args is not defined in env"
            for e in c.get("env", []):
                if e["name"].startswith("S2AMNET_"):
                    assert e["name"] in known
    for cm in configmaps.values():
        for key, value in cm["data"].items():
            assert key in known, f"{key} is not a setting app/ reads"
            assert isinstance(value, str)
    for secret in secrets.values():
        assert set(secret["stringData"]) <= known


def test_api_probes_and_graceful_termination():
    api = by_kind("Deployment")["s2amnet-api"]
    pod = api["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["args"] == ["serve"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert c["startupProbe"]["httpGet"]["path"] == "/livez"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    config = by_kind("ConfigMap")["s2amnet-settings"]["data"]
    drain = float(config["S2AMNET_SHUTDOWN_DELAY_S"]) + float(config["S2AMNET_DRAIN_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] > drain
    assert api["spec"]["replicas"] >= 2
    assert by_kind("PodDisruptionBudget")["s2amnet-api"]["spec"]["minAvailable"] < api["spec"]["replicas"]


def test_worker_requests_a_gpu_and_drains():
    worker = by_kind("Deployment")["s2amnet-worker"]
    pod = worker["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["args"][0] == "worker"
    assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    config = by_kind("ConfigMap")["s2amnet-settings"]["data"]
    assert c["ports"][0]["containerPort"] == int(config["S2AMNET_METRICS_PORT"])
    assert c["livenessProbe"]["httpGet"]["port"] == c["ports"][0]["name"]
    # SIGTERM finishes the batch in hand; no longer than a job may stay unacked before others take it.
    assert pod["terminationGracePeriodSeconds"] >= float(config["S2AMNET_VISIBILITY_TIMEOUT_S"])
    assert "maxUnavailable" in by_kind("PodDisruptionBudget")["s2amnet-worker"]["spec"]


def test_pods_run_hardened_as_non_root():
    for w in workloads():
        pod = w["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
            assert c["resources"]["limits"]["memory"]


def test_redis_persists():
    redis = by_kind("StatefulSet")["redis"]
    args = containers(redis)[0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert containers(redis)[0]["image"].startswith("redis:7")
