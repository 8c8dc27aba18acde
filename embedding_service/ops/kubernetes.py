"""Kubernetes manifests rendered from the one config: a KubeRay RayService and the gateway's objects.

`python -m embedding_service render-k8s` writes them (deploy/kubernetes/ holds those of the shipped config,
kept in sync by a test). What comes from where:
- `serveConfigV2` is the config file's Serve settings and applications as they are; only the HTTP proxy's host
  is opened to the pod network (KubeRay checks Serve's proxies over HTTP).
- Every pod's environment is what `run` gives its Ray nodes (ServeFile.node_environment): Serve's settings,
  the transport caps and the proxy's gRPC options; API keys come from a Secret, never from the manifest.
- The head group holds Serve's controller and proxy, the router and the recycler (both pinned there by the
  head's own resource, config.HEAD_RESOURCE, which only the head group declares) and no models
  (`num-cpus: "0"`). Models with `num_gpus` 0 run in the CPU
  worker group, the others in the GPU worker group; each group's pod is sized for one replica (its CPU claim,
  and its threads), and its bounds are the models' replica bounds unless given.
- Probes, all Kubernetes' own (KubeRay v1.7 keeps probes it finds instead of adding its wget commands, and waits
  for the head pod to be Ready before it submits the Serve config): the head's liveness is gRPC health
  `liveness` (its proxy answers, whatever the models say); its readiness is Ray's GCS health over HTTP, since a
  probe that waited for the app would never let the app be deployed. Workers' readiness is gRPC health ""
  (this pod's proxy is up and the service serves: only then does the serve Service send it calls); their
  liveness is their raylet's health over HTTP (a worker with no replica has no proxy, and is not dead).
- Ray's control plane: token authentication (KubeRay's `authOptions`, the token from a Secret every node and the
  operator read), and a NetworkPolicy (networkpolicy.yaml) that denies ingress to this service's pods but for
  Ray's own traffic between its Ray pods, the gateway's calls, the operator's dashboard and proxy checks, the
  metrics scrape and the gateway's users.
- Batch jobs (args.jobs), where the config turns them on: their store is PostgreSQL (the URL from a Secret, in the
  head's environment under jobs.store_url_env: the manager, the runners and the router's CreateJob run there) and
  their storage root and dataset roots are S3 URIs (pods share no folder, and KubeRay replaces the head pod at
  each upgrade); the S3 credentials, optional in that Secret, reach every Ray pod (a job's reads and writes run
  wherever Ray places them) and the gateway, whose Files and Batches routes use the same store and root. The
  pools run in a worker group of their own, one model actor a pod, which declares jobs.actor_resources and scales
  from zero. The render refuses a jobs config that cannot work there, saying why.
- Every pod runs as the image's user with no privilege, no capability, the runtime's seccomp profile, a read-only
  root filesystem (writable emptyDirs where Ray and the libraries write) and no Kubernetes API token but the
  autoscaler's. The service's API keys reach only the Ray pods, whose proxy and router check them; the gateway
  gets its own keys and the one key it calls the service with.
"""

from __future__ import annotations

import copy
import json
import math
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import Field

from embedding_service.config import HEAD_RESOURCE, AppArgs, ModelSettings, Strict
from embedding_service.ops.servefile import ServeFile
from embedding_service.wire.messages import LIVENESS

