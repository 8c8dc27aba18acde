"""Kubernetes manifests rendered from the one config: a KubeRay RayService and the gateway's objects.

`python -m embedding_service render-k8s` writes them (deploy/kubernetes/ holds those of the shipped config,
kept in sync by a test). What comes from where:
- `serveConfigV2` is the config file's Serve settings and applications as they are; only the HTTP proxy's host
  is opened to the pod network (KubeRay checks Serve's proxies over HTTP).
- Every pod's environment is what `run` gives its Ray nodes (launcher.node_environment): Serve's settings, the
  transport caps and the proxy's gRPC options; API keys come from a Secret, never from the manifest.
- The head group holds Serve's controller and proxy, the router and the recycler (both pinned there by their
  `node:__internal_head__` resource) and no models (`num-cpus: "0"`). Models with `num_gpus` 0 run in the CPU
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

import argparse
import copy
import math
import posixpath
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from embedding_service.config import AppArgs, ModelSettings
from embedding_service.health_relay import LIVENESS
from embedding_service.launcher import DEFAULT_CONFIG, load_config, node_environment, service_app

RAY_VERSION = "2.60.0"  # the image's Ray (deploy/docker/constraints.txt pins it; a test checks they agree)
GRPC_PORT_NAME = "serve-grpc"  # KubeRay puts head ports named serve or serve-* in the serve Service
METRICS_PORT = 8080
DASHBOARD_AGENT_PORT = 52365  # Ray's default; its /api/local_raylet_healthz is what KubeRay's own probe asks
API_KEYS_KEY = "api-keys"  # the key of the service's Secret that holds its API keys
GATEWAY_KEY = "gateway-key"  # ... and the one key the gateway calls the service with
HEADER = "# Rendered by `python -m embedding_service render-k8s` from serve-config.yaml; edit that, not this.\n"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Bounds(_Strict):
    min: int = Field(ge=0)
    max: int = Field(ge=0)


class KubernetesOptions(_Strict):
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


def serve_config(config: dict[str, Any]) -> dict[str, Any]:
    """The Serve config KubeRay deploys: the file's, its HTTP proxy listening beyond loopback."""
    serve = {k: copy.deepcopy(v) for k, v in config.items()}
    serve.setdefault("http_options", {})["host"] = "0.0.0.0"
    return serve


def _env(config: dict[str, Any], args: AppArgs, options: KubernetesOptions) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in sorted(node_environment(config).items())]
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


def _worker_group(name: str, models: list[ModelSettings], image: str, memory: str, bounds: Bounds | None,
                  base: dict[str, Any], gpu: bool, options: KubernetesOptions) -> dict[str, Any]:
    """One worker group, its pods sized for one replica of its largest model: the CPU it claims from Ray
    (`num-cpus`, so one replica fits a pod) and its threads (the pod's CPU), a whole GPU for GPU models."""
    claim = max((m.num_cpus for m in models), default=1.0)
    threads = max((m.threads or 1 for m in models), default=1)
    pod_cpu = max(math.ceil(claim), threads, 1)
    if bounds is None:  # pods per replica: one on CPU, num_gpus on a GPU (0.5 packs two replicas a pod)
        low, high = (sum(math.ceil(_replica_bounds(m)[end] * (m.num_gpus if gpu else 1)) for m in models)
                     for end in (0, 1))
        bounds = Bounds(min=low, max=high)
    resources = {"cpu": str(pod_cpu), "memory": memory}
    if gpu:
        resources["nvidia.com/gpu"] = "1"
    container = {
        "name": "ray-worker",
        "image": image,
        "env": base["env"],
        "ports": [{"name": GRPC_PORT_NAME, "containerPort": base["grpc_port"]},
                  {"name": "metrics", "containerPort": METRICS_PORT}],
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        # This pod's proxy is up and the service serves: only then does the serve Service send it calls.
        "readinessProbe": _grpc_probe(base["grpc_port"], "", periodSeconds=5, failureThreshold=2),
        "livenessProbe": {"httpGet": {"path": "/api/local_raylet_healthz", "port": DASHBOARD_AGENT_PORT},
                          "initialDelaySeconds": 30, "periodSeconds": 10, "timeoutSeconds": 5,
                          "failureThreshold": 6},
        **({"volumeMounts": base["mounts"]} if base["mounts"] else {}),
    }
    spec: dict[str, Any] = {"containers": [container], "securityContext": _security(),
                            "terminationGracePeriodSeconds": base["grace_s"]}
    if base["volumes"]:
        spec["volumes"] = base["volumes"]
    if gpu:
        if options.gpu_type:
            spec["nodeSelector"] = {"nvidia.com/gpu.product": options.gpu_type}
        if options.gpu_tolerations:
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


