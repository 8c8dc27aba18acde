"""Runs the gateway with uvicorn; settings from the command line and GATEWAY_* variables."""

from __future__ import annotations

import argparse

import uvicorn

from gateway.app import create_app
from gateway.settings import GatewaySettings


def parse_args(argv: list[str] | None = None) -> GatewaySettings:
    parser = argparse.ArgumentParser(prog="python -m gateway", description="OpenAI-compatible embeddings gateway")
    parser.add_argument("--targets", nargs="+", help="gRPC targets host:port of the embedding service")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--api-keys", nargs="*", dest="api_keys")
    parser.add_argument("--allow-unauthenticated", action="store_true", default=None, dest="allow_unauthenticated")
    parser.add_argument("--call-timeout-s", type=float, dest="call_timeout_s")
    parser.add_argument("--request-timeout-s", type=float, dest="request_timeout_s")
    parser.add_argument("--max-retries", type=int, dest="max_retries")
    parser.add_argument("--max-body-bytes", type=int, dest="max_body_bytes")
    parser.add_argument("--max-inputs", type=int, dest="max_inputs")
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    return GatewaySettings(**given)


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    print(f"OpenAI gateway on http://{settings.host}:{settings.port}/v1 -> gRPC {settings.targets}", flush=True)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")
    return 0
