"""The benchmark's measuring code, run against the session's service (not a second Ray) at small sizes."""

from __future__ import annotations

import collections
import json

import numpy as np

from benchmarks.proc_cpu import cmdline
from embedding_service.ops.launcher import metrics_endpoints
from tests.helpers.gateways import running_gateway
from tests.helpers.models import MINILM


def test_benchmark_measures_every_workload_and_writes_table_json_and_png(service, reference_models, tmp_path, capsys):
    from benchmarks.clients import GrpcClient, RestClient
    from benchmarks.inprocess import measure_in_process
    from benchmarks.measure import accuracy_of, measure_service
    from benchmarks.report import write
    from benchmarks.scrape import BatchMetrics
    from benchmarks.workloads import Work

    work = Work.make({"w1_n": 5, "w2_requests": 2, "w2_sentences": 32, "w3_requests": 32, "w4_requests": 2,
                      "w5_inputs": 64, "w6_inputs": 64})
    results = measure_in_process(reference_models[MINILM], work, "auto", threads=1)
    # The service's default backend, compiled in-process too, and within the stated tolerance of torch.
    assert results["backend"] == "openvino"
    assert results["in_process_backend"]["max_abs_diff_vs_torch"] < 1e-5
    assert results["in_process"]["limit"] > 0 and results["in_process_backend"]["limit"] > 0

    with running_gateway(targets=[service.target]) as base:
        client = GrpcClient(service.target)
        results["accuracy"] = accuracy_of(client, MINILM)
        results["workloads"] = measure_service(client, RestClient(base, MINILM), work, results,
                                               BatchMetrics(metrics_endpoints, MINILM, report_s=0.6))
    assert results["accuracy"]["precision"] == "fp32" and results["accuracy"]["canary_min_cosine"] > 0.99999
    w = results["workloads"]
    assert set(w) == ({f"W{i}_{side}" for i in (1, 2, 3, 4) for side in ("grpc", "rest")}
                      | {"W1_rest_async", "W2_rest_async", "W3_rest_async", "W3_openai_sdk", "W3_rest_keepalive",
                         "W5_grpc_stream", "W6_grpc_real_text"})
    for name, v in w.items():
        assert v.get("ratio", 1) > 0 and v.get("p50_ms", 1) > 0, name
        # The batches the replicas ran, from the service's metrics: never over the configured maximum.
        b = v["batches"]
        assert b["batches"] > 0 and 1 <= b["mean_size"] <= 128, (name, b)
        assert sum(b["sizes"].values()) == b["batches"] and all(float(k[2:]) <= 128 for k in b["sizes"]), (name, b)
        assert b["mean_forward_ms"] > 0 and 0 <= b["padding_share"] < 1, (name, b)
    assert w["W5_grpc_stream"]["inputs"] == 64
    assert w["W3_rest"]["calls_resent"] == 0  # no connection to the gateway broke
    assert results["in_process"]["w6_rate"] > 0 and w["W6_grpc_real_text"]["rate"] > 0
    assert np.isclose(w["W5_grpc_stream"]["result_mib"], 64 * 384 * 4 / 2**20)

    write(results, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["workloads"]["W3_grpc"]["rate"] == w["W3_grpc"]["rate"]
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "W3_grpc" in printed and "service backend openvino fp32 in-process" in printed
    assert "precision fp32: no gate (fp32); canary min cosine 1.0" in printed


def test_the_benchmark_measures_a_peer_started_from_a_command_line_and_stops_it(service, tmp_path):
    """The peer comparison, with this project's own gateway standing in for another OpenAI-compatible server."""
    import os
    import shlex
    import sys

    from benchmarks.measure import measure_peer
    from benchmarks.report import table
    from benchmarks.workloads import Work
    from tests.helpers.ports import free_port

    port = free_port()
    marker = f"-m gateway --targets {service.target} --port {port}"  # the peer's process, to find it after the stop
    command = f"exec {shlex.quote(sys.executable)} {marker}"
    work = Work.make({"w1_n": 5, "w2_requests": 2, "w2_sentences": 32, "w3_requests": 64, "w4_requests": 2,
                      "w5_inputs": 10, "w6_inputs": 10})
    results = {"in_process": {"limit": 100.0, "w1_p50_ms": 5.0, "w4_rate": 10.0}}
    peer = measure_peer(command, f"http://127.0.0.1:{port}", MINILM, work, results, tmp_path / "peer.log")
    w = peer["workloads"]
    assert set(w) == {"W1_rest", "W2_rest", "W3_rest", "W4_rest", "W1_rest_async", "W2_rest_async", "W3_rest_async",
                      "W3_openai_sdk", "W3_rest_keepalive"}
    assert all(v.get("rate", 1) > 0 and v.get("p50_ms", 1) > 0 for v in w.values())
    assert w["W3_rest"]["ratio"] == w["W3_rest"]["rate"] / 100.0
    # Stopped with its whole process group: nothing of it is left.
    alive = [p for p in os.listdir("/proc") if p.isdigit() and marker in cmdline(p)]
    assert not alive, alive
    batches = {"batches": 1, "mean_size": 1.0, "mean_queue_ms": 0.0, "mean_forward_ms": 1.0, "padding_share": 0.0}
    results |= {"workloads": {"W3_rest": {"rate": w["W3_rest"]["rate"] * 2, "batches": batches}}, "peer": peer}
    printed = table(results | {"in_process": results["in_process"] | {"limit_batch_size": 32, "rate_by_batch_size": {}}})
    assert "peer: `" in printed and "2.00x calls/s" in printed


def test_the_serving_path_mode_measures_every_process_cpu_per_call_and_the_peer(service, tmp_path, capsys):
    """--serving-path's measuring and report against the session's service and a gateway of its own process
    (the near-zero model is built and configured by the mode itself: see the next test); the peer is this
    project's gateway standing in for another server."""
    import shlex
    import sys

    from benchmarks import serving_path as sp
    from benchmarks.proc_cpu import CpuMeter
    from benchmarks.report import write
    from tests.helpers.gateways import gateway_process
    from tests.helpers.ports import free_port

    sizes = {"w1_n": 5, "w3_requests": 64}
    with gateway_process("--targets", service.target) as (base, _):
        rows = sp.run_workloads(sp.workloads(service.target, base, MINILM, sizes), CpuMeter())
    assert set(rows) == {"W1_grpc", "W1_rest", "W3_grpc", "W3_rest", "W3_rest_workers", "W3_rest_keepalive",
                         "W3_rest_aiohttp", "W3_openai_sdk"}
    # /proc counts CPU in ticks of 10 ms, and a workload here is 5 or 64 calls of about a millisecond in each
    # process: one workload's share may read 0 ticks, the sum over the workloads may not.
    spent: collections.Counter = collections.Counter()
    for name, row in rows.items():
        assert row["calls"] == (5 if name.startswith("W1") else 64) and row["rate"] > 0 and row["p50_ms"] > 0, name
        cpu = row["cpu_ms_per_call"]
        # Every process of the path is read for these calls (the gateway on the REST ones).
        path = ("proxy", "router", "replica") + (("gateway",) if "grpc" not in name else ())
        assert all(cpu[role] >= 0 for role in path), (name, cpu)
        spent.update({role: cpu[role] * row["calls"] for role in path})
        assert row["server_cpu_ms_per_call"] == sum(cpu.values()) and row["client_cpu_ms_per_call"] > 0
    assert all(spent[role] > 0 for role in ("proxy", "router", "replica", "gateway")), spent

    port = free_port()
    command = f"exec {shlex.quote(sys.executable)} -m gateway --targets {service.target} --port {port}"
    peer = sp.against_the_peer(command, f"http://127.0.0.1:{port}", tmp_path, sizes, tmp_path / "peer.log", None,
                               model=MINILM)
    assert set(peer["workloads"]) == {n for n in rows if "grpc" not in n}
    assert all(set(v["cpu_ms_per_call"]) == {"peer"} and v["cpu_ms_per_call"]["peer"] >= 0
               for v in peer["workloads"].values())
    assert sum(v["cpu_ms_per_call"]["peer"] * v["calls"] for v in peer["workloads"].values()) > 0, peer

    results = {"mode": "serving-path", "model": "the session's MiniLM", "callers": sp.CALLERS, "sizes": sizes,
               "cpus": 2, "workloads": rows, "peer": peer}
    write(results, tmp_path)
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "ours  W3_grpc" in printed and "peer  W3_rest" in printed and "ours / peer: W1_rest" in printed


def test_the_stages_of_one_call_come_from_its_own_trace_and_add_up_to_its_latency(service, capsys):
    """benchmarks.stages against the session's service, which traces every call to the session's collector."""
    from benchmarks import stages

    result = stages.measure(service.target, service.traces, calls=12)
    assert result["calls"] == 12 and result["traced_whole"] == 12
    got = result["stages_p50_ms"]
    assert list(got) == [stages.OUTSIDE, *stages.STAGES]
    # Each span sits inside the one that called it: no stage is negative, and the router's span is within
    # the client's latency; the forward pass and the tokenizing took time.
    assert all(ms >= 0 for ms in got.values()), got
    assert got[stages.OUTSIDE] > 0 and got["replica: forward pass"] > 0 and got["replica: tokenizing"] > 0, got
    stages.print_stages(result)
    assert "12 of 12 calls traced whole" in capsys.readouterr().out