def ray_service(config: dict[str, Any], options: KubernetesOptions) -> dict[str, Any]:
    _, args = service_app(config)
    grpc_port = int(config["grpc_options"]["port"])
    http_port = int((config.get("http_options") or {}).get("port", 8000))
    volumes, mounts = _key_file_mount(args, options)
    # Serve stops a replica within shutdown.grace_s; the pod waits that and a margin before its kill.
    base = {"env": _env(config, args, options), "grpc_port": grpc_port, "volumes": volumes, "mounts": mounts,
            "grace_s": math.ceil(args.shutdown.grace_s) + 30}
    head_resources = {"cpu": options.head_cpu, "memory": options.head_memory}
    head = {
        "name": "ray-head",
        "image": options.image,
        "env": base["env"],
        "ports": [{"name": "gcs-server", "containerPort": 6379}, {"name": "dashboard", "containerPort": 8265},
                  {"name": "client", "containerPort": 10001}, {"name": "serve", "containerPort": http_port},
                  {"name": GRPC_PORT_NAME, "containerPort": grpc_port},
                  {"name": "metrics", "containerPort": METRICS_PORT}],
        "resources": {"requests": dict(head_resources), "limits": dict(head_resources)},
        # The proxy answers at all (not whether models serve: a restarted head would not bring them back).
        # Its first minute is Serve starting once KubeRay has submitted the config.
        "livenessProbe": _grpc_probe(grpc_port, LIVENESS, initialDelaySeconds=60, periodSeconds=10,
                                     failureThreshold=6),
        # Ray's GCS is up: what KubeRay waits for before it submits the Serve config.
        "readinessProbe": {"httpGet": {"path": "/api/gcs_healthz", "port": 8265}, "initialDelaySeconds": 10,
                           "periodSeconds": 5, "timeoutSeconds": 5, "failureThreshold": 10},
        **({"volumeMounts": mounts} if mounts else {}),
    }
    head_spec: dict[str, Any] = {"containers": [head], "securityContext": _security(),
                                 "terminationGracePeriodSeconds": base["grace_s"]}
    if volumes:
        head_spec["volumes"] = volumes
    cpu_models = [m for m in args.models if m.num_gpus == 0]
    gpu_models = [m for m in args.models if m.num_gpus > 0]
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
                "headGroupSpec": {
                    "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0",
                                       "metrics-export-port": str(METRICS_PORT)},
                    "template": {"metadata": {"labels": _labels(options, "ray-head")}, "spec": head_spec},
                },
                "workerGroupSpecs": [
                    _worker_group("cpu-workers", cpu_models, options.image, options.worker_memory,
                                  options.cpu_workers, base, gpu=False, options=options),
                    _worker_group("gpu-workers", gpu_models, options.gpu_image, options.gpu_worker_memory,
                                  options.gpu_workers, base, gpu=True, options=options),
                ],
            },
        },
    }


