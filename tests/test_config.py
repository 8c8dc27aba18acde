"""Configuration enters through the builder's typed args; serve-config.yaml is valid."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from embedding_service import launcher
from embedding_service.app import build_app
from embedding_service.config import AppArgs


def test_serve_config_is_a_valid_serve_deploy_config():
    config = launcher.load_config()
    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    assert app.route_prefix == "/"
    assert app.import_path == "embedding_service.app:build_app"
    # The generated registrations as the proxy runs them (malformed bytes, deadlines, Serve's own errors).
    assert schema.grpc_options.grpc_servicer_functions == [
        "embedding_service.proxy_ingress.add_EmbedServiceServicer_to_server",
        "embedding_service.proxy_ingress.add_HealthServicer_to_server",
    ]
    # The proxy must not cut streams (health Watch); the router bounds calls itself.
    assert schema.grpc_options.request_timeout_s is None
    args = AppArgs.parse(app.args)
    assert args.default_model_name == "all-MiniLM-L6-v2"
    assert args.models[0].resolved_path().endswith("model")
    assert args.limits.max_inputs_per_request == 2048


def test_builder_wires_router_and_models():
    app = build_app({"models": [{"name": "a"}, {"name": "b", "path": "/somewhere"}], "default_model": "b"})
    assert app is not None


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
    ],
)
def test_bad_args_are_rejected_before_anything_starts(bad):
    with pytest.raises(ValidationError):
        build_app(bad)


def test_the_launcher_gives_ray_the_transport_cap_and_the_apps_serve_settings(monkeypatch):
    import json

    from embedding_service import serve_grpc_options

    config = launcher.load_config()
    for key in ("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH",
                "RAY_SERVE_THROUGHPUT_OPTIMIZED", "RAY_SERVE_PROXY_USE_GRPC", "RAY_SERVE_ENABLE_DIRECT_INGRESS",
                serve_grpc_options.OPTIONS_ENV):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv(launcher.PRELOAD_ENV, "some_other_module")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # already set by the operator: kept
    launcher.prepare_environment(config)
    args = config["applications"][0]["args"]
    assert os.environ["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"] == str(4 * args["limits"]["max_request_bytes"])
    assert os.environ["RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"] == str(4 * args["limits"]["max_request_bytes"])
    # The speed bundle, with Serve's gRPC proxy kept (no direct ingress).
    assert os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "0"
    assert os.environ["RAY_SERVE_PROXY_USE_GRPC"] == "1"
    assert os.environ["HF_HUB_OFFLINE"] == "0"
    # Ray's workers import the proxy's gRPC server options before anything else (kept: the operator's own).
    assert os.environ[launcher.PRELOAD_ENV] == "some_other_module,embedding_service.serve_grpc_options"
    options = dict(json.loads(os.environ[serve_grpc_options.OPTIONS_ENV]))
    assert options["grpc.server.max_pending_requests"] == args["limits"]["proxy_max_pending_calls"]
    assert options["grpc.server.max_pending_requests_hard_limit"] == args["limits"]["proxy_max_pending_calls"]
    assert options["grpc.max_concurrent_streams"] == args["limits"]["proxy_max_streams_per_connection"]


def test_preloaded_options_reach_the_servers_ray_serve_builds(tmp_path):
    """In a fresh process, as in a Ray worker: the module extends the options Serve's gRPC servers are built with."""
    import subprocess
    import sys

    code = (
        "import os, json\n"
        "os.environ['EMBEDDING_SERVE_GRPC_OPTIONS'] = json.dumps([['grpc.server.max_pending_requests', 7],"
        " ['grpc.max_receive_message_length', 1024]])\n"
        "import embedding_service.serve_grpc_options\n"
        "from ray.serve._private import grpc_util\n"
        "options = dict(grpc_util.DEFAULT_GRPC_SERVER_OPTIONS)\n"
        "assert options['grpc.server.max_pending_requests'] == 7, options\n"
        "assert options['grpc.max_receive_message_length'] == 1024, options  # replaced, not doubled\n"
        "assert len(grpc_util.DEFAULT_GRPC_SERVER_OPTIONS) == len(options)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=tmp_path)


def test_the_forward_token_budget_defaults_per_device_and_is_overridable():
    from embedding_service.config import FORWARD_MAX_TOKENS, ModelSettings

    default = ModelSettings(name="m", path="p")
    assert default.forward_token_budget("cpu") == FORWARD_MAX_TOKENS["cpu"] == 1024
    assert default.forward_token_budget("cuda") == default.forward_token_budget("cuda:1") == 32768
    explicit = ModelSettings(name="m", path="p", forward_max_tokens=300)
    assert explicit.forward_token_budget("cpu") == explicit.forward_token_budget("cuda") == 300
    with pytest.raises(ValidationError):
        ModelSettings(name="m", path="p", forward_max_tokens=0)
