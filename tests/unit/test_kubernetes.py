"""The Kubernetes manifests: rendered from serve-config.yaml and in sync with deploy/kubernetes/, valid against
KubeRay v1.7.0's RayService CRD and the Kubernetes API's models; Ray's token authentication, the NetworkPolicies
and every pod's hardening; the image installs what the README installs.

No container runtime or cluster exists here: nothing below builds an image or applies a manifest."""

from __future__ import annotations

import copy
import gzip
import json
import re
import shlex

import jsonschema
import pytest
import yaml
from kubernetes.client import ApiClient

from embedding_service import cli
from embedding_service.app import build_app
from embedding_service.config import HEAD_RESOURCE, AppArgs
from embedding_service.ops import kubernetes as k8s
from embedding_service.ops import servefile
from embedding_service.ops.servefile import ServeFile
from embedding_service.wire.messages import LIVENESS
from gateway import main as gateway_main
from tests.helpers.paths import ROOT

KUBERAY = ROOT / "tests" / "data" / "kuberay"  # copied from KubeRay v1.7.0 (the CRD gzipped)


@pytest.fixture(scope="module")
def crd_validator() -> jsonschema.Draft7Validator:
    with gzip.open(KUBERAY / "ray.io_rayservices.v1.7.0.yaml.gz", "rt") as f:
        crd = yaml.safe_load(f)
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    return jsonschema.Draft7Validator(schema)


def rendered(config: dict | None = None, **options) -> dict[str, list[dict]]:
    parsed = ServeFile.parse(config) if config is not None else ServeFile.load()
    texts = k8s.render(parsed, k8s.KubernetesOptions(**options))
    return {name: [d for d in yaml.safe_load_all(text) if d] for name, text in texts.items()}


def rayservice(config: dict | None = None, **options) -> dict:
    return rendered(config, **options)["rayservice.yaml"][0]


def groups(service: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]}


