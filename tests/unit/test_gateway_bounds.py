"""The gateway's bounds on what one request body may cost it: a flood of small JSON values is refused quickly, in
little memory, while other callers are served (the gateway as its own process, as in production); each list field
told apart by its JSON type and bounded, its first problem alone reported with its path (gateway/bounded_lists.py);
values counted before the parse (gateway/json_body.py); the bytes of bodies held at once (gateway/body_budget.py).
Real uvicorn, real HTTP, scripted gRPC peers."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from embedding_client.v1 import embedding_pb2 as pb
from gateway.body_budget import BodyBudget
from gateway.json_body import values_over
from tests.helpers.gateways import ScriptedPeer, gateway_process, post, running_gateway, scripted_grpc_peer

JSON = {"content-type": "application/json"}
MB = 1024 * 1024


def floats(n: int) -> bytes:
    """An embeddings body whose input is `n` floats: neither strings nor token ids."""
    return b'{"model": "m", "input": [' + b",".join([b"0.1"] * n) + b"]}"


def peak_rss(pid: int) -> int:
    """The process's resident memory at its highest since reset_peak (the kernel's VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def timed_post(client: httpx.Client, content: bytes) -> tuple[httpx.Response, float]:
    start = time.perf_counter()
    response = client.post("/v1/embeddings", content=content, headers=JSON)
    return response, time.perf_counter() - start


def test_a_flood_of_floats_is_a_quick_400_in_little_memory_while_others_are_served():
    """900,000 floats (3.6 MB) once made 900,001 validation errors: seconds of the event loop, gigabytes, every
    other caller held up. Now: refused by their count before the parse; 500,000 (under the count's bound) parse
    and are refused by the first item's type."""
    flood, under_the_count = floats(900_000), floats(500_000)
    peer = ScriptedPeer()
    with scripted_grpc_peer(peer, health=peer.health) as target, gateway_process("--targets", target) as (base, proc):
        gateway = psutil.Process(proc.pid)
        with httpx.Client(base_url=base, timeout=60) as client:
            warm_up, _ = timed_post(client, b'{"model": "m", "input": [0.1]}')
            assert warm_up.status_code == 400
            before = gateway.memory_info().rss
            reset_peak(proc.pid)

            refused, took = timed_post(client, flood)
            assert refused.status_code == 400, refused.text
            assert took < 0.1, f"{took * 1000:.0f} ms"
            assert refused.json()["error"]["type"] == "invalid_request_error"
            assert "more than 524288 JSON values (900005 counted" in refused.json()["error"]["message"]

            parsed, took = timed_post(client, under_the_count)
            assert parsed.status_code == 400, parsed.text
            assert took < 0.1, f"{took * 1000:.0f} ms"
            assert parsed.json()["error"]["message"] == "input[0]: expected a string or token ids"
            assert parsed.json()["error"]["param"] == "input"

        flooded = []

        def flood_thrice() -> None:
            with httpx.Client(base_url=base, timeout=60) as own:
                for _ in range(3):
                    flooded.append(own.post("/v1/embeddings", content=flood, headers=JSON).status_code)

        floods = [threading.Thread(target=flood_thrice) for _ in range(4)]
        for thread in floods:
            thread.start()
        waits = []
        with httpx.Client(base_url=base, timeout=60) as other:
            while any(thread.is_alive() for thread in floods) or len(waits) < 4:
                for body, status in ((b'{"model": "m", "input": "x"}', 200), (b'{"model": "m", "input": [1.5]}', 400)):
                    answer, took = timed_post(other, body)
                    assert answer.status_code == status, answer.text
                    waits.append(took)
        for thread in floods:
            thread.join()
        after, peak = gateway.memory_info().rss, peak_rss(proc.pid)
    assert flooded == [400] * 12
    assert max(waits) < 0.25, f"another caller waited {max(waits) * 1000:.0f} ms"
    assert after - before < 50 * MB, f"resident memory {before / MB:.0f} -> {after / MB:.0f} MiB"
    assert peak - before < 50 * MB, f"resident memory {before / MB:.0f} MiB, {peak / MB:.0f} MiB at its peak"