RAY_VERSION = "2.60.0"  # the image's Ray (deploy/docker/constraints.txt pins it; a test checks they agree)
GRPC_PORT_NAME = "serve-grpc"  # KubeRay puts head ports named serve or serve-* in the serve Service
METRICS_PORT = 8080
DASHBOARD_AGENT_PORT = 52365  # Ray's default; its /api/local_raylet_healthz is what KubeRay's own probe asks
DASHBOARD_PORT = 8265
GATEWAY_PORT = 8080
API_KEYS_KEY = "api-keys"  # the key of the service's Secret that holds its API keys
GATEWAY_KEY = "gateway-key"  # ... and the one key the gateway calls the service with
RAY_TOKEN_KEY = "auth_token"  # the key KubeRay v1.7 reads Ray's token from in authOptions.secretName's Secret
JOBS_STORE_KEY = "store-url"  # the key of the jobs' Secret that holds the store's SQLAlchemy URL
# ... and the S3 credentials, optional there (pods may get them otherwise: IRSA, workload identity).
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "aws-access-key-id", "AWS_SECRET_ACCESS_KEY": "aws-secret-access-key"}
BATCH_GROUP = "batch-workers"
# A batch pod's Ray CPUs beyond its model actor's: a resumed job's checkpoint filter (1) and its read and write
# tasks (pipeline.py's FILTER_ACTORS and IO_TASK_CPUS).
BATCH_POD_SPARE_CPUS = 2
# The image's user (deploy/docker/Dockerfile: USER 1000:1000) and its home (HOME=/home/ray).
IMAGE_UID = 1000
IMAGE_HOME = "/home/ray"
# The writable places of a Ray pod, each an emptyDir over the read-only root: Ray's session folder (KubeRay's own
# volume name for it, so the head's autoscaler sidecar shares it as KubeRay means it to), /tmp (Python's temporary
# files, ONNX exports) and the home (HF, torch and Triton caches, ~/.ray).
RAY_WRITABLE = {"tmp": "/tmp", "ray-logs": "/tmp/ray", "home": IMAGE_HOME}
GATEWAY_WRITABLE = {"tmp": "/tmp"}
# Where the kubelet would mount a pod's API token; only the autoscaler sidecar gets one there.
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
NAMESPACE_LABEL = "kubernetes.io/metadata.name"  # set by Kubernetes (1.22+) on every namespace
RAY_CLUSTER_LABEL = "ray.io/cluster"  # set by KubeRay on every Ray pod: the RayCluster's generated name
HEADER = "# Rendered by `python -m embedding_service render-k8s` from serve-config.yaml; edit that, not this.\n"
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
# The gateway pod's drain delay: load balancers stop sending before it stops accepting.
GATEWAY_DRAIN_DELAY_S = 5


class Bounds(Strict):
    min: int = Field(ge=0)
    max: int = Field(ge=0)


NAMESPACE_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
Namespace = Annotated[str, Field(pattern=NAMESPACE_PATTERN, max_length=63)]


