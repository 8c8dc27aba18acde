"""The client's classify, tokenize and detokenize, and the bulk `classify`, `tokenize` (and `sparse`) commands, against
an in-process gRPC peer that keeps the service's published limits: jobs cut into calls within them, a broken stream
resumed with only what it had not returned, results assembled in input order, a stopped bulk run resumed."""

from __future__ import annotations

import asyncio
import json
import math
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedding_client import AsyncEmbedClient, EmbedClient, FailedPrecondition, InvalidArgument, RetryPolicy
from embedding_client.cli import main
from embedding_client.planning import plan_calls
from embedding_client.v1 import embedding_pb2 as pb
from embedding_service.wire.reasons import Reason, ServiceError
from tests.helpers.gateways import ScriptedPeer, scripted_grpc_peer

LABELS = ("sports", "politics", "science", "arts")
LIMITS = pb.ServiceLimits(max_inputs_per_request=4, max_inputs_per_stream=6, max_request_bytes=1 << 20,
                          max_labels_per_result=3, max_token_ids_per_detokenize=25)
CLS, SEP = 1, 2  # the peer's special token ids (its "tokenizer": one token per character, id = code point)
FAST = RetryPolicy(max_retries=3, backoff_initial_s=0.001)


def logits(text: str, pair: str) -> list[float]:
    """The peer's "model": a different logit per label, and per input."""
    return [float((len(text) * (j + 2) + 3 * len(pair) + j) % 11 - 5) for j in range(len(LABELS))]


def expected(text: str, pair: str = "", top_k: int | None = None, raw: bool = False) -> list[tuple[str, float]]:
    """(label, score) highest first, ties in label order, as the service ranks them."""
    scores = [x if raw else 1 / (1 + math.exp(-x)) for x in logits(text, pair)]
    order = sorted(range(len(LABELS)), key=lambda j: (-scores[j], j))[: min(top_k or LIMITS.max_labels_per_result,
                                                                             LIMITS.max_labels_per_result)]
    return [(LABELS[j], scores[j]) for j in order]


def tokens_of(text: str, pair: str) -> int:
    return len(text) + len(pair) + (3 if pair else 2)


def _refuse(context, error: ServiceError):
    context.set_trailing_metadata([("grpc-status-details-bin", error.status_bytes())])
    context.abort(error.code, error.message)


