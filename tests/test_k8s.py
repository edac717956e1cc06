"""deploy/k8s against the Kubernetes schemas and the code: every object
validates offline (kubernetes-validate, strict: no unknown fields), every
command parses with its service's own flags, ports and probes agree with
conveyor_common.defaults, the scheduler dials the headless Services by name
with TLS, network policies admit only the scheduler, and each autoscaler
targets something that exists. No cluster is needed: the files are read."""

from __future__ import annotations

import importlib
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from conveyor_common import defaults
from llm_worker import metrics as worker_metrics

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
# The oldest release the manifests use fields of (appArmorProfile: 1.30),
# and the newest the validator knows.
VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())

# container name -> (package, port, metrics port, health port, gRPC service)
SERVICES = {
    "scheduler": (
        "scheduler",
        defaults.SCHEDULER_PORT,
        defaults.SCHEDULER_METRICS_PORT,
        defaults.SCHEDULER_HEALTH_PORT,
        "conveyor.v1.ConveyorService",
    ),
    "llm-worker": (
        "llm_worker",
        defaults.WORKER_PORT,
        defaults.WORKER_METRICS_PORT,
        defaults.WORKER_HEALTH_PORT,
        "conveyor.v1.LlmWorkerService",
    ),
    "tool-gateway": (
        "tool_gateway",
        defaults.GATEWAY_PORT,
        defaults.GATEWAY_METRICS_PORT,
        defaults.GATEWAY_HEALTH_PORT,
        "conveyor.v1.ToolGatewayService",
    ),
}


def _files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    out = []
    for path in _files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                doc["_file"] = path.name
                out.append(doc)
    return out