class KubernetesOptions(Strict):
    """What the config file does not say about a cluster."""

    name: str = Field("embedding-service", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=40)
    namespace: str = Field("embedding", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)
    image: str = "registry.example.com/embedding-service:0.1.0-cpu"
    gpu_image: str = "registry.example.com/embedding-service:0.1.0-cuda"
    # Worker pods per group; None: the models' replica bounds (num_replicas, or autoscaling min/max).
    cpu_workers: Bounds | None = None
    gpu_workers: Bounds | None = None
    # The GPU nodes' `nvidia.com/gpu.product` label (NVIDIA's GPU feature discovery), e.g. NVIDIA-A100-SXM4-80GB.
    gpu_type: str | None = None
    gpu_tolerations: list[dict[str, str]] = Field(
        default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
    head_cpu: str = "2"
    head_memory: str = "8Gi"
    worker_memory: str = "4Gi"
    gpu_worker_memory: str = "16Gi"
    gateway_replicas: Bounds = Bounds(min=2, max=8)
    batch_workers: Bounds | None = Field(
        None, description="Pods of the batch jobs' worker group, one model actor each; None: 0 to "
        "jobs.max_actors x jobs.max_running_jobs (the pools scale it from zero).")
    batch_worker_memory: str = "4Gi"
    jobs_secret: str = Field(
        "embedding-service-jobs",
        description="Secret (created by hand) of the batch jobs: the store's URL (key store-url, "
        "postgresql+psycopg://...) and, optionally, the S3 credentials (aws-access-key-id, aws-secret-access-key).")
    # Secrets, created by hand (README): the service's keys (API_KEYS_KEY, GATEWAY_KEY), the gateway's own keys.
    api_keys_secret: str = "embedding-service-api-keys"
    gateway_keys_secret: str = "embedding-gateway-api-keys"
    ray_token_secret: str | None = Field(
        "embedding-service-ray-token",
        description="Secret (key auth_token) holding Ray's token, created by hand like the API keys; every Ray "
        "node and KubeRay's operator read it. None: KubeRay creates one per RayCluster (named after the cluster's "
        "generated name, deleted with it, so a new token at every upgrade).")
    operator_namespace: Namespace = Field(
        "default",
        description="Namespace of KubeRay's operator, the one caller of the dashboard and the Serve HTTP proxy's "
        "health: the namespace its Helm chart or kustomization was installed into (`default` in KubeRay's guide).")
    operator_pod_labels: dict[str, str] = Field(
        default_factory=lambda: {"app.kubernetes.io/component": "kuberay-operator"},
        description="Labels of the operator's pods in operator_namespace (KubeRay's Helm chart and kustomization "
        "both set this one); empty: any pod of that namespace.")
    monitoring_namespace: Namespace | None = Field(
        "monitoring",
        description="Namespace whose pods scrape the metrics ports (Ray pods' and the gateway's); None: no scrape.")
    gateway_client_namespaces: list[Namespace] | None = Field(
        None, description="Namespaces whose pods may call the gateway's HTTP port; None: any source, in or "
        "outside the cluster (a LoadBalancer, an ingress controller).")
    grpc_client_namespaces: list[Namespace] = Field(
        default_factory=list, description="Namespaces whose pods may call the service's gRPC port directly, "
        "besides the gateway's pods (always allowed).")


class Unrenderable(ValueError):
    """The config asks for what cannot work on Kubernetes; the message says what to change."""


def jobs_refusal(config: ServeFile) -> str | None:
    """Why the config's batch jobs cannot run on Kubernetes as configured, or None (also None: jobs off)."""
    jobs = config.args.jobs
    if jobs is None:
        return None
    local = [r for r in [jobs.storage_root, *jobs.dataset_roots] if not r.startswith("s3://")]
    if local:
        return (f"jobs.storage_root and jobs.dataset_roots must be s3:// URIs on Kubernetes, where pods share no "
                f"folder: {', '.join(local)}")
    # (an S3 root needs jobs.store_url_env already: the store is then PostgreSQL, which outlives the head pod)
    if not jobs.actor_resources:
        return ("jobs.actor_resources must name a resource (e.g. {\"batch\": 1}) that the batch worker group "
                "declares: without one a job's model actors could take the pods of the online replicas")
    return None


def _secret_env(name: str, secret: str, key: str, optional: bool = False) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": secret, "key": key}
    if optional:
        ref["optional"] = True
    return {"name": name, "valueFrom": {"secretKeyRef": ref}}


def _s3_env(config: ServeFile, options: KubernetesOptions) -> list[dict[str, Any]]:
    """The S3 credentials of the jobs' storage root, where jobs are on."""
    if config.args.jobs is None:
        return []
    return [_secret_env(name, options.jobs_secret, key, optional=True) for name, key in S3_CREDENTIALS.items()]


def _labels(options: KubernetesOptions, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": options.name, "app.kubernetes.io/component": component}


def serve_config(config: ServeFile) -> dict[str, Any]:
    """The Serve config KubeRay deploys: the file's, its HTTP proxy listening beyond loopback."""
    serve = copy.deepcopy(config.raw)
    serve.setdefault("http_options", {})["host"] = "0.0.0.0"
    return serve


def _env(config: ServeFile, options: KubernetesOptions) -> list[dict[str, Any]]:
    args = config.args
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in sorted(config.node_environment().items())]
    if args.auth.api_keys_env:
        env.append({"name": args.auth.api_keys_env,
                    "valueFrom": {"secretKeyRef": {"name": options.api_keys_secret, "key": API_KEYS_KEY}}})
    if args.tracing.headers_env:
        env.append({"name": args.tracing.headers_env, "valueFrom": {"secretKeyRef": {
            "name": options.api_keys_secret, "key": "otlp-headers", "optional": True}}})
    return env + _s3_env(config, options)


def _key_file_mount(args: AppArgs, options: KubernetesOptions) -> tuple[list[dict], list[dict]]:
    """(volumes, volumeMounts) putting the service's keys at args.auth.api_keys_file, if it names one."""
    path = args.auth.api_keys_file
    if not path:
        return [], []
    volume = {"name": "api-keys", "secret": {"secretName": options.api_keys_secret,
                                             "items": [{"key": API_KEYS_KEY, "path": posixpath.basename(path)}]}}
    return [volume], [{"name": "api-keys", "mountPath": posixpath.dirname(path), "readOnly": True}]


def _grpc_probe(port: int, service: str, **timing: int) -> dict[str, Any]:
    return {"grpc": {"port": port, "service": service}, "timeoutSeconds": 5, **timing}


def _pod_security() -> dict[str, Any]:
    # At the pod's level too, for the containers KubeRay adds (the autoscaler, the workers' wait-gcs-ready).
    return {"runAsNonRoot": True, "runAsUser": IMAGE_UID, "runAsGroup": IMAGE_UID, "fsGroup": IMAGE_UID,
            "seccompProfile": {"type": "RuntimeDefault"}}


def container_security() -> dict[str, Any]:
    """Every container's: Kubernetes' `restricted` Pod Security profile, and a root filesystem nothing writes."""
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "readOnlyRootFilesystem": True,
            "runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}


def _writable(paths: dict[str, str]) -> tuple[list[dict], list[dict]]:
    """(volumes, volumeMounts): an emptyDir at each path, parents first."""
    return ([{"name": n, "emptyDir": {}} for n in paths],
            [{"name": n, "mountPath": p} for n, p in sorted(paths.items(), key=lambda item: item[1])])


def _autoscaler_api_token() -> dict[str, Any]:
    """The volume the kubelet mounts for a pod's API access (token, cluster CA, namespace), for one container:
    KubeRay's autoscaler sidecar scales the worker groups through the Kubernetes API; nothing else in the pod
    calls it, so the pod itself mounts no token."""
    return {"name": "autoscaler-api-access", "projected": {"sources": [
        {"serviceAccountToken": {"path": "token", "expirationSeconds": 3600}},  # the autoscaler rereads it each minute
        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}}]}}


