"""Configuration enters through the builder's typed args; serve-config.yaml is valid."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from embedding_service.app import build_app
from embedding_service.config import AppArgs
from embedding_service.model.forward import model_source
from embedding_service.ops import servefile
from embedding_service.ops.servefile import ServeFile


def test_serve_config_is_a_valid_serve_deploy_config():
    config = ServeFile.load()
    schema = ServeDeploySchema.model_validate(config.raw)
    (app,) = schema.applications
    assert app.route_prefix == "/"
    assert app.import_path == "embedding_service.app:build_app"
    # The generated registrations as the proxy runs them (malformed bytes, deadlines, Serve's own errors).
    assert schema.grpc_options.grpc_servicer_functions == [
        "embedding_service.proxy.ingress.add_EmbedServiceServicer_to_server",
        "embedding_service.proxy.ingress.add_HealthServicer_to_server",
    ]
    # The proxy must not cut streams (health Watch); the router bounds calls itself.
    assert schema.grpc_options.request_timeout_s is None
    args = config.args
    assert args == AppArgs.parse(app.args) and config.app_name == app.name
    assert args.default_model_name == "all-MiniLM-L6-v2"
    assert model_source(args.models[0].path).endswith("model")
    assert args.limits.max_inputs_per_request == 2048


def test_builder_wires_router_and_models():
    app = build_app({"models": [{"name": "a"}, {"name": "b", "path": "/somewhere"}], "default_model": "b"})
    assert app is not None


def test_each_kind_has_its_default_model():
    args = AppArgs.parse({"models": [{"name": "r", "kind": "rerank"}, {"name": "a"}, {"name": "s", "kind": "sparse"},
                                     {"name": "b"}, {"name": "r2", "kind": "rerank"}]})
    assert args.default_model_name == args.default_of("embedding") == "a"  # the first embedding model, not r
    assert args.default_of("rerank") == "r" and args.default_of("sparse") == "s"
    assert AppArgs.parse({"models": [{"name": "r", "kind": "rerank"}]}).default_of("sparse") == ""
    assert build_app({"models": [{"name": "r", "kind": "rerank"}, {"name": "s", "kind": "sparse"}]}) is not None


def test_empty_args_give_the_packaged_default():
    args = AppArgs.parse(None)
    assert [m.name for m in args.models] == ["all-MiniLM-L6-v2"]
    assert args.models[0].device == "auto"


@pytest.mark.parametrize(
    "bad",
    [
        {"models": []},
        {"models": [{"name": "a"}, {"name": "a"}]},
        {"models": [{"name": "a"}], "default_model": "b"},
        {"models": [{"name": "a", "max_batch_size": 16}], "router": {"shard_size": 32}},
        {"models": [{"name": "a", "device": "tpu"}]},
        {"limits": {"max_inputs_per_request": 0}},
        {"unknown_key": 1},
        # Keys come from a secret: there is no field to write one into, and a variable's name is a name.
        {"auth": {"api_keys": ["sk-123"]}},
        {"auth": {"api_keys_env": "sk-live 123"}},
        {"shutdown": {"grace_s": 0}},
        # Tracing: an endpoint with its scheme, a ratio, and headers (tokens) only by a variable's name.
        {"tracing": {"otlp_endpoint": "otel-collector:4317"}},
        {"tracing": {"otlp_endpoint": "http://c:4317", "sample_ratio": 1.5}},
        {"tracing": {"otlp_endpoint": "http://c:4317", "headers": "authorization=Bearer x"}},
        # Rerank, sparse and classification models: torch, fp32 or bf16 (classify: fp32), never the Embed default.
        {"models": [{"name": "r", "kind": "rerank", "backend": "openvino"}]},
        {"models": [{"name": "r", "kind": "rerank", "precision": "int8"}]},
        {"models": [{"name": "s", "kind": "sparse", "precision": "int8"}]},
        {"models": [{"name": "a"}, {"name": "r", "kind": "rerank"}], "default_model": "r"},
        {"models": [{"name": "x", "kind": "vision"}]},
        {"models": [{"name": "c", "kind": "classify", "precision": "bf16"}]},
    ],
)
def test_bad_args_are_rejected_before_anything_starts(bad):
    with pytest.raises(ValidationError):
        build_app(bad)


@pytest.fixture
def environment():
    """os.environ as it was, whatever the test set in it (prepare_environment writes keys no test names)."""
    saved = dict(os.environ)
    yield os.environ
    os.environ.clear()
    os.environ.update(saved)


def test_the_nodes_get_the_transport_cap_the_proxys_options_and_the_apps_serve_settings(monkeypatch, environment):
    from embedding_service.ops import ray_internals
    from embedding_service.wire import node_env

    config = ServeFile.load()
    for key in (ray_internals.PROXY_MESSAGE_SIZE_ENV, ray_internals.REPLICA_MESSAGE_LENGTH_ENV,
                "RAY_SERVE_THROUGHPUT_OPTIMIZED", "RAY_SERVE_PROXY_USE_GRPC", "RAY_SERVE_ENABLE_DIRECT_INGRESS",
                node_env.PROXY_OPTIONS_ENV):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv(ray_internals.PRELOAD_ENV, "some_other_module")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # already set by the operator: kept
    config.prepare_environment()
    limits = config.args.limits
    assert os.environ["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"] == str(4 * limits.max_request_bytes)
    assert os.environ["RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"] == str(4 * limits.max_request_bytes)
    # The speed bundle, with Serve's gRPC proxy kept (no direct ingress).
    assert os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "0"
    assert os.environ["RAY_SERVE_PROXY_USE_GRPC"] == "1"
    assert os.environ["HF_HUB_OFFLINE"] == "0"
    # Ray's workers import the proxy's gRPC server options before anything else (kept: the operator's own).
    assert os.environ["RAY_preload_python_modules"] == "some_other_module,embedding_service.proxy.grpc_options"
    options = dict(node_env.requested_proxy_options())
    assert options["grpc.server.max_pending_requests"] == limits.proxy_max_pending_calls == 20_000
    assert options["grpc.server.max_pending_requests_hard_limit"] == limits.proxy_max_pending_calls
    assert options["grpc.max_concurrent_streams"] == limits.proxy_max_streams_per_connection


def test_the_file_is_read_and_validated_once_for_the_run_the_manifests_and_the_benchmark(monkeypatch, tmp_path):
    """One ServeFile: its args, the nodes' environment and the gateway's command line come from one parse,
    whoever asks (the run command's launcher, the Kubernetes rendering, the benchmark)."""
    from benchmarks import run as bench
    from embedding_service.ops import kubernetes

    parses = []
    real = AppArgs.parse
    monkeypatch.setattr(AppArgs, "parse", classmethod(lambda cls, args: parses.append(1) or real(args)))
    config = ServeFile.load()
    kubernetes.render(config, kubernetes.KubernetesOptions())
    config.node_environment()
    config.gateway_args(["t:1"], 8080)
    assert len(parses) == 1
    bench.configured(bench.parse(["--model-option", "threads=1", "--router-option", "shard_size=16"]), None)
    assert len(parses) == 2  # the benchmark's own overrides, validated once
    # The gateway's command line is the same builder's for the run command, the manifests and the benchmark.
    gateway = kubernetes.gateway(config, kubernetes.KubernetesOptions())[0]["spec"]["template"]["spec"]["containers"][0]
    assert gateway["args"] == config.gateway_args([gateway["args"][5]], 8080, host="0.0.0.0",
                                                  drain_delay_s=kubernetes.GATEWAY_DRAIN_DELAY_S)
    limits = config.args.limits
    assert config.gateway_args(["t:1"], 9) == [
        "--host", "127.0.0.1", "--port", "9", "--targets", "t:1", "--max-inputs", str(limits.max_inputs_per_request),
        "--max-token-ids", str(limits.max_token_ids_per_input), "--max-documents", str(limits.max_documents_per_rerank),
        "--max-detokenize-token-ids", str(limits.max_token_ids_per_detokenize),
        "--max-body-bytes", str(limits.max_request_bytes), "--drain-delay-s", "1", "--shutdown-timeout-s", "30"]


def test_a_config_without_exactly_one_service_application_is_refused():
    raw = servefile.read()
    with pytest.raises(ValueError, match="exactly one application"):
        ServeFile.parse({**raw, "applications": raw["applications"] * 2})
    with pytest.raises(ValueError, match="exactly one application"):
        ServeFile.parse({**raw, "applications": []})


def test_node_env_prints_what_the_nodes_need_for_a_shell():
    import shlex
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "embedding_service", "node-env"], capture_output=True, text=True,
                          timeout=120, check=True)
    printed = dict(shlex.split(line)[1].split("=", 1) for line in done.stdout.splitlines())
    assert printed == ServeFile.load().node_environment()


