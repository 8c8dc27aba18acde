"""The benchmark's own logic: a call's stages from its spans, and the near-zero model it serves for --serving-path."""

from __future__ import annotations


def test_a_call_whose_trace_is_not_whole_has_no_stages():
    from benchmarks import stages
    from benchmarks.otlp_sink import ReceivedSpan

    def span(name, start, end):
        return ReceivedSpan(name, "t", name, "", 0, "", {}, start, end)

    ms = 1_000_000
    spans = [span(stages.ROUTER, 0, 10 * ms), span(stages.SHARD, 1 * ms, 9 * ms), span(stages.MODEL, 2 * ms, 8 * ms),
             span(stages.TOKENIZE, 3 * ms, 4 * ms), span(stages.QUEUE, 4 * ms, 5 * ms),
             span(stages.FORWARD, 5 * ms, 7 * ms)]
    whole = stages.call_stages(spans, latency_s=0.012)
    assert whole[stages.OUTSIDE] == 2.0 and whole["replica: forward pass"] == 2.0
    assert whole["hop router -> model replica"] == 1.0 and whole["replica: after the forward pass"] == 1.0
    assert sum(whole.values()) == 12.0  # the stages partition the client's latency
    assert stages.call_stages(spans[:-1], latency_s=0.012) is None


def test_the_near_zero_model_loads_in_sentence_transformers_and_replaces_the_default_model(tmp_path):
    from sentence_transformers import SentenceTransformer

    from benchmarks import serving_path as sp
    from benchmarks.near_zero import HIDDEN, build_near_zero_model
    from embedding_service.ops.servefile import ServeFile

    folder = build_near_zero_model(tmp_path)
    model = SentenceTransformer(str(folder), device="cpu")
    assert model.encode(["a sentence"]).shape == (1, HIDDEN)
    assert model[0].auto_model.config.num_hidden_layers == 1 and model.max_seq_length == 256
    config = sp.near_zero_config(ServeFile.load(), folder)
    assert config.args.models[0].name == sp.NAME and config.args.models[0].path == str(folder)
    assert config.args.default_model == sp.NAME
    assert config.args.router == ServeFile.load().args.router  # the serving path as shipped


def test_the_serving_path_table_says_when_a_peer_figure_is_zero_instead_of_failing():
    """/proc counts CPU in 10 ms ticks: a short workload may read 0 for a process (seen for the peer in a test run)."""
    from benchmarks.serving_report import table

    def row(rate: float, cpu: float) -> dict:
        return {"rate": rate, "p50_ms": 1.0, "p99_ms": 2.0, "cpu_ms_per_call": {"peer": cpu},
                "server_cpu_ms_per_call": cpu}

    printed = table({"model": "m", "callers": 64, "cpus": 2, "workloads": {"W3_rest": row(200, 0.5)},
                     "peer": {"workloads": {"W3_rest": row(100, 0.0)}}})
    assert "ours / peer: W3_rest 2.00x calls/s, CPU/call n/a (the peer's figure is 0)" in printed