def _replica_bounds(model: ModelSettings) -> tuple[int, int]:
    if model.autoscaling is not None:
        return model.autoscaling.min_replicas, model.autoscaling.max_replicas
    return model.num_replicas, model.num_replicas



@dataclass(frozen=True)
class _Pods:
    """What every Ray pod of the RayService shares."""

    env: list[dict[str, Any]]
    grpc_port: int
    volumes: list[dict[str, Any]]
    mounts: list[dict[str, Any]]
    grace_s: int  # terminationGracePeriodSeconds

    @classmethod
    def of(cls, config: ServeFile, options: KubernetesOptions) -> _Pods:
        key_volumes, key_mounts = _key_file_mount(config.args, options)
        volumes, mounts = _writable(RAY_WRITABLE)
        # Serve stops a replica within shutdown.grace_s; the pod waits that and a margin before its kill.
        return cls(_env(config, options), config.grpc_port, volumes + key_volumes, mounts + key_mounts,
                   math.ceil(config.args.shutdown.grace_s) + 30)

    def spec(self, container: dict[str, Any], *volumes: dict[str, Any]) -> dict[str, Any]:
        container = {**container, "securityContext": container_security(), "volumeMounts": self.mounts}
        # No process of a Ray pod calls the Kubernetes API (the head's autoscaler gets its own token).
        return {"containers": [container], "securityContext": _pod_security(), "automountServiceAccountToken": False,
                "terminationGracePeriodSeconds": self.grace_s, "volumes": self.volumes + list(volumes)}


def _worker_group(name: str, models: list[ModelSettings], image: str, memory: str, bounds: Bounds | None,
                  pods: _Pods, gpu: bool, options: KubernetesOptions) -> dict[str, Any]:
    """One worker group, its pods sized for one replica of its largest model: the CPU it claims from Ray
    (`num-cpus`, so one replica fits a pod) and its threads (the pod's CPU), a whole GPU for GPU models."""
    claim = max((m.num_cpus for m in models), default=1.0)
    threads = max((m.threads or 1 for m in models), default=1)
    if bounds is None:  # pods per replica: one on CPU, num_gpus on a GPU (0.5 packs two replicas a pod)
        low, high = (sum(math.ceil(_replica_bounds(m)[end] * (m.num_gpus if gpu else 1)) for m in models)
                     for end in (0, 1))
        bounds = Bounds(min=low, max=high)
    # This pod's proxy is up and the service serves: only then does the serve Service send it calls.
    return _ray_workers(name, image, memory, bounds, claim, threads, gpu, pods, options,
                        ports=[{"name": GRPC_PORT_NAME, "containerPort": pods.grpc_port}],
                        readiness=_grpc_probe(pods.grpc_port, "", periodSeconds=5, failureThreshold=2))