def _of(objects, kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def _named(objects, kind: str, name: str) -> dict:
    found = [o for o in _of(objects, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"one {kind} named {name}"
    return found[0]


@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_validates_against_the_kubernetes_schemas(objects, version):
    for obj in objects:
        body = {k: v for k, v in obj.items() if k != "_file"}
        try:
            kubernetes_validate.validate(body, version, strict=True)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as e:
            where = f"{obj['_file']} {obj['kind']}/{obj['metadata']['name']} ({version})"
            pytest.fail(f"{where}: {getattr(e, 'message', e)}")


def test_the_kustomization_lists_every_manifest_but_the_gpu_variant():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in _files()} - {"llm-worker-gpu.yaml"}
    assert all((K8S / name).exists() for name in listed)


def _flags(container: dict):
    package = SERVICES[container["name"]][0]
    argv = [str(a) for a in container["command"]]
    assert argv[:3] == ["python", "-m", package]
    parser = importlib.import_module(f"{package}.config").build_parser()
    return parser.parse_args(argv[3:])


def _containers(objects):
    for deployment in _of(objects, "Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        for container in spec["containers"]:
            yield deployment, spec, container


def test_commands_parse_and_agree_with_the_defaults(objects):
    seen = set()
    for deployment, pod, container in _containers(objects):
        name = container["name"]
        package, port, metrics_port, health_port, service = SERVICES[name]
        seen.add(name)
        args = _flags(container)
        assert args.host == "0.0.0.0"
        assert (args.port, args.metrics_port, args.health_port) == (
            port,
            metrics_port,
            health_port,
        )
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["grpc"] == port and ports["metrics"] == metrics_port
        assert ports["health"] == health_port
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(metrics_port)
        # Native gRPC probes on the plaintext health-only port; readiness asks
        # for the service itself (NOT_SERVING while a worker loads).
        ready = container["readinessProbe"]["grpc"]
        assert ready == {"port": health_port, "service": service}
        assert container["livenessProbe"]["grpc"]["port"] == health_port
        if "startupProbe" in container:
            assert container["startupProbe"]["grpc"]["port"] == health_port
        # Resource requests and limits, memory limited.
        assert container["resources"]["requests"]["cpu"]
        assert container["resources"]["limits"]["memory"]
        # The grace period outlasts --grace, so in-flight streams can finish.
        assert pod["terminationGracePeriodSeconds"] > args.grace
        # Every certificate, key and token file comes from a mounted Secret.
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        secrets = {v["name"] for v in pod["volumes"] if "secret" in v}
        for path in (args.tls_cert, args.tls_key, args.tls_ca, args.auth_token_file):
            if path:
                directory = str(Path(path).parent)
                assert mounts.get(directory) in secrets, f"{name}: {path} is not in a Secret"
        assert args.tls_cert and args.tls_key, f"{name} serves TLS"
    assert seen == set(SERVICES)


def test_worker_and_gateway_admit_only_the_scheduler_by_mutual_tls(objects):
    for _, _, container in _containers(objects):
        args = _flags(container)
        if container["name"] == "scheduler":
            assert args.auth_token_file, "the public API takes tokens"
            assert args.downstream_tls_ca, "it dials the worker and gateway with TLS"
        else:
            assert args.tls_ca and args.tls_allowed_names == "scheduler"


def test_the_scheduler_dials_the_headless_services(objects):
    scheduler = next(c for _, _, c in _containers(objects) if c["name"] == "scheduler")
    args = _flags(scheduler)
    for target, name in ((args.worker_target, "llm-worker"), (args.gateway_target, "tool-gateway")):
        service = _named(objects, "Service", name)
        assert service["spec"]["clusterIP"] == "None", f"{name} must be headless"
        port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
        assert target == f"dns:///{name}:{port}"
        # Every Deployment whose pods carry the selector's labels serves it.
        selector = service["spec"]["selector"]
        backing = [
            d
            for d in _of(objects, "Deployment")
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert backing, f"no pods behind {name}"


def test_network_policies_admit_only_the_scheduler_and_give_the_gateway_no_egress(objects):
    policies = _of(objects, "NetworkPolicy")
    for app, port, metrics_port in (
        ("llm-worker", defaults.WORKER_PORT, defaults.WORKER_METRICS_PORT),
        ("tool-gateway", defaults.GATEWAY_PORT, defaults.GATEWAY_METRICS_PORT),
    ):
        ingress = [
            p
            for p in policies
            if p["spec"]["podSelector"]["matchLabels"] == {"app": app}
            and "Ingress" in p["spec"]["policyTypes"]
        ]
        assert len(ingress) == 1
        rules = ingress[0]["spec"]["ingress"]
        grpc_rules = [r for r in rules if {"protocol": "TCP", "port": port} in r["ports"]]
        assert len(grpc_rules) == 1
        assert grpc_rules[0]["from"] == [{"podSelector": {"matchLabels": {"app": "scheduler"}}}]
        # Nothing else reaches the gRPC port: the other rules open metrics only.
        for rule in rules:
            if rule is not grpc_rules[0]:
                assert rule["ports"] == [{"protocol": "TCP", "port": metrics_port}]
    egress = [
        p
        for p in policies
        if p["spec"]["podSelector"]["matchLabels"] == {"app": "tool-gateway"}
        and p["spec"]["policyTypes"] == ["Egress"]
    ]
    assert len(egress) == 1 and egress[0]["spec"]["egress"] == []


def test_autoscalers_target_deployments_and_real_metrics(objects):
    hpas = {h["metadata"]["name"]: h for h in _of(objects, "HorizontalPodAutoscaler")}
    assert set(hpas) == {"scheduler", "llm-worker", "tool-gateway"}
    for hpa in hpas.values():
        target = hpa["spec"]["scaleTargetRef"]
        assert target["kind"] == "Deployment"
        _named(objects, "Deployment", target["name"])
    for name in ("scheduler", "tool-gateway"):
        assert hpas[name]["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    pods_metric = hpas["llm-worker"]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert pods_metric == worker_metrics.WAITING._name
    adapter = yaml.safe_load((K8S / "extras" / "prometheus-adapter-values.yaml").read_text())
    assert adapter["rules"]["custom"][0]["name"]["as"] == pods_metric


def test_the_gpu_variant_asks_for_a_gpu_and_runs_vllm(objects):
    gpu = _named(objects, "Deployment", "llm-worker-gpu")
    container = gpu["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    args = _flags(container)
    assert (args.engine, args.device) == ("vllm", "cuda")
    assert gpu["spec"]["template"]["metadata"]["labels"]["app"] == "llm-worker"


def test_the_gateway_is_loosened_for_bubblewrap_and_the_others_are_locked(objects):
    for _, pod, container in _containers(objects):
        context = container["securityContext"]
        if container["name"] == "tool-gateway":
            assert set(context["capabilities"]["add"]) == {"SYS_ADMIN", "NET_ADMIN"}
            assert context["seccompProfile"]["type"] == "Unconfined"
            assert context["procMount"] == "Unmasked" and pod["hostUsers"] is False
        else:
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
