"""`serve run` of the config file, as every Ray Serve user starts one: on a fresh one-node Ray (none of the run
command's node settings, no head resource declared), the service serves. The model it serves is the tiny decoder
embedder (Qwen2-shaped: last-token pooling, left padding, an instruction prompt) on `backend: auto`, so the same
run shows a decoder compiled for OpenVINO serving through every process of the service."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import psutil
import yaml

from embedding_client.v1 import embedding_pb2 as pb
from embedding_client.v1 import embedding_pb2_grpc
from embedding_service.ops import servefile
from tests.helpers.models import DECODER
from tests.helpers.observe import wait_until
from tests.helpers.session import one_model_config

# What the test session (or the run command) gives its own Ray nodes: a Serve user's machine has none of it.
# Ray's token authentication is left to Ray's own default for a local Ray (on), as on a fresh machine.
NODE_SETTINGS = ("RAY_ADDRESS", "RAY_AUTH_MODE", *servefile.ServeFile.load().node_environment())


def test_serve_run_of_the_config_file_serves_on_a_one_node_ray(tmp_path: Path, decoder_dir):
    from sentence_transformers import SentenceTransformer

    config, grpc_port = one_model_config(decoder_dir, name=DECODER, backend="auto")
    path = tmp_path / "serve-config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k not in NODE_SETTINGS} | {"RAY_ADDRESS": "local"}
    log = tmp_path / "serve-run.log"
    serve = str(Path(sys.executable).with_name("serve"))
    with open(log, "wb") as out:
        process = subprocess.Popen([serve, "run", str(path)], env=env | {"PYTHONUNBUFFERED": "1"}, stdout=out,
                                   stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)
    stub = embedding_pb2_grpc.EmbedServiceStub(grpc.insecure_channel(f"127.0.0.1:{grpc_port}"))
    texts = ["served by serve run", "a decoder pools its last token, padded on the left of shorter inputs"]
    request = pb.EmbedRequest(inputs=[pb.EmbedInput(text=t) for t in texts], prompt_name="query")
    replies = []

    def served() -> bool:
        assert process.poll() is None, log.read_text(errors="replace")[-4000:]
        try:
            replies.append(stub.Embed(request, timeout=10))
            return True
        except grpc.RpcError:
            return False

    started = time.monotonic()
    try:
        wait_until(served, 240, "an Embed answered under serve run")
        print(f"serve run served after {time.monotonic() - started:.1f} s")
        expected = SentenceTransformer(str(decoder_dir), device="cpu").encode(texts, prompt_name="query",
                                                                              normalize_embeddings=True)
        got = np.array([list(e.values) for e in replies[0].embeddings])
        assert np.abs(got - expected).max() < 1e-5
        model = stub.GetModel(pb.GetModelRequest(name=DECODER), timeout=30).model
        assert model.backend == "openvino" and not model.refused  # auto compiled it, within the canary
    finally:
        # Killed outright, its Ray with it (what it does on Ctrl-C is Serve's; none may compete with later tests).
        ray_processes = psutil.Process(process.pid).children(recursive=True)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        for leftover in ray_processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                leftover.kill()