def _batch_group(config: ServeFile, pods: _Pods, options: KubernetesOptions) -> dict[str, Any]:
    """The batch jobs' worker group: a pod per model actor, declaring the resources the actors ask for
    (jobs.actor_resources) so that the pools run there and nowhere else, from zero pods to the jobs' most."""
    jobs = config.args.jobs
    gpu = jobs.num_gpus_per_actor > 0
    # The actor's model runs jobs.threads_per_actor threads where set, else its own.
    threads = jobs.threads_per_actor or max((m.threads or 1 for m in config.args.models), default=1)
    bounds = options.batch_workers or Bounds(min=0, max=jobs.max_actors * jobs.max_running_jobs)
    # No proxy serves calls here (a pod with no replica has none): its raylet's health is its readiness too.
    # One actor's share of each resource it asks for, so that a pod holds one actor.
    return _ray_workers(BATCH_GROUP, options.gpu_image if gpu else options.image, options.batch_worker_memory,
                        bounds, jobs.num_cpus_per_actor + BATCH_POD_SPARE_CPUS, threads, gpu, pods, options,
                        ports=[], readiness={"httpGet": dict(_RAYLET_HEALTH), "periodSeconds": 5, "timeoutSeconds": 5,
                                             "failureThreshold": 2},
                        declared=dict(jobs.actor_resources))


_RAYLET_HEALTH = {"path": "/api/local_raylet_healthz", "port": DASHBOARD_AGENT_PORT}  # a worker pod's liveness


def _ray_workers(name: str, image: str, memory: str, bounds: Bounds, claim: float, threads: int, gpu: bool,
                 pods: _Pods, options: KubernetesOptions, ports: list[dict[str, Any]], readiness: dict[str, Any],
                 declared: dict[str, float] | None = None) -> dict[str, Any]:
    """A worker group of Ray pods: Ray's `num-cpus` the claim, the pod's CPU the larger of it and the threads, a
    whole GPU (the GPU nodes' selector and tolerations) where `gpu`, and the custom resources `declared`."""
    resources = {"cpu": str(max(math.ceil(claim), threads, 1)), "memory": memory}
    if gpu:
        resources["nvidia.com/gpu"] = "1"
    container = {
        "name": "ray-worker",
        "image": image,
        "env": pods.env,
        "ports": [*ports, {"name": "metrics", "containerPort": METRICS_PORT}],
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "readinessProbe": readiness,
        "livenessProbe": {"httpGet": dict(_RAYLET_HEALTH), "initialDelaySeconds": 30, "periodSeconds": 10,
                          "timeoutSeconds": 5, "failureThreshold": 6},
    }
    spec = pods.spec(container)
    if gpu and options.gpu_type:
        spec["nodeSelector"] = {"nvidia.com/gpu.product": options.gpu_type}
    if gpu and options.gpu_tolerations:
        spec["tolerations"] = [dict(t) for t in options.gpu_tolerations]
    start = {"num-cpus": _number(claim), "metrics-export-port": str(METRICS_PORT)}
    if declared:
        start["resources"] = json.dumps(json.dumps(declared))  # JSON quoted for `ray start`'s shell
    if gpu:
        start["num-gpus"] = "1"
    return {
        "groupName": name,
        "replicas": bounds.min,
        "minReplicas": bounds.min,
        "maxReplicas": bounds.max,
        "rayStartParams": start,
        "template": {"metadata": {"labels": _labels(options, name)}, "spec": spec},
    }


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _head_group(config: ServeFile, pods: _Pods, options: KubernetesOptions) -> dict[str, Any]:
    resources = {"cpu": options.head_cpu, "memory": options.head_memory}
    env = list(pods.env)
    jobs = config.args.jobs
    if jobs is not None and jobs.store_url_env:  # the jobs' manager, runners and the router's CreateJob: the head's
        env.append(_secret_env(jobs.store_url_env, options.jobs_secret, JOBS_STORE_KEY))
    container = {
        "name": "ray-head",
        "image": options.image,
        "env": env,
        "ports": [{"name": "gcs-server", "containerPort": 6379}, {"name": "dashboard", "containerPort": 8265},
                  {"name": "client", "containerPort": 10001}, {"name": "serve", "containerPort": config.http_port},
                  {"name": GRPC_PORT_NAME, "containerPort": pods.grpc_port},
                  {"name": "metrics", "containerPort": METRICS_PORT}],
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        # The proxy answers at all (not whether models serve: a restarted head would not bring them back).
        # Its first minute is Serve starting once KubeRay has submitted the config.
        "livenessProbe": _grpc_probe(pods.grpc_port, LIVENESS, initialDelaySeconds=60, periodSeconds=10,
                                     failureThreshold=6),
        # Ray's GCS is up: what KubeRay waits for before it submits the Serve config.
        # (Ray keeps its health paths open under token authentication.)
        "readinessProbe": {"httpGet": {"path": "/api/gcs_healthz", "port": DASHBOARD_PORT}, "initialDelaySeconds": 10,
                           "periodSeconds": 5, "timeoutSeconds": 5, "failureThreshold": 10},
    }
    return {
        # The head's own resource (the router and the recycler run there), JSON quoted for `ray start`'s shell.
        # The dashboard listens on the pod's address: KubeRay's operator submits serveConfigV2 and reads Serve's
        # status through it. The NetworkPolicy lets only the operator in, and Ray's token guards every call.
        "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0", "metrics-export-port": str(METRICS_PORT),
                           "resources": json.dumps(json.dumps({HEAD_RESOURCE: 1}))},
        "template": {"metadata": {"labels": _labels(options, "ray-head")},
                     "spec": pods.spec(container, _autoscaler_api_token())},
    }