def gateway(config: dict[str, Any], options: KubernetesOptions) -> list[dict[str, Any]]:
    """The OpenAI gateway: a Deployment scaled on its own (HPA), its Service and a PodDisruptionBudget."""
    _, args = service_app(config)
    name = f"{options.name}-gateway"
    labels = _labels(options, "gateway")
    grpc_port = int(config["grpc_options"]["port"])
    # KubeRay's serve Service: `<RayService name>-serve-svc`, backed by the pods whose proxy is ready.
    target = f"{options.name}-serve-svc.{options.namespace}.svc:{grpc_port}"
    drain_delay_s = 5
    env: list[dict[str, Any]] = [{"name": "GATEWAY_API_KEYS", "valueFrom": {"secretKeyRef": {
        "name": options.gateway_keys_secret, "key": API_KEYS_KEY}}}]
    if args.auth.configured:
        env.append({"name": "GATEWAY_UPSTREAM_API_KEY", "valueFrom": {"secretKeyRef": {
            "name": options.api_keys_secret, "key": GATEWAY_KEY}}})
    resources = {"cpu": "1", "memory": "1Gi"}
    container = {
        "name": "gateway",
        "image": options.image,
        "command": ["python3", "-m", "gateway"],
        "args": ["--host", "0.0.0.0", "--port", "8080", "--targets", target,
                 "--max-inputs", str(args.limits.max_inputs_per_request),
                 "--max-body-bytes", str(args.limits.max_request_bytes),
                 "--drain-delay-s", str(drain_delay_s), "--shutdown-timeout-s", _number(args.shutdown.grace_s)],
        "env": env,
        "ports": [{"name": "http", "containerPort": 8080}],
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10,
                          "failureThreshold": 3},
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": options.namespace, "labels": labels},
        "spec": {
            "replicas": options.gateway_replicas.min,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {
                "containers": [container],
                "securityContext": _security(),
                "terminationGracePeriodSeconds": drain_delay_s + math.ceil(args.shutdown.grace_s) + 5,
            }},
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": options.namespace, "labels": labels},
        "spec": {"selector": labels, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
    }
    budget = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": name, "namespace": options.namespace, "labels": labels},
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels}},
    }
    autoscaler = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": name, "namespace": options.namespace, "labels": labels},
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


def render(config: dict[str, Any], options: KubernetesOptions) -> dict[str, str]:
    """File name -> YAML text."""
    def dump(documents: list[dict[str, Any]]) -> str:
        return HEADER + "---\n".join(yaml.dump(d, Dumper=_Dumper, sort_keys=False, width=120) for d in documents)

    return {"rayservice.yaml": dump([ray_service(config, options)]), "gateway.yaml": dump(gateway(config, options))}


DEFAULT_OUT = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"


def _bounds(text: str) -> Bounds:
    low, _, high = text.partition(":")
    return Bounds(min=int(low), max=int(high or low))


def main(argv: list[str] | None = None) -> int:
    defaults = KubernetesOptions()
    parser = argparse.ArgumentParser(prog="python -m embedding_service render-k8s",
                                     description="Render a KubeRay RayService and the gateway's Deployment, Service, "
                                                 "PodDisruptionBudget and HorizontalPodAutoscaler from the config.")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="Ray Serve config file (default: %(default)s)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder for the YAML files (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if --out differs from the render")
    parser.add_argument("--name", default=defaults.name, help="RayService name (default: %(default)s)")
    parser.add_argument("--namespace", default=defaults.namespace, help="(default: %(default)s)")
    parser.add_argument("--image", default=defaults.image, help="CPU image: head, CPU workers, gateway")
    parser.add_argument("--gpu-image", default=defaults.gpu_image, help="CUDA image: GPU workers")
    parser.add_argument("--cpu-workers", type=_bounds, default=None, metavar="MIN:MAX",
                        help="CPU worker pods (default: the CPU models' replica bounds)")
    parser.add_argument("--gpu-workers", type=_bounds, default=None, metavar="MIN:MAX",
                        help="GPU worker pods (default: the GPU models' replica bounds times their num_gpus)")
    parser.add_argument("--gpu-type", default=None, help="nvidia.com/gpu.product node label, e.g. NVIDIA-L4")
    parser.add_argument("--no-gpu-tolerations", action="store_true",
                        help="no toleration of the nvidia.com/gpu taint on GPU workers")
    parser.add_argument("--gateway-replicas", type=_bounds, default=defaults.gateway_replicas, metavar="MIN:MAX")
    opts = parser.parse_args(argv)
    options = KubernetesOptions(
        name=opts.name, namespace=opts.namespace, image=opts.image, gpu_image=opts.gpu_image,
        cpu_workers=opts.cpu_workers, gpu_workers=opts.gpu_workers, gpu_type=opts.gpu_type,
        gateway_replicas=opts.gateway_replicas,
        **({"gpu_tolerations": []} if opts.no_gpu_tolerations else {}))
    rendered = render(load_config(opts.config), options)
    out = Path(opts.out)
    if opts.check:
        stale = [n for n, text in rendered.items() if not (out / n).exists() or (out / n).read_text() != text]
        for name in stale:
            print(f"{out / name} differs from the render of {opts.config}", file=sys.stderr)
        return 1 if stale else 0
    out.mkdir(parents=True, exist_ok=True)
    for name, text in rendered.items():
        (out / name).write_text(text)
        print(out / name)
    return 0
