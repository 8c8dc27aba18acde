"""The one config file, read and validated once per process: a Ray Serve config whose service application
is this project's (`import_path` ...:build_app).

`ServeFile` knows what every consumer of the file needs: the service application's name and its validated
args (config.AppArgs), the environment every Ray node needs for the service (Serve's settings, which Serve
reads in its controller and proxies, where the application's runtime_env does not reach; Ray's transport
caps; the proxy's gRPC options), and the gateway's command line. The run command, the Kubernetes rendering
and the benchmark all take them from here. Reading it imports no Ray: Serve reads its settings as
`ray.serve` is first imported, so the application's environment is exported first (export_app_env).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from embedding_service.config import AppArgs
from embedding_service.ops import ray_internals
from embedding_service.wire import node_env

# The checkout's file; an installed package (the container image) is told where its copy is.
CONFIG_ENV = "EMBEDDING_SERVICE_CONFIG"
DEFAULT_CONFIG = Path(os.environ.get(CONFIG_ENV) or Path(__file__).resolve().parents[2] / "serve-config.yaml")
BUILDER = ":build_app"
# Ray's transport caps, as a multiple of the router's own request bound: requests between the two get a
# precise REQUEST_TOO_LARGE from the router.
TRANSPORT_CAP_FACTOR = 4


def read(path: str | Path | None = None) -> dict[str, Any]:
    """The file as parsed YAML, not yet validated: for a caller that changes it first (then ServeFile.parse)."""
    with open(path or DEFAULT_CONFIG) as f:
        return yaml.safe_load(f)


@dataclass(frozen=True)
class ServeFile:
    raw: dict[str, Any]  # the file's content, as parsed
    app_name: str
    args: AppArgs
    app_env: dict[str, str]  # the service application's runtime_env env_vars

    @classmethod
    def load(cls, path: str | Path | None = None) -> ServeFile:
        return cls.parse(read(path))

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> ServeFile:
        raw = copy.deepcopy(raw)
        apps = [a for a in raw.get("applications") or () if str(a.get("import_path", "")).endswith(BUILDER)]
        if len(apps) != 1:
            raise ValueError(f"the config must hold exactly one application whose import_path ends in {BUILDER!r}, "
                             f"not {len(apps)}")
        app = apps[0]
        env = {key: str(value) for key, value in ((app.get("runtime_env") or {}).get("env_vars") or {}).items()}
        return cls(raw, app["name"], AppArgs.parse(app.get("args")), env)

    @property
    def grpc_port(self) -> int:
        return int(self.raw["grpc_options"]["port"])

    @property
    def http_port(self) -> int:
        return int((self.raw.get("http_options") or {}).get("port", 8000))

    def node_environment(self) -> dict[str, str]:
        """What every Ray node's environment needs for the service (`node-env` prints it; the Kubernetes
        manifests set it on each pod): the application's runtime_env env_vars, Ray's transport caps, the
        proxy's gRPC server options, args.proxy and args.auth, which Ray's workers apply as they start (proxy/grpc_options.py)."""
        limits = self.args.limits
        cap = str(limits.max_request_bytes * TRANSPORT_CAP_FACTOR)
        return {
            **self.app_env,
            ray_internals.PROXY_MESSAGE_SIZE_ENV: cap,
            # Serve's gRPC between its proxy and deployments caps what a replica receives at 4 MiB by default.
            ray_internals.REPLICA_MESSAGE_LENGTH_ENV: cap,
            node_env.PROXY_OPTIONS_ENV: node_env.encode(node_env.proxy_grpc_options(limits)),
            node_env.PROXY_SETTINGS_ENV: node_env.encode_proxy_settings(self.args.proxy),
            node_env.AUTH_SETTINGS_ENV: node_env.encode_auth_settings(self.args.auth),
            ray_internals.PRELOAD_ENV: node_env.PRELOADED_MODULE,
        }

    def export_app_env(self) -> None:
        """Gives this process (and the Ray processes it starts) the application's runtime_env env_vars; what
        the environment already sets wins. Serve hands them to the replicas itself; exported here they also
        reach this process, where Serve reads its settings as `ray.serve` is first imported and the
        deployment handles `build_app` makes carry them. Call before importing ray.serve."""
        for key, value in self.app_env.items():
            os.environ.setdefault(key, value)

    def prepare_environment(self) -> None:
        """The node environment for the Ray processes this process starts; call before Ray starts. What this
        process's environment already sets wins; preloaded modules add up."""
        self.export_app_env()
        for key, value in self.node_environment().items():
            if key == node_env.AUTH_SETTINGS_ENV:  # who may call is this file's to say, never an inherited value's
                os.environ[key] = value
            elif key == ray_internals.PRELOAD_ENV:
                os.environ[key] = ray_internals.with_preloaded(os.environ.get(key, ""), value)
            else:
                os.environ.setdefault(key, value)

    def gateway_args(self, targets: list[str], port: int, host: str = "127.0.0.1",
                     drain_delay_s: float = 1.0) -> list[str]:
        """The gateway's command line (after `python -m gateway`), bound by the service's own limits and grace;
        with batch jobs on, its Files and Batches routes on the jobs' storage root and bounds (the store's URL,
        a secret, reaches it in its environment: GATEWAY_JOBS_STORE_URL)."""
        limits = self.args.limits
        args = ["--host", host, "--port", str(port), "--targets", *targets,
                "--max-inputs", str(limits.max_inputs_per_request),
                "--max-token-ids", str(limits.max_token_ids_per_input),
                "--max-documents", str(limits.max_documents_per_rerank),
                "--max-detokenize-token-ids", str(limits.max_token_ids_per_detokenize),
                "--max-body-bytes", str(limits.max_request_bytes),
                "--drain-delay-s", _number(drain_delay_s),
                "--shutdown-timeout-s", _number(self.args.shutdown.grace_s)]
        jobs = self.args.jobs
        if jobs is not None:
            args += ["--jobs-storage-root", jobs.storage_root]
            if jobs.s3_endpoint:
                args += ["--jobs-s3-endpoint", jobs.s3_endpoint]
            args += ["--max-file-bytes", str(jobs.limits.max_file_bytes),
                     "--max-files-per-key", str(jobs.limits.max_files_per_key),
                     "--max-jobs-per-key", str(jobs.limits.max_jobs_per_key),
                     "--max-running-jobs-per-key", str(jobs.limits.max_running_jobs_per_key),
                     "--files-retention-s", _number(jobs.retention_s)]
        return args


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
