"""Runs the gateway with uvicorn; settings from the command line and GATEWAY_* variables."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time

import uvicorn

from gateway.app import create_app
from gateway.settings import GatewaySettings


def arguments() -> argparse.ArgumentParser:
    """The gateway's command line: a flag for each setting that may be given there (docs/configuration.md)."""
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
    parser.add_argument("--max-token-ids", type=int, dest="max_token_ids")
    parser.add_argument("--max-documents", type=int, dest="max_documents")
    parser.add_argument("--max-cohere-texts", type=int, dest="max_cohere_texts")
    parser.add_argument("--max-detokenize-token-ids", type=int, dest="max_detokenize_token_ids")
    parser.add_argument("--max-json-values", type=int, dest="max_json_values")
    parser.add_argument("--max-body-bytes-in-flight", type=int, dest="max_body_bytes_in_flight")
    parser.add_argument("--coalesce-max-inputs", type=int, dest="coalesce_max_inputs")
    parser.add_argument("--coalesce-max-in-flight", type=int, dest="coalesce_max_in_flight")
    parser.add_argument("--keep-alive-s", type=int, dest="keep_alive_s")
    parser.add_argument("--access-log", action="store_true", default=None, dest="access_log",
                        help="log a line per request (off by default)")
    parser.add_argument("--drain-delay-s", type=float, dest="drain_delay_s")
    parser.add_argument("--shutdown-timeout-s", type=float, dest="shutdown_timeout_s")
    parser.add_argument("--jobs-storage-root", dest="jobs_storage_root",
                        help="the batch jobs' storage root (the service's args.jobs.storage_root): turns on /v1/files "
                        "and /v1/batches")
    parser.add_argument("--jobs-s3-endpoint", dest="jobs_s3_endpoint")
    parser.add_argument("--max-file-bytes", type=int, dest="max_file_bytes")
    parser.add_argument("--max-files-per-key", type=int, dest="max_files_per_key")
    parser.add_argument("--max-jobs-per-key", type=int, dest="max_jobs_per_key")
    parser.add_argument("--max-running-jobs-per-key", type=int, dest="max_running_jobs_per_key")
    parser.add_argument("--files-retention-s", type=float, dest="files_retention_s")
    parser.add_argument("--parent-pid", type=int, dest="parent_pid",
                        help="stop (as on SIGTERM) once this process, the one that started the gateway, is gone")
    return parser


def parse_args(argv: list[str] | None = None) -> GatewaySettings:
    given = {k: v for k, v in vars(arguments().parse_args(argv)).items() if v is not None}
    return GatewaySettings(**given)


class DrainingServer(uvicorn.Server):
    """uvicorn, stopping as a load-balanced server should.

    The first SIGTERM or Ctrl-C sets `draining` (/readyz answers 503) and keeps
    serving for `delay_s`; then uvicorn stops accepting and waits for the
    requests in flight (its graceful-shutdown timeout). Another signal stops at once.
    """

    def __init__(self, config: uvicorn.Config, draining: threading.Event, delay_s: float) -> None:
        super().__init__(config)
        self.draining = draining
        self.delay_s = delay_s

    def handle_exit(self, sig, frame) -> None:
        if self.draining.is_set():
            super().handle_exit(sig, frame)
            return
        self.draining.set()
        timer = threading.Timer(self.delay_s, super().handle_exit, args=(sig, frame))
        timer.daemon = True
        timer.start()


def server(settings: GatewaySettings) -> DrainingServer:
    draining = threading.Event()
    config = uvicorn.Config(create_app(settings, draining), host=settings.host, port=settings.port, log_level="info",
                            timeout_keep_alive=settings.keep_alive_s, access_log=settings.access_log,
                            timeout_graceful_shutdown=settings.shutdown_timeout_s)
    return DrainingServer(config, draining, settings.drain_delay_s)


def follow_parent(running: DrainingServer, parent_pid: int, every_s: float = 1.0) -> threading.Thread:
    """A parent killed outright (SIGKILL, OOM) sends no signal on: without this its gateway would live on."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(every_s)
        logging.getLogger("gateway").warning("the process that started the gateway (pid %d) is gone: stopping",
                                             parent_pid)
        running.handle_exit(signal.SIGTERM, None)

    thread = threading.Thread(target=watch, name="follow-parent", daemon=True)
    thread.start()
    return thread


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    print(f"OpenAI gateway on http://{settings.host}:{settings.port}/v1 -> gRPC {settings.targets}", flush=True)
    running = server(settings)
    if settings.parent_pid is not None:
        follow_parent(running, settings.parent_pid)
    running.run()
    return 0