class Recording(ScriptedPeer):
    """ScriptedPeer that also answers Rerank and EmbedSparse, keeping every request it got."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list = []

    def Embed(self, request, context):
        self.requests.append(request)
        return super().Embed(request, context)

    def Rerank(self, request, context):
        self.requests.append(request)
        return pb.RerankResponse(model="r", results=[pb.RerankResult(index=i, score=0.5)
                                                     for i in range(len(request.documents))])

    def EmbedSparse(self, request, context):
        self.requests.append(request)
        return pb.EmbedSparseResponse(model="s", embeddings=[pb.SparseEmbedding(index=i)
                                                             for i in range(len(request.inputs))])


@pytest.fixture(scope="module")
def recorded():
    """(base URL, the peer) of a gateway with max_token_ids 10 and max_json_values 8,192 in front of a Recording
    peer."""
    peer = Recording()
    with scripted_grpc_peer(peer) as target, running_gateway(targets=[target], max_token_ids=10,
                                                             max_json_values=8192) as base:
        yield base, peer


def _error(response: httpx.Response) -> tuple[str, str | None]:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and set(error) == {"message", "type", "param", "code"}
    return error["message"], error["param"]


def _text(item: pb.EmbedInput) -> object:
    return item.text if item.WhichOneof("kind") == "text" else list(item.token_ids.ids)


@pytest.mark.parametrize("given, sent", [
    ("one", ["one"]),
    (["a", "b"], ["a", "b"]),
    ([101, 7, 102], [[101, 7, 102]]),  # one input as token ids
    ([[101, 7], [5]], [[101, 7], [5]]),
    ([1] * 10, [[1] * 10]),  # at the token ids' bound
])
def test_each_form_of_input_is_told_apart_by_its_json_type(recorded, given, sent):
    base, peer = recorded
    assert post(base, {"model": "m", "input": given}).status_code == 200
    assert [_text(i) for i in peer.requests[-1].inputs] == sent


NO_INPUT = "input: expected a string, an array of strings, an array of token ids or an array of arrays of token ids"


@pytest.mark.parametrize("given, message", [
    ({"a": 1}, NO_INPUT),
    (None, NO_INPUT),
    ([0.1, 0.2], "input[0]: expected a string or token ids"),
    ([True, 1], "input[0]: expected a string or token ids"),  # JSON's true is no token id
    ([{"text": "x"}], "input[0]: expected a string or token ids"),
    (["a", "b", "c", 1, 2.5, None], "input[3]: expected a string, as input[0] is"),  # the first problem alone
    ([1, 2, "three", 4.0], "input[2]: expected a token id (an integer)"),
    ([1, True], "input[1]: expected a token id (an integer)"),
    ([1, -5], "input[1]: token ids must be non-negative 32-bit integers"),
    ([1, 2**31], "input[1]: token ids must be non-negative 32-bit integers"),
    ([1, 2**80], "input[1]: token ids must be non-negative 32-bit integers"),
    ([[1], 2], "input[1]: expected an array of token ids, as input[0] is"),
    ([[1], ["a"]], "input[1][0]: expected a token id (an integer)"),
    ([[1], [2, -1]], "input[1][1]: token ids must be non-negative 32-bit integers"),
    (["x"] * 2049, "input: 2049 inputs; at most 2048 per request"),
    ([[1]] * 2049, "input: 2049 inputs; at most 2048 per request"),
    ([1] * 11, "input: 11 token ids; at most 10 per input"),
    ([[1], [1] * 11], "input[1]: 11 token ids; at most 10 per input"),
])
def test_a_wrong_input_is_400_with_its_first_problem_and_its_path(recorded, given, message):
    base, _ = recorded
    assert _error(post(base, {"model": "m", "input": given})) == (message, "input")


def test_the_first_problem_of_the_body_alone_is_reported(recorded):
    base, _ = recorded
    # `input` comes first in the schema: its first problem, none of the model's or the rest of the list's.
    assert _error(post(base, {"model": 3, "input": ["a", 1, 2, 3]})) == ("input[1]: expected a string, as input[0] is",
                                                                         "input")
    assert _error(post(base, {"model": 3, "input": "x"}))[1] == "model"


def test_rerank_documents_are_strings_or_objects_with_a_text(recorded):
    base, peer = recorded
    body = {"query": "q", "documents": ["a", {"text": "b", "title": "ignored"}]}
    assert httpx.post(f"{base}/v2/rerank", json=body, timeout=30).status_code == 200
    assert list(peer.requests[-1].documents) == ["a", "b"]
    for documents, message in [
        ("abc", 'documents: expected an array of strings or of objects with a string "text"'),
        (["a", 3, None], 'documents[1]: expected a string or an object with a string "text"'),
        (["a", {"text": 3}], 'documents[1]: expected a string or an object with a string "text"'),
        ([{"title": "t"}], 'documents[0]: expected a string or an object with a string "text"'),
        (["d"] * 1001, "documents: 1001 documents; at most 1000 per request"),
    ]:
        reply = httpx.post(f"{base}/v1/rerank", json={"query": "q", "documents": documents}, timeout=30)
        assert _error(reply) == (message, "documents")


def test_sparse_input_is_a_string_or_strings(recorded):
    base, peer = recorded
    for given, sent in (("x", ["x"]), (["x", "y"], ["x", "y"])):
        assert httpx.post(f"{base}/v1/embeddings/sparse", json={"input": given}, timeout=30).status_code == 200
        assert list(peer.requests[-1].inputs) == sent
    for given, message in [
        (["x", 1], "input[1]: expected a string"),
        ([[1]], "input[0]: expected a string"),
        ({"text": "x"}, "input: expected a string or an array of strings"),
        (["x"] * 2049, "input: 2049 inputs; at most 2048 per request"),
    ]:
        reply = httpx.post(f"{base}/v1/embeddings/sparse", json={"input": given}, timeout=30)
        assert _error(reply) == (message, "input")


def test_values_are_counted_before_the_parse_and_strings_full_of_commas_are_no_values(recorded):
    base, peer = recorded
    message, param = _error(post(base, {"model": "m", "input": [[1]] * 4100}))  # 8,205 values: over 8,192
    assert "more than 8192 JSON values (8205 counted; max_json_values)" in message and param is None
    text = "a, b: [c], {d}, \\\"e\\\", " * 2000  # 14,000 commas, colons and brackets in one string
    assert post(base, {"model": "m", "input": [text]}).status_code == 200
    assert peer.requests[-1].inputs[0].text == text
    assert _error(httpx.post(f"{base}/v1/embeddings", content=b'{"model": "m", "input": ["x"', timeout=30))[0] \
        .startswith("Invalid JSON: ")


@pytest.mark.parametrize("body, values", [
    (b'{"a": [1, 2, {"b": null}], "c": "x"}', 10),
    (b'"a,b:c[d{e"', 1),
    (b'["\\\\", "a\\"b,c", ","]', 4),  # an escaped backslash before a closing quote, an escaped quote inside
    (b"[[],[],[]]", 7),  # an empty array counts one more
])
def test_values_are_counted_exactly_but_for_empty_arrays(body, values):
    assert values_over(body, values - 1) == values
    assert values_over(body, values) is None


@pytest.mark.parametrize("body, over", [
    (b'["' + b'\\",' * 2_000_000 + b'"]', False),  # one string of 2,000,000 escaped quotes and commas
    (b"[" + b'"",' * 1_000_000 + b'""]', True),
    (floats(1_000_000), True),
])
def test_counting_takes_one_pass_or_two_however_the_body_is_made(body, over):
    start = time.perf_counter()
    assert (values_over(body, 2**19) is not None) == over
    assert time.perf_counter() - start < 1.0  # 8 MB at most: tens of ms; a regex that backtracks takes minutes


def test_the_budget_refuses_what_does_not_fit_and_a_body_over_it_is_read_alone():
    budget = BodyBudget(100)
    first, second = budget.holder(), budget.holder()
    assert first.take(60) and not second.take(41) and second.take(40)
    assert not budget.fits(1)
    first.give_back()
    assert budget.held == 40 and budget.fits(60) and not budget.fits(61)
    second.give_back()
    alone = budget.holder()
    assert budget.fits(1000) and alone.take(1000) and alone.take(10)  # over the whole budget, while no other holds
    assert not budget.holder().take(1) and not budget.fits(1)
    assert budget.holder().take(0) and budget.fits(0)  # an empty body, or a body's last empty message, always fits
    alone.give_back()
    assert budget.held == 0


def _hold_open(base: str, declared: int, sent: int) -> socket.socket:
    """A connection whose request declares `declared` body bytes and has sent `sent` of them."""
    host, port = base.removeprefix("http://").split(":")
    raw = socket.create_connection((host, int(port)))
    raw.sendall(f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {declared}\r\n\r\n".encode() + b" " * sent)
    return raw


def test_bodies_held_at_once_are_bounded_and_given_back_once_answered():
    budget = 64 * 1024
    peer = ScriptedPeer()
    with scripted_grpc_peer(peer) as target, running_gateway(targets=[target], max_body_bytes_in_flight=budget) as base:
        big = {"model": "m", "input": ["y" * 1000] * 30}  # ~30 KB
        assert post(base, big).status_code == 200
        held = _hold_open(base, declared=60_000, sent=50_000)
        try:
            time.sleep(0.5)  # its 50,000 bytes read and held
            refused = post(base, big)
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "rate_limit_exceeded"
            assert "max_body_bytes_in_flight" in refused.json()["error"]["message"]

            def chunks():  # no Content-Length: refused once its chunks pass what is left
                for _ in range(40):
                    yield b" " * 1024

            for path in ("/v1/embeddings", "/v1/embeddings/sparse"):  # the hot path, and a FastAPI route
                chunked = httpx.post(f"{base}{path}", content=chunks(), timeout=30)
                assert chunked.status_code == 429, (path, chunked.text)
            rerank = httpx.post(f"{base}/v2/rerank", json={"query": "q", "documents": big["input"]}, timeout=30)
            assert rerank.status_code == 429, rerank.text
            assert post(base, {"model": "m", "input": "small"}).status_code == 200  # what fits is served
        finally:
            held.close()  # the caller leaves: its bytes are given back
        time.sleep(0.5)
        assert post(base, big).status_code == 200
        alone = {"model": "m", "input": ["z" * 1000] * 100}  # ~100 KB: over the whole budget, read while alone
        assert post(base, alone).status_code == 200


def test_the_bounds_are_settings_with_flags_and_the_services_defaults():
    from embedding_service.config import Limits
    from gateway.main import parse_args
    from gateway.settings import GatewaySettings

    defaults, limits = GatewaySettings(), Limits()
    assert (defaults.max_inputs, defaults.max_token_ids, defaults.max_documents, defaults.max_body_bytes) == (
        limits.max_inputs_per_request, limits.max_token_ids_per_input, limits.max_documents_per_rerank,
        limits.max_request_bytes)
    assert defaults.max_json_values == 2**19 > 300_000  # OpenAI's own bound on tokens per request
    assert defaults.max_body_bytes_in_flight == 2 * defaults.max_body_bytes
    parsed = parse_args(["--max-token-ids", "7", "--max-documents", "8", "--max-json-values", "2048",
                         "--max-body-bytes-in-flight", "4096"])
    assert (parsed.max_token_ids, parsed.max_documents, parsed.max_json_values, parsed.max_body_bytes_in_flight) == (
        7, 8, 2048, 4096)
