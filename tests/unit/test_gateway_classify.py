"""The gateway's classification and tokenizer routes in vLLM's and TEI's shapes (vLLM's /v1/classify, TEI's /predict,
/tokenize in both shapes, vLLM's /detokenize, TEI's /decode): each request translated to the service's Classify,
Tokenize or Detokenize and its reply back to the peer's shape, their list fields bounded before they are looked at,
the service's errors as OpenAI's error objects naming the route's own fields, with the API key, body bounds and metrics
of every route. Real uvicorn, real HTTP, a scripted gRPC peer (tests/helpers/classify_peer.py); a huge list against
the gateway as its own process."""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from embedding_client.v1 import embedding_pb2 as pb
from embedding_service.wire.reasons import Reason, ServiceError
from gateway import peer_lists
from tests.helpers.classify_peer import (
    CLS,
    DEFAULT_CLASSIFIER,
    LABELS,
    MAX_SEQUENCE_LENGTH,
    SEP,
    ClassifyPeer,
    ranked,
    scores,
)
from tests.helpers.gateways import gateway_process, running_gateway, scripted_grpc_peer

KEY = "gateway-key"
MAX_INPUTS = 8
MAX_IDS = 20
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def served():
    """(base URL, the peer) of a gateway with an API key, small bounds and no retries, before a ClassifyPeer."""
    peer = ClassifyPeer()
    with scripted_grpc_peer(peer) as target, running_gateway(
            targets=[target], api_keys=[KEY], max_inputs=MAX_INPUTS, coalesce_max_inputs=MAX_INPUTS,
            max_detokenize_token_ids=MAX_IDS, max_json_values=8192, max_body_bytes=64 * 1024, max_retries=0) as base:
        yield base, peer


@pytest.fixture
def peer(served):
    _, scripted = served
    scripted.refusals.clear()
    scripted.max_labels = 100
    return scripted