def templates(service: dict) -> list[dict]:
    cluster = service["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]


def containers(service: dict) -> list[dict]:
    return [c for t in templates(service) for c in t["spec"]["containers"]]


def pod_templates(manifests: dict[str, list[dict]]) -> list[dict]:
    """Every pod template rendered: the Ray head's, each worker group's and the gateway's."""
    deployment = next(o for o in manifests["gateway.yaml"] if o["kind"] == "Deployment")
    return templates(manifests["rayservice.yaml"][0]) + [deployment["spec"]["template"]]


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """A label selector (matchLabels, matchExpressions In/Exists) applied as Kubernetes applies it."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        assert e["operator"] in ("In", "Exists"), e
        if e["key"] not in labels or (e["operator"] == "In" and labels[e["key"]] not in e["values"]):
            return False
    return True


def admitted(policies: list[dict], pod_labels: dict[str, str], port: int) -> list[dict] | None:
    """The peers the NetworkPolicies admit to `port` of a pod with these labels (NetworkPolicies add up);
    None: any source (a rule without `from`)."""
    selecting = [p for p in policies if selects(p["spec"]["podSelector"], pod_labels)]
    assert selecting, f"no policy selects {pod_labels}: all ingress open"
    assert all(p["spec"]["policyTypes"] == ["Ingress"] for p in selecting)
    peers: list[dict] = []
    for rule in (r for p in selecting for r in p["spec"].get("ingress", [])):
        if "ports" in rule and not any(q["port"] == port and q["protocol"] == "TCP" for q in rule["ports"]):
            continue
        if not rule.get("from"):
            return None
        peers.extend(p for p in rule["from"] if p not in peers)
    return peers


def ray_pod_labels(template: dict) -> dict[str, str]:
    """A Ray pod's labels: its template's and those KubeRay adds (the RayCluster's generated name among them)."""
    return {**template["metadata"]["labels"], "ray.io/cluster": "embedding-service-x7k2q", "ray.io/is-ray-node": "yes"}


def in_namespace(name: str, **pod_labels: str) -> dict:
    peer: dict = {"namespaceSelector": {"matchExpressions": [
        {"key": "kubernetes.io/metadata.name", "operator": "In", "values": [name]}]}}
    if pod_labels:
        peer["podSelector"] = {"matchLabels": pod_labels}
    return peer


def round_trip(obj: dict, model: str) -> dict:
    """`obj` loaded into the official Kubernetes client's model (required fields and types checked) and written
    back: a field the API does not know, or of the wrong type, does not come back the same."""
    client = ApiClient()
    return client.sanitize_for_serialization(client.deserialize(json.dumps(obj), model, "application/json"))


def test_committed_manifests_are_the_render_of_serve_config():
    for name, text in k8s.render(ServeFile.load(), k8s.KubernetesOptions()).items():
        committed = ROOT / "deploy" / "kubernetes" / name
        assert committed.read_text() == text, f"{committed} is stale: run python -m embedding_service render-k8s"
    assert cli.main(["render-k8s", "--check"]) == 0


def test_the_check_command_notices_a_stale_manifest(tmp_path):
    assert cli.main(["render-k8s", "--out", str(tmp_path)]) == 0
    assert cli.main(["render-k8s", "--out", str(tmp_path), "--check"]) == 0
    stale = tmp_path / "rayservice.yaml"
    stale.write_text(stale.read_text().replace("maxReplicas: 1", "maxReplicas: 3"))
    assert cli.main(["render-k8s", "--out", str(tmp_path), "--check"]) == 1


def test_the_rayservice_validates_against_kuberays_crd(crd_validator):
    service = rayservice()
    assert [e.message for e in crd_validator.iter_errors(service)] == []
    for sample in KUBERAY.glob("ray-service.*.yaml"):  # the validator takes KubeRay's own samples ...
        assert [e.message for e in crd_validator.iter_errors(yaml.safe_load(sample.read_text()))] == [], sample
    broken = copy.deepcopy(service)  # ... and refuses what KubeRay would refuse
    broken["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "many"
    assert len(list(crd_validator.iter_errors(broken))) == 2


def test_pod_templates_and_gateway_objects_are_valid_kubernetes_objects():
    manifests = rendered()
    service = manifests["rayservice.yaml"][0]
    cluster = service["spec"]["rayClusterConfig"]
    for template in [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]:
        assert round_trip(template, "V1PodTemplateSpec") == template
    assert round_trip(service["spec"]["serveService"], "V1Service") == service["spec"]["serveService"]
    models = {"Deployment": "V1Deployment", "Service": "V1Service", "PodDisruptionBudget": "V1PodDisruptionBudget",
              "HorizontalPodAutoscaler": "V2HorizontalPodAutoscaler"}
    gateway = manifests["gateway.yaml"]
    assert sorted(o["kind"] for o in gateway) == sorted(models)
    for obj in gateway:
        assert round_trip(obj, models[obj["kind"]]) == obj, obj["kind"]
    policies = manifests["networkpolicy.yaml"]
    assert [p["kind"] for p in policies] == ["NetworkPolicy"] * 3
    for policy in policies:
        assert round_trip(policy, "V1NetworkPolicy") == policy
    # The round trip can fail: a misspelt field is dropped by the model.
    wrong = copy.deepcopy(gateway[0])
    wrong["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    assert round_trip(wrong, "V1Deployment") != wrong


def test_serve_config_v2_is_the_config_files_applications_and_build_app_takes_them():
    loaded = ServeFile.load()
    config = loaded.raw
    service = rayservice()
    serve = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert serve["applications"] == config["applications"]
    assert serve["grpc_options"] == config["grpc_options"] and serve["proxy_location"] == config["proxy_location"]
    assert serve["http_options"] == {**config["http_options"], "host": "0.0.0.0"}  # KubeRay checks proxies over HTTP
    args = serve["applications"][0]["args"]
    assert AppArgs.parse(args) == AppArgs.parse(config["applications"][0]["args"])
    assert build_app(args) is not None
    # Every Ray pod gets what `run` gives its Ray nodes; the API keys come from a Secret.
    env = loaded.node_environment()
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1" and "EMBEDDING_SERVE_GRPC_OPTIONS" in env
    assert env["RAY_preload_python_modules"] == "embedding_service.proxy.grpc_options"
    for container in containers(service):
        values = {e["name"]: e.get("value") for e in container["env"]}
        assert {k: v for k, v in values.items() if k in env} == env
        secret = next(e for e in container["env"] if e["name"] == "EMBEDDING_API_KEYS")["valueFrom"]["secretKeyRef"]
        assert secret == {"name": "embedding-service-api-keys", "key": "api-keys"}
    assert "EMBEDDING_API_KEYS" not in service["spec"]["serveConfigV2"].replace("api_keys_env: EMBEDDING_API_KEYS", "")


def test_groups_probes_and_ports():
    args = ServeFile.load().args
    service = rayservice()
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == k8s.RAY_VERSION and cluster["enableInTreeAutoscaling"] is True
    # The head holds the router and the recycler, no models: they claim CPU and the head offers none to Ray.
    start = cluster["headGroupSpec"]["rayStartParams"]
    assert start["num-cpus"] == "0"
    assert HEAD_RESOURCE in args.router.resources and HEAD_RESOURCE in args.recycler.resources
    assert all(m.num_cpus > 0 and HEAD_RESOURCE not in m.resources for m in args.models)
    # Only the head declares the head's resource, as `ray start` reads it through KubeRay's shell command.
    (flag,) = shlex.split(f"--resources={start['resources']}")
    assert json.loads(flag.removeprefix("--resources=")) == {HEAD_RESOURCE: 1}
    assert all("resources" not in g["rayStartParams"] for g in cluster["workerGroupSpecs"])
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["livenessProbe"]["grpc"] == {"port": 9000, "service": LIVENESS}
    assert "grpc" not in head["readinessProbe"]  # KubeRay deploys the app only once the head is Ready
    assert {"name": "serve-grpc", "containerPort": 9000} in head["ports"]  # KubeRay's serve Service takes it
    assert {"name": "serve-grpc", "port": 9000, "targetPort": 9000, "appProtocol": "kubernetes.io/h2c"} in \
        service["spec"]["serveService"]["spec"]["ports"]
    cpu, gpu = groups(service)["cpu-workers"], groups(service)["gpu-workers"]
    model = args.models[0]
    assert cpu["rayStartParams"]["num-cpus"] == "1" == str(int(model.num_cpus))  # one replica per pod
    worker = cpu["template"]["spec"]["containers"][0]
    assert worker["resources"]["requests"]["cpu"] == str(model.threads) == worker["resources"]["limits"]["cpu"]
    assert worker["readinessProbe"]["grpc"] == {"port": 9000, "service": ""}
    assert (cpu["minReplicas"], cpu["maxReplicas"]) == (model.num_replicas, model.num_replicas)
    assert (gpu["minReplicas"], gpu["maxReplicas"]) == (0, 0)  # no model claims a GPU in the shipped config
    for template in [cluster["headGroupSpec"]["template"], cpu["template"], gpu["template"]]:
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True


def test_a_gpu_model_in_serve_config_flows_into_the_gpu_group():
    config = servefile.read()
    model = config["applications"][0]["args"]["models"][0]
    model.update(device="cuda", num_gpus=0.5, num_cpus=2, autoscaling={"min_replicas": 2, "max_replicas": 8})
    service = rayservice(config, gpu_type="NVIDIA-L4", gpu_image="r/e:cuda")
    gpu, cpu = groups(service)["gpu-workers"], groups(service)["cpu-workers"]
    assert (gpu["minReplicas"], gpu["maxReplicas"]) == (1, 4)  # two replicas per GPU
    assert (cpu["minReplicas"], cpu["maxReplicas"]) == (0, 0)
    container = gpu["template"]["spec"]["containers"][0]
    assert container["image"] == "r/e:cuda" and container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu["rayStartParams"] == {"num-cpus": "2", "metrics-export-port": "8080", "num-gpus": "1"}
    assert gpu["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L4"}
    assert gpu["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    bounded = groups(rayservice(config, gpu_workers=k8s.Bounds(min=0, max=2), gpu_tolerations=[]))["gpu-workers"]
    assert (bounded["minReplicas"], bounded["maxReplicas"]) == (0, 2) and "tolerations" not in bounded["template"]["spec"]


def test_the_image_installs_with_the_readmes_script_and_pins_versions():
    dockerfile = (ROOT / "deploy" / "docker" / "Dockerfile").read_text()
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"^(scripts/install\.sh.*)$", readme, flags=re.MULTILINE)
    assert len(commands) >= 2 and any("pytest" in c for c in commands) and any(" run" in c for c in commands)
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in ci
    assert re.search(r"^ +TORCH_INDEX_URL=.* scripts/install\.sh --release ", dockerfile, flags=re.MULTILINE)
    # The official image by default, an exact version; scripts/image.sh names a stand-in where no registry answers.
    assert re.search(r"^ARG BASE_IMAGE=python:\d+\.\d+\.\d+-slim-bookworm$", dockerfile, flags=re.MULTILINE)
    # One stage: the checkout is mounted for the install's step, not copied into a layer.
    assert re.findall(r"^FROM .*$", dockerfile, flags=re.MULTILINE) == ["FROM ${BASE_IMAGE}"]
    assert re.search(r"^RUN --mount=type=bind,target=(\S+) \\$", dockerfile, flags=re.MULTILINE)
    assert not re.search(r"^COPY \. ", dockerfile, flags=re.MULTILINE)
    assert re.search(r"^USER 1000", dockerfile, flags=re.MULTILINE)  # not root
    assert "PIP_CONSTRAINT=/tmp/checkout/deploy/docker/constraints.txt" in dockerfile
    install = (ROOT / "scripts" / "install.sh").read_text()
    assert "TORCH_VERSION=2.13.0" in install
    pins = [line for line in (ROOT / "deploy" / "docker" / "constraints.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    assert pins and all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][0-9A-Za-z.+\-]*", p) for p in pins)
    assert f"ray=={k8s.RAY_VERSION}" in pins  # the manifests' rayVersion is the image's Ray


def test_ray_requires_its_token_from_a_named_secret(crd_validator):
    service = rayservice()
    cluster = service["spec"]["rayClusterConfig"]
    # KubeRay v1.7 sets RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (the Secret's auth_token) in every Ray container,
    # the autoscaler's and the workers' wait-gcs-ready included, and its operator sends the token to the dashboard.
    assert cluster["authOptions"] == {"mode": "token", "secretName": "embedding-service-ray-token"}
    assert k8s.RAY_TOKEN_KEY == "auth_token"
    assert [e.message for e in crd_validator.iter_errors(service)] == []
    # The CRD names exactly these fields; a mode it does not know is refused.
    with gzip.open(KUBERAY / "ray.io_rayservices.v1.7.0.yaml.gz", "rt") as f:
        crd = yaml.safe_load(f)
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    auth = schema["properties"]["spec"]["properties"]["rayClusterConfig"]["properties"]["authOptions"]
    assert sorted(auth["properties"]) == ["enableK8sTokenAuth", "mode", "secretName"]
    assert auth["properties"]["mode"]["enum"] == ["disabled", "token"]
    broken = copy.deepcopy(service)
    broken["spec"]["rayClusterConfig"]["authOptions"]["mode"] = "on"
    assert len(list(crd_validator.iter_errors(broken))) == 1
    # No token in the manifest: RAY_AUTH_* come from KubeRay, the token from the Secret.
    assert all(not e["name"].startswith("RAY_AUTH") for c in containers(service) for e in c["env"])
    # Without a Secret named, KubeRay generates one per RayCluster.
    assert rayservice(ray_token_secret=None)["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}
    # The README's steps create the Secret under KubeRay's key.
    docs = (ROOT / "docs" / "kubernetes.md").read_text()
    assert "secret generic embedding-service-ray-token --from-literal=auth_token=" in docs


def test_network_policies_admit_only_what_each_port_needs():
    manifests = rendered()
    policies = manifests["networkpolicy.yaml"]
    service = manifests["rayservice.yaml"][0]
    gateway_pod = pod_templates(manifests)[-1]["metadata"]["labels"]
    assert all(p["metadata"]["namespace"] == "embedding" for p in policies)
    # Default deny: one policy without rules selects every pod of the service (and nothing else).
    (deny,) = [p for p in policies if "ingress" not in p["spec"]]
    for template in pod_templates(manifests):
        assert selects(deny["spec"]["podSelector"], template["metadata"]["labels"])
    assert not selects(deny["spec"]["podSelector"], {"app.kubernetes.io/name": "other"})
    ray_pods = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "embedding-service"},
                                "matchExpressions": [{"key": "ray.io/cluster", "operator": "Exists"}]}}
    gateway_pods = {"podSelector": {"matchLabels": gateway_pod}}
    operator = in_namespace("default", **{"app.kubernetes.io/component": "kuberay-operator"})
    monitoring = in_namespace("monitoring")
    for template in templates(service):
        pod = ray_pod_labels(template)
        # GCS, the client port and Ray's other ports (picked at start): the service's own Ray pods only.
        for port in (6379, 10001, 52365, 20000):
            assert admitted(policies, pod, port) == [ray_pods], port
        assert admitted(policies, pod, 9000) == [ray_pods, gateway_pods]  # Serve's gRPC: the gateway
        assert admitted(policies, pod, 8265) == [ray_pods, operator]  # the dashboard: KubeRay's operator
        assert admitted(policies, pod, 8000) == [ray_pods, operator]  # the proxy's health, which KubeRay checks
        assert admitted(policies, pod, 8080) == [ray_pods, monitoring]  # Ray's metrics
    # The Ray pods' selector needs KubeRay's label: the gateway is not a Ray pod, a pod without it not either.
    assert not selects(ray_pods["podSelector"], gateway_pod)
    assert not selects(ray_pods["podSelector"], templates(service)[0]["metadata"]["labels"])
    # The gateway: its users (anyone by default) and the metrics scrape, on its one port; nothing else.
    assert admitted(policies, gateway_pod, 8080) is None
    assert admitted(policies, gateway_pod, 9000) == admitted(policies, gateway_pod, 6379) == []

    # What an operator supplies.
    policies = rendered(operator_namespace="ray-system", monitoring_namespace=None, gateway_client_namespaces=["web"],
                        grpc_client_namespaces=["batch"], operator_pod_labels={})["networkpolicy.yaml"]
    pod = ray_pod_labels(templates(service)[0])
    assert admitted(policies, pod, 8265) == [ray_pods, in_namespace("ray-system")]
    assert admitted(policies, pod, 9000) == [ray_pods, gateway_pods, in_namespace("batch")]
    assert admitted(policies, pod, 8080) == [ray_pods]
    assert admitted(policies, gateway_pod, 8080) == [in_namespace("web")]
    closed = rendered(gateway_client_namespaces=[])["networkpolicy.yaml"]  # no namespace: no rule, not an empty `from`
    assert admitted(closed, gateway_pod, 8080) == [monitoring]
    with pytest.raises(ValueError):
        k8s.KubernetesOptions(grpc_client_namespaces=["Not A Namespace"])


def test_every_pod_and_container_is_hardened():
    manifests = rendered()
    service = manifests["rayservice.yaml"][0]
    cluster = service["spec"]["rayClusterConfig"]
    dockerfile = (ROOT / "deploy" / "docker" / "Dockerfile").read_text()
    assert re.search(rf"^USER {k8s.IMAGE_UID}:{k8s.IMAGE_UID}$", dockerfile, flags=re.MULTILINE)  # runs as non-root
    assert re.search(rf"^ENV HOME={k8s.IMAGE_HOME}$", dockerfile, flags=re.MULTILINE)
    hardened = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "readOnlyRootFilesystem": True,
                "runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    ray_templates = templates(service)
    for template in pod_templates(manifests):
        spec = template["spec"]
        assert spec["securityContext"] == {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000,
                                           "fsGroup": 1000, "seccompProfile": {"type": "RuntimeDefault"}}
        assert spec["automountServiceAccountToken"] is False  # none of their processes calls the Kubernetes API
        volumes = {v["name"]: v for v in spec["volumes"]}
        (container,) = spec["containers"]
        assert container["securityContext"] == hardened, container["name"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        # The root is read-only: writable emptyDirs where Ray's session, temporary files and caches go.
        writable = {"/tmp", "/tmp/ray", "/home/ray"} if template in ray_templates else {"/tmp"}
        assert {p for p, n in mounts.items() if "emptyDir" in volumes[n]} == writable, container["name"]
        assert k8s.SERVICE_ACCOUNT_DIR not in mounts
    # KubeRay's volume for the session folder, so that it shares this one with the head's autoscaler.
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}["/tmp/ray"] == "ray-logs"
    # The autoscaler sidecar KubeRay adds: the same hardening, and the pod's one API token (it scales the groups).
    autoscaler = cluster["autoscalerOptions"]
    assert autoscaler["securityContext"] == hardened and autoscaler["version"] == "v2"
    mounts = {m["mountPath"]: m for m in autoscaler["volumeMounts"]}
    assert {"/tmp", "/home/ray"} <= set(mounts)
    token = mounts[k8s.SERVICE_ACCOUNT_DIR]
    assert token["readOnly"] is True
    (volume,) = [v for v in head["volumes"] if v["name"] == token["name"]]
    assert [sorted(s) for s in volume["projected"]["sources"]] == [["serviceAccountToken"], ["configMap"],
                                                                  ["downwardAPI"]]
    assert all(token["name"] not in {v["name"] for v in t["spec"]["volumes"]} for t in ray_templates[1:])


def test_the_services_api_keys_reach_only_the_pods_that_check_them():
    config = servefile.read()
    config["applications"][0]["args"]["auth"]["api_keys_file"] = "/etc/embedding/keys.json"
    for manifests in (rendered(), rendered(config)):
        for container in containers(manifests["rayservice.yaml"][0]):  # Serve's proxy and the router check them
            assert "EMBEDDING_API_KEYS" in {e["name"] for e in container["env"]}
        deployment = next(o for o in manifests["gateway.yaml"] if o["kind"] == "Deployment")
        spec = deployment["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
        # Its own callers' keys, and the one key it calls the service with: never the service's list.
        assert refs == {"GATEWAY_API_KEYS": {"name": "embedding-gateway-api-keys", "key": "api-keys"},
                        "GATEWAY_UPSTREAM_API_KEY": {"name": "embedding-service-api-keys", "key": "gateway-key"}}
        assert all("secret" not in v for v in spec["volumes"])
    # The key file, where the config names one, is mounted in the Ray pods alone.
    for template in templates(rendered(config)["rayservice.yaml"][0]):
        (keys,) = [v["secret"] for v in template["spec"]["volumes"] if "secret" in v]
        assert keys["secretName"] == "embedding-service-api-keys" and keys["items"][0]["key"] == "api-keys"


STORE_ENV = "EMBEDDING_JOBS_STORE_URL"


def jobs_config(**jobs) -> dict:
    """The shipped config with batch jobs on, as they can run on Kubernetes."""
    config = servefile.read()
    config["applications"][0]["args"]["jobs"] = {
        "storage_root": "s3://corpora/embedding", "s3_endpoint": "http://seaweedfs.storage.svc:8333",
        "store_url_env": STORE_ENV, "dataset_roots": ["s3://corpora/datasets"], "actor_resources": {"batch": 1},
        **jobs}
    return config


def _env_refs(container: dict) -> dict[str, dict]:
    return {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}


def test_batch_jobs_get_a_pool_group_and_their_store_and_root_from_a_secret(crd_validator):
    manifests = rendered(jobs_config(retention_s=3600, limits={
        "max_file_bytes": 12345, "max_files_per_key": 7, "max_jobs_per_key": 8, "max_running_jobs_per_key": 2}))
    service = manifests["rayservice.yaml"][0]
    assert [e.message for e in crd_validator.iter_errors(service)] == []
    for template in templates(service):
        assert round_trip(template, "V1PodTemplateSpec") == template
    # The pools' group: from zero to a pod per actor of the most jobs running, each pod declaring one actor's
    # resources (which no other group declares) and its CPU with the read, write and filter work beside it.
    batch = groups(service)["batch-workers"]
    assert (batch["replicas"], batch["minReplicas"], batch["maxReplicas"]) == (0, 0, 2 * 2)
    assert json.loads(json.loads(batch["rayStartParams"]["resources"])) == {"batch": 1}
    assert batch["rayStartParams"]["num-cpus"] == "3"
    (pod,) = batch["template"]["spec"]["containers"]
    assert pod["resources"]["limits"]["cpu"] == "3" and "nvidia.com/gpu" not in pod["resources"]["limits"]
    for name, group in groups(service).items():
        if name != "batch-workers":
            assert "batch" not in group["rayStartParams"].get("resources", ""), name
    # The store's URL: from the Secret, in the head's environment alone (the manager, runners and router).
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert _env_refs(head)[STORE_ENV] == {"name": "embedding-service-jobs", "key": "store-url"}
    for group in groups(service).values():
        assert STORE_ENV not in {e["name"] for e in group["template"]["spec"]["containers"][0]["env"]}
    # The S3 credentials, optional in the Secret: in every Ray pod, wherever Ray runs a job's reads and writes.
    for container in containers(service):
        refs = _env_refs(container)
        assert refs["AWS_ACCESS_KEY_ID"] == {"name": "embedding-service-jobs", "key": "aws-access-key-id",
                                             "optional": True}
        assert refs["AWS_SECRET_ACCESS_KEY"]["key"] == "aws-secret-access-key"
    # The gateway's Files and Batches: the same root and bounds on its command line, the same store and keys.
    deployment = next(o for o in manifests["gateway.yaml"] if o["kind"] == "Deployment")
    (gateway,) = deployment["spec"]["template"]["spec"]["containers"]
    args = gateway["args"]
    assert args[args.index("--jobs-storage-root") + 1] == "s3://corpora/embedding"
    assert args[args.index("--jobs-s3-endpoint") + 1] == "http://seaweedfs.storage.svc:8333"
    settings = gateway_main.parse_args([*args, "--api-keys", "k"])  # as the gateway reads its command line
    assert (settings.jobs_storage_root, settings.jobs_s3_endpoint) == ("s3://corpora/embedding",
                                                                       "http://seaweedfs.storage.svc:8333")
    assert (settings.max_file_bytes, settings.max_files_per_key, settings.max_jobs_per_key,
            settings.max_running_jobs_per_key, settings.files_retention_s) == (12345, 7, 8, 2, 3600.0)
    refs = _env_refs(gateway)
    assert refs["GATEWAY_JOBS_STORE_URL"] == {"name": "embedding-service-jobs", "key": "store-url"}
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(refs)
    assert round_trip(deployment, "V1Deployment") == deployment
    # The Serve config names the variable, never the URL.
    serve = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert serve["applications"][0]["args"]["jobs"]["store_url_env"] == STORE_ENV
    # GPU actors: the group's pods take a GPU and the CUDA image.
    gpu = groups(rayservice(jobs_config(num_gpus_per_actor=1), batch_workers={"min": 1, "max": 3}))["batch-workers"]
    assert (gpu["minReplicas"], gpu["maxReplicas"], gpu["rayStartParams"]["num-gpus"]) == (1, 3, "1")
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu["template"]["spec"]["containers"][0]["image"] == k8s.KubernetesOptions().gpu_image
    # The pod's CPU covers the threads the actor's model runs: jobs.threads_per_actor where set, not the model's.
    wide = groups(rayservice(jobs_config(threads_per_actor=6)))["batch-workers"]
    assert wide["rayStartParams"]["num-cpus"] == "3"
    assert wide["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] == "6"
    # Jobs off (the shipped config): no group, no jobs' Secret anywhere.
    assert "batch-workers" not in groups(rayservice())
    assert "embedding-service-jobs" not in json.dumps(rendered())


@pytest.mark.parametrize(("change", "why"), [
    ({"storage_root": "/data/jobs"}, "must be s3:// URIs on Kubernetes, where pods share no folder: /data/jobs"),
    ({"dataset_roots": ["s3://ok", "/mnt/corpora"]}, "must be s3:// URIs on Kubernetes.*: /mnt/corpora"),
    ({"actor_resources": {}}, "jobs.actor_resources must name a resource"),
])
def test_a_jobs_config_that_cannot_work_on_kubernetes_is_refused_saying_why(change, why, tmp_path, capsys):
    with pytest.raises(k8s.Unrenderable, match=why):
        rendered(jobs_config(**change))
    path = tmp_path / "serve-config.yaml"
    path.write_text(yaml.safe_dump(jobs_config(**change)))
    assert cli.main(["render-k8s", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
    assert re.search(why, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()