def _autoscaler_options() -> dict[str, Any]:
    """KubeRay's autoscaler sidecar (v2): a drained (recycled) worker's pod is deleted, and replaced while Serve
    wants its replicas. It gets the pods' hardening, the head's writable /tmp and home (KubeRay mounts the session
    folder itself) and the one API token of the pod."""
    mounts = [{"name": n, "mountPath": RAY_WRITABLE[n]} for n in ("tmp", "home")]
    mounts.append({"name": _autoscaler_api_token()["name"], "mountPath": SERVICE_ACCOUNT_DIR, "readOnly": True})
    return {"version": "v2", "idleTimeoutSeconds": 300, "securityContext": container_security(),
            "volumeMounts": mounts}


def _auth_options(options: KubernetesOptions) -> dict[str, Any]:
    """Ray's token authentication: KubeRay sets RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (from the Secret) in every
    Ray container, and its operator sends the token to the dashboard."""
    auth: dict[str, Any] = {"mode": "token"}
    if options.ray_token_secret:
        auth["secretName"] = options.ray_token_secret
    return auth


def ray_service(config: ServeFile, options: KubernetesOptions) -> dict[str, Any]:
    pods = _Pods.of(config, options)
    grpc_port, http_port = config.grpc_port, config.http_port
    cpu_models = [m for m in config.args.models if m.num_gpus == 0]
    gpu_models = [m for m in config.args.models if m.num_gpus > 0]
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": options.name, "namespace": options.namespace, "labels": _labels(options, "service")},
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config(config), sort_keys=False, width=120),
            "serveService": {"spec": {"ports": [
                {"name": GRPC_PORT_NAME, "port": grpc_port, "targetPort": grpc_port, "appProtocol": "kubernetes.io/h2c"},
                {"name": "serve", "port": http_port, "targetPort": http_port}]}},
            "upgradeStrategy": {"type": "NewCluster"},  # a config change of the cluster: a new one, then the switch
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "authOptions": _auth_options(options),
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": _autoscaler_options(),
                "headGroupSpec": _head_group(config, pods, options),
                "workerGroupSpecs": [
                    _worker_group("cpu-workers", cpu_models, options.image, options.worker_memory,
                                  options.cpu_workers, pods, gpu=False, options=options),
                    _worker_group("gpu-workers", gpu_models, options.gpu_image, options.gpu_worker_memory,
                                  options.gpu_workers, pods, gpu=True, options=options),
                ] + ([_batch_group(config, pods, options)] if config.args.jobs is not None else []),
            },
        },
    }