class Peer(ScriptedPeer):
    """Answers Classify, ClassifyStream, Tokenize, Detokenize, EmbedStream and EmbedSparse within LIMITS (refusing
    calls past them, as the service does), keeping every request; the next `breaks[method]` streams of a method
    break after their first chunk; the calls numbered in `refuse_calls` (from 1, per method) fail
    FAILED_PRECONDITION."""

    def __init__(self, refuse_calls: dict[str, set[int]] | None = None) -> None:
        super().__init__()
        self.requests: dict[str, list] = {}
        self.breaks: dict[str, int] = {}
        self.refuse_calls = refuse_calls or {}
        self.lock = threading.Lock()

    def _record(self, method: str, request, context, most: int, inputs) -> None:
        with self.lock:
            calls = self.requests.setdefault(method, [])
            calls.append(request)
            number = len(calls)
        if len(inputs) > most:
            _refuse(context, ServiceError(Reason.TOO_MANY_INPUTS, f"{len(inputs)} inputs, at most {most}"))
        if number in self.refuse_calls.get(method, ()):
            _refuse(context, ServiceError(Reason.MODEL_REFUSED, "scripted refusal"))

    def ListModels(self, request, context):
        return pb.ListModelsResponse(limits=LIMITS)

    def _classification(self, index: int, item: pb.ClassifyInput, request) -> pb.Classification:
        if not item.text:
            raise ValueError(index)
        top = request.top_k if request.HasField("top_k") else None
        labels = [pb.LabelScore(label=label, label_id=LABELS.index(label), score=score)
                  for label, score in expected(item.text, item.text_pair, top, request.raw_scores)]
        return pb.Classification(index=index, labels=labels, tokens=tokens_of(item.text, item.text_pair))

    def _classifications(self, request, context) -> list[pb.Classification]:
        try:
            return [self._classification(i, item, request) for i, item in enumerate(request.inputs)]
        except ValueError as empty:
            _refuse(context, ServiceError(Reason.EMPTY_INPUT, "an input is empty", index=empty.args[0]))

    def Classify(self, request, context):
        self._record("Classify", request, context, LIMITS.max_inputs_per_request, request.inputs)
        results = self._classifications(request, context)
        return pb.ClassifyResponse(model="peer-classifier", classifications=results,
                                   usage=pb.Usage(total_tokens=sum(c.tokens for c in results)))

    def ClassifyStream(self, request, context):
        self._record("ClassifyStream", request, context, LIMITS.max_inputs_per_stream, request.inputs)
        results = self._classifications(request, context)[::-1]  # completion order: not input order
        for k in range(0, len(results), 2):
            chunk = results[k : k + 2]
            yield pb.ClassifyStreamResponse(model="peer-classifier", classifications=chunk,
                                            usage=pb.Usage(total_tokens=sum(c.tokens for c in chunk)))
            self._maybe_break("ClassifyStream", context)

    def _maybe_break(self, method: str, context) -> None:
        with self.lock:
            breaking = self.breaks.get(method, 0) > 0
            self.breaks[method] = max(0, self.breaks.get(method, 0) - 1)
        if breaking:
            _refuse(context, ServiceError(Reason.MODEL_UNAVAILABLE, "a replica stopped", retry_after_s=0.01))

    def EmbedStream(self, request, context):
        self._record("EmbedStream", request, context, LIMITS.max_inputs_per_stream, request.inputs)
        for index in reversed(range(len(request.inputs))):
            vector = np.array([len(request.inputs[index].text), 1], dtype="<f4").tobytes()
            yield pb.EmbedStreamResponse(model="peer", dimensions=2,
                                         embeddings=[pb.Embedding(index=index, float32_le=vector)])
            self._maybe_break("EmbedStream", context)

    def Tokenize(self, request, context):
        self._record("Tokenize", request, context, LIMITS.max_inputs_per_request, request.inputs)
        assert request.HasField("add_special_tokens"), "the client says which it wants"
        special = request.add_special_tokens
        out = []
        for index, text in enumerate(request.inputs):
            ids = [ord(c) for c in text]
            item = pb.TokenizedInput(index=index, ids=[CLS, *ids, SEP] if special else ids)
            if request.return_tokens:
                item.tokens.extend(["[CLS]", *text, "[SEP]"] if special else list(text))
                item.special.extend([True, *[False] * len(text), True] if special else [False] * len(text))
            if request.return_offsets:
                spans = [(k, k + 1) for k in range(len(text))]
                spans = [(0, 0), *spans, (0, 0)] if special else spans
                item.starts.extend(a for a, _ in spans)
                item.ends.extend(b for _, b in spans)
            out.append(item)
        return pb.TokenizeResponse(model="peer", inputs=out, max_sequence_length=40,
                                   usage=pb.Usage(total_tokens=sum(len(t.ids) for t in out)))

    def Detokenize(self, request, context):
        self._record("Detokenize", request, context, LIMITS.max_inputs_per_request, request.inputs)
        total = sum(len(i.ids) for i in request.inputs)
        if total > LIMITS.max_token_ids_per_detokenize:
            _refuse(context, ServiceError(Reason.TOO_MANY_INPUTS, f"{total} token ids in one call"))
        names = {CLS: "[CLS]", SEP: "[SEP]"} if not request.skip_special_tokens else {CLS: "", SEP: ""}
        return pb.DetokenizeResponse(model="peer", texts=["".join(names.get(i, chr(i)) for i in item.ids)
                                                          for item in request.inputs])

    def EmbedSparse(self, request, context):
        self._record("EmbedSparse", request, context, LIMITS.max_inputs_per_request, request.inputs)
        return pb.EmbedSparseResponse(model="peer-sparse", dimensions=1000, embeddings=[
            pb.SparseEmbedding(index=i, indices=[len(t), 7], values=[2.0, 0.5], tokens=len(t), active_terms=2)
            for i, t in enumerate(request.inputs)], usage=pb.Usage(total_tokens=sum(map(len, request.inputs))))


@pytest.fixture
def peer():
    peer = Peer()
    with scripted_grpc_peer(peer, peer.health) as target:
        peer.target = target
        yield peer