def test_the_forward_token_budget_defaults_per_device_and_is_overridable():
    from embedding_service.config import FORWARD_MAX_TOKENS, ModelSettings

    default = ModelSettings(name="m", path="p")
    assert default.forward_token_budget("cpu") == FORWARD_MAX_TOKENS["cpu"] == 1024
    assert default.forward_token_budget("cuda") == default.forward_token_budget("cuda:1") == 32768
    explicit = ModelSettings(name="m", path="p", forward_max_tokens=300)
    assert explicit.forward_token_budget("cpu") == explicit.forward_token_budget("cuda") == 300
    with pytest.raises(ValidationError):
        ModelSettings(name="m", path="p", forward_max_tokens=0)


def test_the_head_resource_is_dropped_on_a_one_node_ray_and_its_absence_stops_a_larger_one(monkeypatch):
    """`serve run serve-config.yaml` starts a Ray that declares no embedding_head: on one node the router and the
    recycler go there (tests/cluster/test_serve_run.py serves so); on several, the build fails at once, saying what to
    run, instead of leaving them pending forever."""
    import ray

    from embedding_service import app
    from embedding_service.config import HEAD_RESOURCE, ON_HEAD

    def nodes(*resources: dict) -> None:
        monkeypatch.setattr(ray, "is_initialized", lambda: True)
        monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2.0, **r}} for r in resources]
                            + [{"Alive": False, "Resources": {HEAD_RESOURCE: 1.0}}])

    nodes({})
    assert app.place_on_head({**ON_HEAD, "other": 1.0}) == {"other": 1.0}
    nodes({}, {HEAD_RESOURCE: 1.0})
    assert app.place_on_head(ON_HEAD) == ON_HEAD
    nodes({}, {})
    with pytest.raises(app.NoHeadNode, match=r"ray start --head --resources='\{\"embedding_head\": 1\}'"):
        app.place_on_head(ON_HEAD)
    assert app.place_on_head({"CPU": 1.0}) == {"CPU": 1.0}  # not pinned to the head: as given


def test_the_run_command_says_whether_ray_runs_with_token_auth(monkeypatch, capsys):
    """An inherited RAY_AUTH_MODE=disabled is a WARNING at start (and the router's embedding_ray_token_auth 0, seen in
    tests/cluster/test_metrics.py as 1 for the session's token-auth Ray), never silent."""
    from embedding_service import cli

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    cli.report_ray_auth()
    assert capsys.readouterr().out.startswith("WARNING: Ray runs without token authentication (RAY_AUTH_MODE=disabled)")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    cli.report_ray_auth()
    assert "Ray's token authentication: on" in capsys.readouterr().out