def gateway(config: ServeFile, options: KubernetesOptions) -> list[dict[str, Any]]:
    """The OpenAI gateway: a Deployment scaled on its own (HPA), its Service and a PodDisruptionBudget."""
    name = f"{options.name}-gateway"
    labels = _labels(options, "gateway")
    # KubeRay's serve Service: `<RayService name>-serve-svc`, backed by the pods whose proxy is ready.
    target = f"{options.name}-serve-svc.{options.namespace}.svc:{config.grpc_port}"
    # Its own callers' keys and the one key it calls the service with; never the service's key list, which only
    # the Ray pods' proxy and router check.
    env: list[dict[str, Any]] = [{"name": "GATEWAY_API_KEYS", "valueFrom": {"secretKeyRef": {
        "name": options.gateway_keys_secret, "key": API_KEYS_KEY}}}]
    if config.args.auth.configured:
        env.append({"name": "GATEWAY_UPSTREAM_API_KEY", "valueFrom": {"secretKeyRef": {
            "name": options.api_keys_secret, "key": GATEWAY_KEY}}})
    if config.args.jobs is not None:  # its Files and Batches routes: the jobs' store and storage root
        env.append(_secret_env("GATEWAY_JOBS_STORE_URL", options.jobs_secret, JOBS_STORE_KEY))
        env += _s3_env(config, options)
    resources = {"cpu": "1", "memory": "1Gi"}
    volumes, mounts = _writable(GATEWAY_WRITABLE)
    container = {
        "name": "gateway",
        "image": options.image,
        "command": ["python3", "-m", "gateway"],
        "args": config.gateway_args([target], GATEWAY_PORT, host="0.0.0.0", drain_delay_s=GATEWAY_DRAIN_DELAY_S),
        "env": env,
        "ports": [{"name": "http", "containerPort": GATEWAY_PORT}],
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10,
                          "failureThreshold": 3},
        "securityContext": container_security(),
        "volumeMounts": mounts,
    }
    meta = {"name": name, "namespace": options.namespace, "labels": labels}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": options.gateway_replicas.min,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {
                "containers": [container],
                "securityContext": _pod_security(),
                "automountServiceAccountToken": False,  # the gateway calls the service, never the Kubernetes API
                "terminationGracePeriodSeconds": GATEWAY_DRAIN_DELAY_S + math.ceil(config.args.shutdown.grace_s) + 5,
                "volumes": volumes,
            }},
        },
    }
    service = {"apiVersion": "v1", "kind": "Service", "metadata": meta,
               "spec": {"selector": labels, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}
    budget = {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": meta,
              "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels}}}
    autoscaler = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": meta,
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": max(options.gateway_replicas.min, 1),
            "maxReplicas": max(options.gateway_replicas.max, options.gateway_replicas.min, 1),
            "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {
                "type": "Utilization", "averageUtilization": 70}}}],
        },
    }
    return [deployment, service, budget, autoscaler]


def _in_namespaces(names: list[str], pod_labels: dict[str, str] | None = None) -> dict[str, Any]:
    """A NetworkPolicy peer: the pods (those with pod_labels, if given) of the named namespaces."""
    peer: dict[str, Any] = {"namespaceSelector": {"matchExpressions": [
        {"key": NAMESPACE_LABEL, "operator": "In", "values": sorted(names)}]}}
    if pod_labels:
        peer["podSelector"] = {"matchLabels": dict(pod_labels)}
    return peer


def _tcp(*ports: int) -> list[dict[str, Any]]:
    return [{"protocol": "TCP", "port": p} for p in ports]


def _ray_pods(options: KubernetesOptions) -> dict[str, Any]:
    """The Ray pods of this RayService, whichever of its RayClusters (KubeRay names each `<name>-<random>`, and
    an upgrade runs two): this service's label and KubeRay's cluster label."""
    return {"matchLabels": {"app.kubernetes.io/name": options.name},
            "matchExpressions": [{"key": RAY_CLUSTER_LABEL, "operator": "Exists"}]}