def texts_of(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["x" * int(rng.integers(1, 30)) + f" {k}" for k in range(n)]


def as_pairs(classification) -> list[tuple[str, float]]:
    return [(s.label, s.score) for s in classification.labels]


def assert_classified(result, inputs, top_k=None, raw=False) -> None:
    assert len(result.classifications) == len(inputs)
    for c, item in zip(result.classifications, inputs):
        text, pair = (item, "") if isinstance(item, str) else item
        got, want = as_pairs(c), expected(text, pair, top_k, raw)
        assert [label for label, _ in got] == [label for label, _ in want]
        assert np.allclose([s for _, s in got], [s for _, s in want], atol=1e-6)
        assert c.tokens == tokens_of(text, pair)
        assert [s.label_id for s in c.labels] == [LABELS.index(label) for label, _ in want]
    assert result.tokens == sum(c.tokens for c in result.classifications)


def test_a_second_budget_per_call_cuts_runs_by_count():
    assert plan_calls([10] * 5, max_inputs=10, max_bytes=10_000, counts=[3, 3, 3, 3, 3], max_count=7) == [
        (0, 2), (2, 4), (4, 5)]
    assert plan_calls([10] * 3, max_inputs=10, max_bytes=10_000, counts=[2, 9, 1], max_count=5) == [
        (0, 1), (1, 2), (2, 3)]  # one over the budget alone goes alone: the service names it
    assert plan_calls([10] * 3, max_inputs=10, max_bytes=10_000, counts=[9, 9, 9], max_count=0) == [(0, 3)]


def test_classify_within_one_call_sends_the_options_and_keeps_input_order(peer):
    inputs = ["the match went to extra time", ("a premise", "its hypothesis"), ["a list pair", "is a pair too"]]
    with EmbedClient(peer.target) as client:
        result = client.classify(inputs, model="m", top_k=2, raw_scores=True, truncation="reject")
        every = client.classify(inputs[:1])
    (request,) = peer.requests["Classify"][:1]
    assert request.model == "m" and request.top_k == 2 and request.raw_scores
    assert request.truncation == pb.TRUNCATION_POLICY_REJECT
    assert [(i.text, i.text_pair) for i in request.inputs] == [(inputs[0], ""), inputs[1], tuple(inputs[2])]
    assert not peer.requests["Classify"][1].HasField("top_k") and "ClassifyStream" not in peer.requests
    assert result.model == "peer-classifier"
    assert_classified(result, [inputs[0], inputs[1], tuple(inputs[2])], top_k=2, raw=True)
    assert_classified(every, inputs[:1])  # unset top_k: the service's max_labels_per_result of them
    assert len(every.classifications[0].labels) == LIMITS.max_labels_per_result
    top, _ = expected(inputs[0])[0]
    assert every.classifications[0].scores()[top] == every.classifications[0].labels[0].score


def test_a_big_classify_streams_within_the_limits_and_resumes_a_broken_stream(peer):
    inputs = [t if k % 3 else (t, "pair " * k) for k, t in enumerate(texts_of(15, seed=1))]
    peer.breaks = {"ClassifyStream": 1}
    seen = []
    with EmbedClient(peer.target, retry=FAST) as client:
        result = client.classify(inputs, top_k=3, progress=lambda done, total: seen.append((done, total)))
        assert client.stats.retries == 1
    streams = [[i.text for i in r.inputs] for r in peer.requests["ClassifyStream"]]
    texts = [x if isinstance(x, str) else x[0] for x in inputs]
    # 6 + 6 + 3 inputs; the first stream broke after its first chunk (inputs 5 and 4): its retry sent the rest only
    assert streams == [texts[0:6], texts[0:4], texts[6:12], texts[12:15]]
    assert "Classify" not in peer.requests
    assert_classified(result, inputs, top_k=3)
    assert seen[-1] == (15, 15) and [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_the_asyncio_client_classifies_and_embeds_past_one_call(peer):
    peer.breaks = {"ClassifyStream": 1, "EmbedStream": 1}  # embed's stream is the same resumable stream's
    inputs = texts_of(9, seed=2)

    async def scenario():
        async with AsyncEmbedClient(peer.target, retry=FAST) as client:
            return await client.classify(inputs), await client.embed(inputs)

    classified, embedded = asyncio.run(scenario())
    assert_classified(classified, inputs)
    assert embedded.vectors[:, 0].tolist() == [float(len(t)) for t in inputs]
    assert [len(r.inputs) for r in peer.requests["ClassifyStream"]] == [6, 4, 3]  # broke after inputs 5 and 4
    assert [len(r.inputs) for r in peer.requests["EmbedStream"]] == [6, 5, 3]  # broke after input 5


def test_classify_refuses_bad_arguments_here_and_raises_the_services_errors_typed(peer):
    with EmbedClient(peer.target) as client:
        with pytest.raises(ValueError, match="truncation"):
            client.classify(["x"], truncation="start")
        with pytest.raises(ValueError, match="top_k"):
            client.classify(["x"], top_k=0)
        with pytest.raises(TypeError, match="text_pair"):
            client.classify([("a", "b", "c")])
        assert client.classify([]).classifications == [] and "Classify" not in peer.requests
        with pytest.raises(InvalidArgument) as caught:
            client.classify(["fine", ""])
    assert caught.value.reason == "EMPTY_INPUT" and caught.value.metadata == {"index": "1"}


def test_tokenize_in_calls_within_the_limits_in_input_order(peer):
    texts = texts_of(10, seed=3)
    with EmbedClient(peer.target) as client:
        full = client.tokenize(texts, return_tokens=True, return_offsets=True)
        bare = client.tokenize(texts, model="m", add_special_tokens=False)
        peer.refuse_calls = {"Tokenize": {7}}
        with pytest.raises(FailedPrecondition):
            client.tokenize(["x"])
    calls = peer.requests["Tokenize"][:6]
    assert [len(r.inputs) for r in calls] == [4, 4, 2, 4, 4, 2]
    assert not calls[-1].add_special_tokens and calls[-1].model == "m"
    assert full.model == "peer" and full.max_sequence_length == 40
    for t, text in zip(full.inputs, texts):
        assert t.ids == [CLS, *map(ord, text), SEP] and t.tokens == ["[CLS]", *text, "[SEP]"]
        assert t.special == [True, *[False] * len(text), True]
        assert t.offsets == [(0, 0), *[(k, k + 1) for k in range(len(text))], (0, 0)]
    assert [t.ids for t in bare.inputs] == [list(map(ord, text)) for text in texts]
    assert bare.inputs[0].tokens is None and bare.inputs[0].offsets is None
    assert full.tokens == sum(len(t.ids) for t in full.inputs)


def test_detokenize_keeps_each_calls_inputs_and_token_ids_within_the_limits(peer):
    texts = ["ab", "c" * 12, "f" * 9, "g" * 5, "h" * 20, "ij", "k", "l", "m", "n" * 3]
    with EmbedClient(peer.target) as client:
        ids = client.tokenize(texts, add_special_tokens=False).inputs
        back = client.detokenize([t.ids for t in ids])
        framed = client.detokenize([np.array([CLS, 120, SEP])], skip_special_tokens=False)
        bare = client.detokenize([[CLS, 120, SEP]], skip_special_tokens=True)
        with pytest.raises(InvalidArgument, match="26 token ids"):
            client.detokenize([[65] * 3, [66] * 26])  # a list over the budget is never split: the service says no
    assert back.texts == texts and back.model == "peer"
    assert framed.texts == ["[CLS]x[SEP]"] and bare.texts == ["x"]
    calls = [[len(i.ids) for i in r.inputs] for r in peer.requests["Detokenize"]]
    # at most 25 ids (the first two cut by them) and 4 inputs (the third) per call
    assert calls == [[2, 12, 9], [5, 20], [2, 1, 1, 1], [3], [3], [3], [3], [26]]


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def read_rows(path) -> list[dict]:
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_classify_writes_jsonl_and_parquet_from_either_with_ids_and_pairs(peer, tmp_path, capsys):
    texts = texts_of(11, seed=4)
    rows = [{"doc": f"d{k}", "body": t, **({"other": "pair " * k} if k % 2 else {})} for k, t in enumerate(texts)]
    write_jsonl(tmp_path / "in.jsonl", rows)
    pq.write_table(pa.table({"key": pa.array(range(100, 111), pa.int32()), "body": texts}), tmp_path / "in.parquet")
    common = ["--target", peer.target, "--field", "body", "--no-progress", "--chunk", "4"]
    for source, ids, pairs in (("in.jsonl", "doc", True), ("in.parquet", "key", False)):
        for output in ("out.jsonl", "out.parquet"):
            out = tmp_path / f"{source}.{output}"
            pair = ["--pair-field", "other"] if pairs else []
            argv = ["classify", str(tmp_path / source), str(out), "--id-field", ids, "--top-k", "2", *pair, *common]
            assert main(argv) == 0, capsys.readouterr().err
            got = read_rows(out)
            assert [r["index"] for r in got] == list(range(len(texts)))
            want_ids = [r["doc"] for r in rows] if ids == "doc" else list(range(100, 111))
            assert [r[ids] for r in got] == want_ids
            for r, row in zip(got, rows):
                want = expected(row["body"], row.get("other", "") if pairs else "", top_k=2)
                assert r["labels"] == [label for label, _ in want]
                assert np.allclose(r["scores"], [s for _, s in want], atol=1e-6)
                assert r["tokens"] == tokens_of(row["body"], row.get("other", "") if pairs else "")
    assert pq.read_table(tmp_path / "in.parquet.out.parquet").schema.field("key").type == pa.int32()
    assert all(len(r.inputs) <= 4 for r in peer.requests["Classify"])
    assert not list(tmp_path.glob("*.progress.json")) and not list(tmp_path.glob("*.partial.*"))
    with pytest.raises(SystemExit, match="exists"):  # a finished output is kept
        main(["classify", str(tmp_path / "in.jsonl"), str(tmp_path / "in.jsonl.out.jsonl"), *common])


def test_cli_classify_stops_on_a_failure_and_resumes_where_it_stopped(tmp_path, capsys):
    peer = Peer(refuse_calls={"Classify": {3}})
    texts = texts_of(10, seed=5)
    write_jsonl(tmp_path / "in.jsonl", [{"text": t, "id": k} for k, t in enumerate(texts)])
    out = tmp_path / "out.parquet"
    with scripted_grpc_peer(peer, peer.health) as target:
        argv = ["classify", str(tmp_path / "in.jsonl"), str(out), "--target", target, "--id-field", "id",
                "--raw-scores", "--chunk", "3", "--no-progress"]
        assert main(argv) == 1
        assert "stopped at input 6 of 10" in capsys.readouterr().err
        assert main(argv) == 0
        assert "resuming at input 6 of 10" in capsys.readouterr().err
    got = pq.read_table(out).to_pylist()
    assert [r["id"] for r in got] == list(range(10))
    assert all(r["labels"] == [label for label, _ in expected(t, raw=True)] for r, t in zip(got, texts))
    assert [len(r.inputs) for r in peer.requests["Classify"]] == [3, 3, 3, 3, 1]  # the failed chunk alone redone
    assert not list(tmp_path.glob("out.parquet.*"))


def test_cli_tokenize_and_sparse_write_rows_per_input(peer, tmp_path, capsys):
    texts = texts_of(7, seed=6)
    (tmp_path / "in.txt").write_text("".join(t + "\n" for t in texts))
    common = ["--target", peer.target, "--no-progress", "--chunk", "5"]
    out = tmp_path / "ids.parquet"
    assert main(["tokenize", str(tmp_path / "in.txt"), str(out), "--return-tokens", "--return-offsets",
                 *common]) == 0, capsys.readouterr().err
    got = pq.read_table(out).to_pylist()
    assert [r["ids"] for r in got] == [[CLS, *map(ord, t), SEP] for t in texts]
    assert got[0]["tokens"][0] == "[CLS]" and got[0]["special"][0] and got[0]["starts"][1:3] == [0, 1]
    bare = tmp_path / "ids.jsonl"
    assert main(["tokenize", str(tmp_path / "in.txt"), str(bare), "--no-special-tokens", *common]) == 0
    assert [r["ids"] for r in read_rows(bare)] == [list(map(ord, t)) for t in texts]
    assert set(read_rows(bare)[0]) == {"index", "ids"}
    for output in ("sparse.jsonl", "sparse.parquet"):
        assert main(["sparse", str(tmp_path / "in.txt"), str(tmp_path / output), *common]) == 0
        got = read_rows(tmp_path / output)
        assert [r["indices"] for r in got] == [[len(t), 7] for t in texts] and got[-1]["index"] == 6
    with pytest.raises(SystemExit, match="pairs and ids come from JSONL or Parquet"):
        main(["classify", str(tmp_path / "in.txt"), str(tmp_path / "x.jsonl"), "--id-field", "id", *common])
    with pytest.raises(SystemExit, match="clash"):
        main(["tokenize", str(tmp_path / "in.txt"), str(tmp_path / "x.jsonl"), "--id-field", "ids", *common])