def post(base: str, path: str, body, key: str | None = KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(base + path, json=body, headers=headers, timeout=30, **kw)


def ok(response: httpx.Response):
    assert response.status_code == 200, response.text
    return response.json()


def refused(response: httpx.Response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


# vLLM's /v1/classify

def test_classify_is_vllms_shape_with_every_labels_score_in_label_id_order(served, peer):
    base, _ = served
    got = ok(post(base, "/v1/classify", {"input": "a short text"}))
    sent: pb.ClassifyRequest = peer.requests[-1]
    assert (sent.model, [i.text for i in sent.inputs], sent.raw_scores, sent.HasField("top_k")) == (
        "", ["a short text"], False, False)
    assert sent.truncation == pb.TRUNCATION_POLICY_REJECT  # vLLM refuses an input over the maximum by default
    assert got["id"].startswith("classify-") and got["object"] == "list" and abs(got["created"] - time.time()) < 60
    assert got["model"] == DEFAULT_CLASSIFIER
    [item] = got["data"]
    assert item == {"index": 0, "label": ranked("a short text")[0][0], "probs": scores("a short text"),
                    "num_classes": len(LABELS)}
    assert got["usage"] == {"prompt_tokens": 12, "total_tokens": 12, "completion_tokens": 0,
                            "prompt_tokens_details": None}


def test_classify_takes_a_list_a_model_raw_logits_and_truncation(served, peer):
    base, _ = served
    texts = ["one", "a second one", "three"]
    got = ok(post(base, "/v1/classify", {"model": "clf", "input": texts, "use_activation": False,
                                         "truncate_prompt_tokens": -1, "user": "u", "priority": 0}))
    sent: pb.ClassifyRequest = peer.requests[-1]
    assert (sent.model, sent.raw_scores, sent.truncation) == ("clf", True, pb.TRUNCATION_POLICY_END)
    assert got["model"] == "clf"
    assert [d["index"] for d in got["data"]] == [0, 1, 2]
    assert [d["probs"] for d in got["data"]] == [scores(t, raw=True) for t in texts]


def test_classify_asks_the_models_labels_once_and_refuses_a_cut_result(served, peer):
    base, _ = served
    ok(post(base, "/v1/classify", {"model": "labels-once", "input": "x"}))
    asked = peer.get_model_calls
    ok(post(base, "/v1/classify", {"model": "labels-once", "input": ["y", "z"]}))
    assert peer.get_model_calls == asked  # known, and every result holds them all
    peer.max_labels = len(LABELS) - 1  # the service's max_labels_per_result below the model's labels
    error = refused(post(base, "/v1/classify", {"model": "labels-once", "input": "x"}))
    assert (error["param"], error["code"]) == ("model", "too_many_labels")
    assert "max_labels_per_result" in error["message"]
    assert peer.get_model_calls == asked + 1  # asked again before refusing


@pytest.mark.parametrize("body, message, param", [
    ({"input": ["a", 3]}, "input[1]: expected a string", "input"),
    ({"input": {"text": "a"}}, "input: expected a string or an array of strings", "input"),
    ({"input": ["a"] * (MAX_INPUTS + 1)}, f"input: {MAX_INPUTS + 1} inputs; at most {MAX_INPUTS} per request",
     "input"),
    ({"input": "a", "truncate_prompt_tokens": 5}, "Input should be -1", "truncate_prompt_tokens"),
    ({"input": "a", "add_special_tokens": False}, "Input should be True", "add_special_tokens"),
    ({"input": "a", "softmax": False}, "Extra inputs are not permitted", None),  # not served: refused, not dropped
    ({"messages": [{"role": "user", "content": "a"}]}, "Field required", "input"),
])
def test_a_wrong_classify_request_is_400_naming_its_field(served, peer, body, message, param):
    base, _ = served
    error = refused(post(base, "/v1/classify", body))
    assert (error["message"], error["param"], error["type"]) == (message, param, "invalid_request_error")


# TEI's /predict

def test_predict_answers_one_input_with_its_labels_highest_first(served, peer):
    base, _ = served
    got = ok(post(base, "/predict", {"inputs": "What is Deep Learning?"}))
    assert got == [{"score": s, "label": label} for label, s in ranked("What is Deep Learning?")]
    sent: pb.ClassifyRequest = peer.requests[-1]
    assert sent.model == "" and sent.truncation == pb.TRUNCATION_POLICY_REJECT  # TEI's default truncate: false
    assert [(i.text, i.text_pair) for i in sent.inputs] == [("What is Deep Learning?", "")]


@pytest.mark.parametrize("inputs, sent", [
    (["premise"], [("premise", "")]),
    (["premise", "hypothesis"], [("premise", "hypothesis")]),  # a pair of strings is one input
])
def test_predict_reads_one_array_of_strings_as_one_text_or_pair(served, peer, inputs, sent):
    base, _ = served
    got = ok(post(base, "/predict", {"inputs": inputs, "raw_scores": True}))
    assert [(i.text, i.text_pair) for i in peer.requests[-1].inputs] == sent
    assert peer.requests[-1].raw_scores
    assert got == [{"score": s, "label": label} for label, s in ranked(*sent[0], raw=True)]


def test_predict_answers_a_batch_with_a_list_per_input(served, peer):
    base, _ = served
    got = ok(post(base, "/predict", {"inputs": [["one"], ["two", "pair"], ["three"]], "truncate": True,
                                     "model": "clf"}))
    sent: pb.ClassifyRequest = peer.requests[-1]
    assert (sent.model, sent.truncation) == ("clf", pb.TRUNCATION_POLICY_END)
    assert [(i.text, i.text_pair) for i in sent.inputs] == [("one", ""), ("two", "pair"), ("three", "")]
    assert got == [[{"score": s, "label": label} for label, s in ranked(t, p)]
                   for t, p in (("one", ""), ("two", "pair"), ("three", ""))]


@pytest.mark.parametrize("truncate, direction, policy", [
    (None, "left", pb.TRUNCATION_POLICY_REJECT),
    (False, "Right", pb.TRUNCATION_POLICY_REJECT),
    (True, "right", pb.TRUNCATION_POLICY_END),
    (True, "Left", pb.TRUNCATION_POLICY_START),  # the service says whether it serves it
])
def test_predict_truncation(served, peer, truncate, direction, policy):
    base, _ = served
    ok(post(base, "/predict", {"inputs": "x", "truncate": truncate, "truncation_direction": direction}))
    assert peer.requests[-1].truncation == policy


PREDICT_INPUTS = f"inputs: {peer_lists.PREDICT_INPUTS}"


@pytest.mark.parametrize("inputs, message", [
    ([], PREDICT_INPUTS),
    (3, PREDICT_INPUTS),
    ({"text": "a"}, PREDICT_INPUTS),
    (["a", "b", "c"], "inputs: expected [text] or [text, text_pair]"),
    (["a", 1], "inputs[1]: expected a string"),
    ([["a"], "b"], "inputs[1]: expected [text] or [text, text_pair]"),
    ([["a"], []], "inputs[1]: expected [text] or [text, text_pair]"),
    ([["a"], ["b", "c", "d"]], "inputs[1]: expected [text] or [text, text_pair]"),
    ([["a"], ["b", None]], "inputs[1][1]: expected a string"),
    ([1, 2], "inputs[0]: expected a string or an array of strings"),
    ([["a"]] * (MAX_INPUTS + 1), f"inputs: {MAX_INPUTS + 1} inputs; at most {MAX_INPUTS} per request"),
])
def test_wrong_predict_inputs_are_400_with_their_first_problem_and_path(served, peer, inputs, message):
    base, _ = served
    error = refused(post(base, "/predict", {"inputs": inputs}))
    assert (error["message"], error["param"]) == (message, "inputs")


# /tokenize: vLLM's and TEI's

def test_tokenize_in_vllms_shape(served, peer):
    base, _ = served
    got = ok(post(base, "/tokenize", {"model": "m", "prompt": "hello big world"}))
    sent: pb.TokenizeRequest = peer.requests[-1]
    assert (sent.model, list(sent.inputs), sent.add_special_tokens, sent.return_tokens) == (
        "m", ["hello big world"], True, False)
    expected = peer.tokenized("hello big world")
    assert got == {"count": 5, "max_model_len": MAX_SEQUENCE_LENGTH, "tokens": list(expected.ids), "token_strs": None}
    plain = ok(post(base, "/tokenize", {"prompt": "hello big world", "add_special_tokens": False,
                                        "return_token_strs": True}))
    assert not peer.requests[-1].add_special_tokens and peer.requests[-1].model == ""
    assert plain["tokens"] == list(expected.ids)[1:-1] and plain["token_strs"] == ["hello", "big", "world"]
    assert plain["count"] == 3


def test_tokenize_in_teis_shape_with_byte_offsets(served, peer):
    base, _ = served
    text = "naïve café 👍 ok"
    [tokens] = ok(post(base, "/tokenize", {"inputs": text}))
    sent: pb.TokenizeRequest = peer.requests[-1]
    assert (sent.model, sent.return_tokens, sent.return_offsets, sent.add_special_tokens) == ("", True, True, True)
    raw = text.encode()
    words = tokens[1:-1]
    assert tokens[0] == {"id": CLS, "text": "[CLS]", "special": True, "start": None, "stop": None}
    assert tokens[-1] == {"id": SEP, "text": "[SEP]", "special": True, "start": None, "stop": None}
    assert [t["text"] for t in words] == ["naïve", "café", "👍", "ok"]
    assert all(raw[t["start"]:t["stop"]].decode() == t["text"] and not t["special"] for t in words)
    assert [t["start"] for t in words] == [0, 7, 13, 18]  # bytes, as TEI's; code points would be 0, 6, 11, 13
    several = ok(post(base, "/tokenize", {"inputs": ["a b", "c"], "add_special_tokens": False, "model": "m"}))
    assert [[t["text"] for t in ts] for ts in several] == [["a", "b"], ["c"]]
    assert peer.requests[-1].model == "m"


NEITHER = 'expected an object with "prompt" (vLLM\'s shape) or "inputs" (TEI\'s), not both'


@pytest.mark.parametrize("body, message, param", [
    ({"prompt": "a", "inputs": "a"}, NEITHER, None),
    ({"text": "a"}, NEITHER, None),
    (["a"], NEITHER, None),
    ({"messages": [{"role": "user", "content": "a"}]},
     "chat messages are not tokenized here: send their text as prompt", "messages"),
    ({"prompt": ["a"]}, "Input should be a valid string", "prompt"),
    ({"inputs": ["a", 2]}, "inputs[1]: expected a string", "inputs"),
    ({"inputs": ["a"] * (MAX_INPUTS + 1)}, f"inputs: {MAX_INPUTS + 1} inputs; at most {MAX_INPUTS} per request",
     "inputs"),
    ({"inputs": "a", "prompt_name": "query"},
     "prompt_name is not served by /tokenize: put the prompt's text before the input", "prompt_name"),
])
def test_a_wrong_tokenize_request_is_400(served, peer, body, message, param):
    base, _ = served
    error = refused(post(base, "/tokenize", body))
    assert (error["message"], error["param"]) == (message, param)


# vLLM's /detokenize, TEI's /decode

def test_detokenize_and_decode_round_trip(served, peer):
    base, _ = served
    ids = ok(post(base, "/tokenize", {"prompt": "round trip words"}))["tokens"]
    assert ok(post(base, "/detokenize", {"tokens": ids})) == {"prompt": "[CLS] round trip words [SEP]"}
    sent: pb.DetokenizeRequest = peer.requests[-1]
    assert (sent.model, [list(s.ids) for s in sent.inputs], sent.skip_special_tokens) == ("", [ids], False)
    assert ok(post(base, "/decode", {"ids": ids})) == ["round trip words"]  # TEI skips special tokens by default
    assert peer.requests[-1].skip_special_tokens
    assert ok(post(base, "/decode", {"ids": [ids, ids[1:2]], "skip_special_tokens": False, "model": "m"})) == [
        "[CLS] round trip words [SEP]", "round"]
    assert peer.requests[-1].model == "m" and not peer.requests[-1].skip_special_tokens
    assert ok(post(base, "/decode", {"ids": []})) == [""]  # one empty sequence, as TEI reads it


@pytest.mark.parametrize("path, body, message, param", [
    ("/detokenize", {"tokens": [1] * (MAX_IDS + 1)}, f"tokens: {MAX_IDS + 1} token ids; at most {MAX_IDS} per request",
     "tokens"),
    ("/detokenize", {"tokens": [1, -2]}, "tokens[1]: token ids must be non-negative 32-bit integers", "tokens"),
    ("/detokenize", {"tokens": [1, True]}, "tokens[1]: expected a token id (an integer)", "tokens"),
    ("/detokenize", {"tokens": "abc"}, "tokens: expected an array of token ids", "tokens"),
    ("/decode", {"ids": [[1] * 15, [2] * 6]}, f"ids: 21 token ids; at most {MAX_IDS} per request", "ids"),
    ("/decode", {"ids": [[1]] * (MAX_INPUTS + 1)}, f"ids: {MAX_INPUTS + 1} inputs; at most {MAX_INPUTS} per request",
     "ids"),
    ("/decode", {"ids": [[1], 2]}, "ids[1]: expected an array of token ids, as ids[0] is", "ids"),
    ("/decode", {"ids": [[1], [2, "x"]]}, "ids[1][1]: expected a token id (an integer)", "ids"),
    ("/decode", {"ids": [1, 2**31]}, "ids[1]: token ids must be non-negative 32-bit integers", "ids"),
    ("/decode", {"ids": ["a"]}, "ids[0]: expected a token id or an array of token ids", "ids"),
])
def test_wrong_token_ids_are_400_with_their_first_problem_and_path(served, peer, path, body, message, param):
    base, _ = served
    error = refused(post(base, path, body))
    assert (error["message"], error["param"]) == (message, param)


# What every route shares: the service's errors, the API key, the body bounds, the metrics

@pytest.mark.parametrize("path, body, field", [
    ("/v1/classify", {"input": ["ok", "too long"]}, "input"),
    ("/predict", {"inputs": [["ok"], ["too long"]]}, "inputs"),
    ("/tokenize", {"prompt": "too long"}, "prompt"),
    ("/tokenize", {"inputs": ["ok", "too long"]}, "inputs"),
    ("/detokenize", {"tokens": [1]}, "tokens"),
    ("/decode", {"ids": [[1], [2]]}, "ids"),
])
def test_the_services_errors_are_openai_errors_naming_the_routes_field(served, peer, path, body, field):
    base, _ = served
    peer.refusals.append(ServiceError(Reason.INPUT_TOO_LONG, "input 1 has 600 tokens", index=1, field="inputs"))
    error = refused(post(base, path, body))
    assert (error["param"], error["code"], error["message"]) == (field, "input_too_long", "input 1 has 600 tokens")
    peer.refusals.append(ServiceError(Reason.WRONG_MODEL_KIND, "an embedding model does not classify"))
    error = refused(post(base, path, body))
    assert (error["param"], error["code"]) == ("model", "wrong_model_kind")
    peer.refusals.append(ServiceError(Reason.MODEL_NOT_FOUND, "no model 'nope'"))
    assert refused(post(base, path, body), 404)["code"] == "model_not_found"
    peer.refusals.append(ServiceError(Reason.OVERLOADED, "busy", retry_after_s=3))
    busy = post(base, path, body)
    assert refused(busy, 429)["code"] == "rate_limit_exceeded" and busy.headers["retry-after"] == "3"


@pytest.mark.parametrize("path", ["/v1/classify", "/predict", "/tokenize", "/detokenize", "/decode"])
def test_every_route_asks_for_the_key_and_bounds_the_body(served, peer, path):
    base, _ = served
    asked = len(peer.requests)
    for key in (None, "wrong"):
        assert refused(post(base, path, {"inputs": "x"}, key=key), 401)["code"] == "invalid_api_key"
    big = refused(httpx.post(base + path, content=b" " * (64 * 1024 + 1),
                             headers={**JSON, "Authorization": f"Bearer {KEY}"}, timeout=30), 413)
    assert big["code"] == "request_too_large"
    not_json = refused(httpx.post(base + path, content=b'{"inputs": ', headers={**JSON, "Authorization":
                                                                               f"Bearer {KEY}"}, timeout=30))
    assert not_json["message"].startswith("Invalid JSON: ")
    assert len(peer.requests) == asked  # nothing reached the service


def test_the_routes_are_counted_by_their_templates_and_documented(served, peer):
    base, _ = served
    ok(post(base, "/predict", {"inputs": "x"}))
    ok(post(base, "/decode", {"ids": [CLS]}))
    refused(post(base, "/tokenize", {}))
    text = httpx.get(base + "/metrics", timeout=10).text
    families = list(text_string_to_metric_families(text))
    routes = {(s.labels["route"], s.labels["status"]) for f in families for s in f.samples
              if s.name == "embedding_gateway_http_requests_total"}
    assert {("/predict", "200"), ("/decode", "200"), ("/tokenize", "400")} <= routes
    calls = {s.labels["method"] for f in families for s in f.samples
             if s.name == "embedding_gateway_upstream_calls_total"}
    assert {"Classify", "Detokenize"} <= calls
    paths = httpx.get(base + "/openapi.json", timeout=10).json()["paths"]
    for path in ("/v1/classify", "/predict", "/tokenize", "/detokenize", "/decode"):
        assert paths[path]["post"]["requestBody"]["required"], path


def test_a_huge_list_is_refused_quickly_by_the_gateway_process():
    """Lists far past their bounds, as the gateway runs in production: refused by their JSON values' count before
    the parse, or parsed and refused by their length before any item is looked at."""
    peer = ClassifyPeer()
    floods = {
        "/predict": b'{"inputs": [' + b",".join([b'["x"]'] * 300_000) + b"]}",  # 600,001 values: not parsed
        "/v1/classify": b'{"input": [' + b",".join([b'"x"'] * 400_000) + b"]}",  # parsed, then bounded
        "/decode": b'{"ids": [' + b",".join([b"7"] * 500_000) + b"]}",
        "/tokenize": b'{"inputs": [' + b",".join([b'"x"'] * 400_000) + b"]}",
    }
    with scripted_grpc_peer(peer, health=peer.health) as target, gateway_process("--targets", target) as (base, _), \
            httpx.Client(base_url=base, timeout=60) as client:
        assert client.post("/predict", json={"inputs": [1]}).status_code == 400  # warmed up
        for path, flood in floods.items():
            start = time.perf_counter()
            answer = client.post(path, content=flood, headers=JSON)
            took = time.perf_counter() - start
            assert answer.status_code == 400, (path, answer.text)
            assert took < 0.25, f"{path}: {took * 1000:.0f} ms"
            message = answer.json()["error"]["message"]
            assert "JSON values" in message or "per request" in message, (path, message)
    assert peer.requests == []


def test_the_detokenize_bound_is_a_setting_with_a_flag_and_the_services_default():
    from embedding_service.config import Limits
    from gateway.main import parse_args
    from gateway.settings import GatewaySettings

    assert GatewaySettings().max_detokenize_token_ids == Limits().max_token_ids_per_detokenize
    assert parse_args(["--max-detokenize-token-ids", "9"]).max_detokenize_token_ids == 9