def _policy(options: KubernetesOptions, name: str, pods: dict[str, Any], ingress: list[dict]) -> dict[str, Any]:
    """Ingress to `pods` as the rules allow; no rule: none at all."""
    spec: dict[str, Any] = {"podSelector": pods, "policyTypes": ["Ingress"]}
    if ingress:
        spec["ingress"] = ingress
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": f"{options.name}-{name}", "namespace": options.namespace,
                         "labels": _labels(options, "network-policy")},
            "spec": spec}


def network_policies(config: ServeFile, options: KubernetesOptions) -> list[dict[str, Any]]:
    """Ingress to this service's pods: none but what the rules below allow (NetworkPolicies add up). The kubelet's
    probes come from the node, which NetworkPolicy leaves open; egress is not restricted."""
    gateway_pods = {"podSelector": {"matchLabels": _labels(options, "gateway")}}
    ray = [
        # Ray's own traffic, GCS (6379), client (10001), raylets, object managers, agents and workers, on ports
        # Ray picks at start: any port, from this service's Ray pods only.
        {"from": [{"podSelector": _ray_pods(options)}]},
        {"from": [gateway_pods], "ports": _tcp(config.grpc_port)},
        # KubeRay's operator: the dashboard (serveConfigV2, Serve's status) and the head's Serve proxy health.
        {"from": [_in_namespaces([options.operator_namespace], options.operator_pod_labels)],
         "ports": _tcp(DASHBOARD_PORT, config.http_port)},
    ]
    if options.grpc_client_namespaces:
        ray.append({"from": [_in_namespaces(options.grpc_client_namespaces)], "ports": _tcp(config.grpc_port)})
    gateway: list[dict[str, Any]] = []
    if options.gateway_client_namespaces is None:  # a rule without `from` admits any source
        gateway.append({"ports": _tcp(GATEWAY_PORT)})
    elif options.gateway_client_namespaces:  # (an empty `from` would too: no namespace, no rule)
        gateway.append({"from": [_in_namespaces(options.gateway_client_namespaces)], "ports": _tcp(GATEWAY_PORT)})
    if options.monitoring_namespace:
        ray.append({"from": [_in_namespaces([options.monitoring_namespace])], "ports": _tcp(METRICS_PORT)})
        gateway.append({"from": [_in_namespaces([options.monitoring_namespace])], "ports": _tcp(GATEWAY_PORT)})
    return [
        # Whatever no rule below names, for every pod of this service.
        _policy(options, "default-deny", {"matchLabels": {"app.kubernetes.io/name": options.name}}, []),
        _policy(options, "ray", _ray_pods(options), ray),
        _policy(options, "gateway", {"matchLabels": _labels(options, "gateway")}, gateway),
    ]


class _Dumper(yaml.SafeDumper):
    """Plain YAML for kubectl and reviewers: no anchors, multi-line strings (serveConfigV2) as literal blocks."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


_Dumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def render(config: ServeFile, options: KubernetesOptions) -> dict[str, str]:
    """File name -> YAML text. Unrenderable: the config asks for what cannot work on Kubernetes."""
    refusal = jobs_refusal(config)
    if refusal is not None:
        raise Unrenderable(refusal)
    def dump(documents: list[dict[str, Any]]) -> str:
        return HEADER + "---\n".join(yaml.dump(d, Dumper=_Dumper, sort_keys=False, width=120) for d in documents)

    return {"rayservice.yaml": dump([ray_service(config, options)]), "gateway.yaml": dump(gateway(config, options)),
            "networkpolicy.yaml": dump(network_policies(config, options))}


def stale_files(rendered: dict[str, str], out: Path) -> list[Path]:
    """The files under `out` that differ from the render (or are missing)."""
    return [out / n for n, text in rendered.items() if not (out / n).exists() or (out / n).read_text() != text]


def write(rendered: dict[str, str], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    for name, text in rendered.items():
        (out / name).write_text(text)
    return [out / name for name in rendered]
