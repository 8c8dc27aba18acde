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
"""

from __future__ import annotations

import copy
import json
import math
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field

from embedding_service.config import HEAD_RESOURCE, AppArgs, ModelSettings, Strict
from embedding_service.ops.servefile import ServeFile
from embedding_service.wire.messages import LIVENESS

RAY_VERSION = "2.60.0"  # the image's Ray (deploy/docker/constraints.txt pins it; a test checks they agree)
GRPC_PORT_NAME = "serve-grpc"  # KubeRay puts head ports named serve or serve-* in the serve Service
METRICS_PORT = 8080
DASHBOARD_AGENT_PORT = 52365  # Ray's default; its /api/local_raylet_healthz is what KubeRay's own probe asks
API_KEYS_KEY = "api-keys"  # the key of the service's Secret that holds its API keys
GATEWAY_KEY = "gateway-key"  # ... and the one key the gateway calls the service with
HEADER = "# Rendered by `python -m embedding_service render-k8s` from serve-config.yaml; edit that, not this.\n"
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
# The gateway pod's drain delay: load balancers stop sending before it stops accepting.
GATEWAY_DRAIN_DELAY_S = 5


class Bounds(Strict):
    min: int = Field(ge=0)
    max: int = Field(ge=0)


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
    # Secrets, created by hand (README): the service's keys (API_KEYS_KEY, GATEWAY_KEY), the gateway's own keys.
    api_keys_secret: str = "embedding-service-api-keys"
    gateway_keys_secret: str = "embedding-gateway-api-keys"


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
    return env


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


def _security() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000}


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
        volumes, mounts = _key_file_mount(config.args, options)
        # Serve stops a replica within shutdown.grace_s; the pod waits that and a margin before its kill.
        return cls(_env(config, options), config.grpc_port, volumes, mounts,
                   math.ceil(config.args.shutdown.grace_s) + 30)

    def spec(self, container: dict[str, Any]) -> dict[str, Any]:
        if self.mounts:
            container = {**container, "volumeMounts": self.mounts}
        spec: dict[str, Any] = {"containers": [container], "securityContext": _security(),
                                "terminationGracePeriodSeconds": self.grace_s}
        if self.volumes:
            spec["volumes"] = self.volumes
        return spec


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
    resources = {"cpu": str(max(math.ceil(claim), threads, 1)), "memory": memory}
    if gpu:
        resources["nvidia.com/gpu"] = "1"
    container = {
        "name": "ray-worker",
        "image": image,
        "env": pods.env,
        "ports": [{"name": GRPC_PORT_NAME, "containerPort": pods.grpc_port},
                  {"name": "metrics", "containerPort": METRICS_PORT}],
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        # This pod's proxy is up and the service serves: only then does the serve Service send it calls.
        "readinessProbe": _grpc_probe(pods.grpc_port, "", periodSeconds=5, failureThreshold=2),
        "livenessProbe": {"httpGet": {"path": "/api/local_raylet_healthz", "port": DASHBOARD_AGENT_PORT},
                          "initialDelaySeconds": 30, "periodSeconds": 10, "timeoutSeconds": 5,
                          "failureThreshold": 6},
    }
    spec = pods.spec(container)
    if gpu and options.gpu_type:
        spec["nodeSelector"] = {"nvidia.com/gpu.product": options.gpu_type}
    if gpu and options.gpu_tolerations:
        spec["tolerations"] = [dict(t) for t in options.gpu_tolerations]
    start = {"num-cpus": _number(claim), "metrics-export-port": str(METRICS_PORT)}
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
    container = {
        "name": "ray-head",
        "image": options.image,
        "env": pods.env,
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
        "readinessProbe": {"httpGet": {"path": "/api/gcs_healthz", "port": 8265}, "initialDelaySeconds": 10,
                           "periodSeconds": 5, "timeoutSeconds": 5, "failureThreshold": 10},
    }
    return {
        # The head's own resource (the router and the recycler run there), JSON quoted for `ray start`'s shell.
        "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0", "metrics-export-port": str(METRICS_PORT),
                           "resources": json.dumps(json.dumps({HEAD_RESOURCE: 1}))},
        "template": {"metadata": {"labels": _labels(options, "ray-head")}, "spec": pods.spec(container)},
    }


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
                "enableInTreeAutoscaling": True,
                # v2: a drained (recycled) worker's pod is deleted, and replaced while Serve wants its replicas.
                "autoscalerOptions": {"version": "v2", "idleTimeoutSeconds": 300},
                "headGroupSpec": _head_group(config, pods, options),
                "workerGroupSpecs": [
                    _worker_group("cpu-workers", cpu_models, options.image, options.worker_memory,
                                  options.cpu_workers, pods, gpu=False, options=options),
                    _worker_group("gpu-workers", gpu_models, options.gpu_image, options.gpu_worker_memory,
                                  options.gpu_workers, pods, gpu=True, options=options),
                ],
            },
        },
    }


def gateway(config: ServeFile, options: KubernetesOptions) -> list[dict[str, Any]]:
    """The OpenAI gateway: a Deployment scaled on its own (HPA), its Service and a PodDisruptionBudget."""
    name = f"{options.name}-gateway"
    labels = _labels(options, "gateway")
    # KubeRay's serve Service: `<RayService name>-serve-svc`, backed by the pods whose proxy is ready.
    target = f"{options.name}-serve-svc.{options.namespace}.svc:{config.grpc_port}"
    env: list[dict[str, Any]] = [{"name": "GATEWAY_API_KEYS", "valueFrom": {"secretKeyRef": {
        "name": options.gateway_keys_secret, "key": API_KEYS_KEY}}}]
    if config.args.auth.configured:
        env.append({"name": "GATEWAY_UPSTREAM_API_KEY", "valueFrom": {"secretKeyRef": {
            "name": options.api_keys_secret, "key": GATEWAY_KEY}}})
    resources = {"cpu": "1", "memory": "1Gi"}
    container = {
        "name": "gateway",
        "image": options.image,
        "command": ["python3", "-m", "gateway"],
        "args": config.gateway_args([target], 8080, host="0.0.0.0", drain_delay_s=GATEWAY_DRAIN_DELAY_S),
        "env": env,
        "ports": [{"name": "http", "containerPort": 8080}],
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10,
                          "failureThreshold": 3},
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
                "securityContext": _security(),
                "terminationGracePeriodSeconds": GATEWAY_DRAIN_DELAY_S + math.ceil(config.args.shutdown.grace_s) + 5,
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


class _Dumper(yaml.SafeDumper):
    """Plain YAML for kubectl and reviewers: no anchors, multi-line strings (serveConfigV2) as literal blocks."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


_Dumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def render(config: ServeFile, options: KubernetesOptions) -> dict[str, str]:
    """File name -> YAML text."""
    def dump(documents: list[dict[str, Any]]) -> str:
        return HEADER + "---\n".join(yaml.dump(d, Dumper=_Dumper, sort_keys=False, width=120) for d in documents)

    return {"rayservice.yaml": dump([ray_service(config, options)]), "gateway.yaml": dump(gateway(config, options))}


def stale_files(rendered: dict[str, str], out: Path) -> list[Path]:
    """The files under `out` that differ from the render (or are missing)."""
    return [out / n for n, text in rendered.items() if not (out / n).exists() or (out / n).read_text() != text]


def write(rendered: dict[str, str], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    for name, text in rendered.items():
        (out / name).write_text(text)
    return [out / name for name in rendered]
