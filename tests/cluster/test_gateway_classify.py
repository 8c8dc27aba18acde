"""The gateway's classification and tokenizer routes against the real service: vLLM's /v1/classify and TEI's /predict
equal to transformers' own text-classification pipeline on the tiny classifier (raw scores to its logits), /tokenize in
vLLM's and TEI's shapes equal to all-MiniLM-L6-v2's own tokenizer, vLLM's /detokenize and TEI's /decode round trips,
with the embeddings route's auth, errors and metrics."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from embedding_client.v1 import embedding_pb2 as pb
from tests.helpers.classifiers import CLASSIFIER, CLASSIFIER_LABELS, CLASSIFIER_MAX_SEQ, pipeline_label_scores
from tests.helpers.gateways import running_gateway
from tests.helpers.models import MINILM

KEY = "gateway-key"
TEXTS = ["the match went to extra time", "parliament passed the budget", "a new comet was seen tonight",
         "rain all weekend"]
PAIR = ("the team won the cup", "sports news")
LONG = "word " * (3 * CLASSIFIER_MAX_SEQ)  # past the classifier's maximum
MIXED = "Ünïcode ça va? 東京 ok, naïve café"  # offsets in code points and bytes differ


@pytest.fixture(scope="module")
def gateway(service):
    with running_gateway(targets=[service.target], api_keys=[KEY]) as base:
        yield base


def _post(base: str, path: str, body, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(base + path, json=body, headers=headers, timeout=60)


def _ok(response: httpx.Response):
    assert response.status_code == 200, response.text
    return response.json()


def logits(text_classifier, texts: list[str]) -> list[list[float]]:
    """The model's own logits, in label-id order."""
    import torch

    features = text_classifier.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return text_classifier.model(**features).logits.tolist()


def _close(got: list[float], expected: list[float]) -> bool:
    return len(got) == len(expected) and max(abs(a - b) for a, b in zip(got, expected)) < 1e-5


def test_vllms_classify_equals_transformers_pipeline(gateway, text_classifier):
    got = _ok(_post(gateway, "/v1/classify", {"model": CLASSIFIER, "input": TEXTS}))
    assert got["model"] == CLASSIFIER and got["object"] == "list" and got["id"].startswith("classify-")
    for item, expected in zip(got["data"], pipeline_label_scores(text_classifier, TEXTS), strict=True):
        assert item["num_classes"] == len(CLASSIFIER_LABELS)
        assert _close(item["probs"], [expected[label] for label in CLASSIFIER_LABELS])  # label-id order
        assert item["label"] == max(expected, key=expected.get)
    assert [item["index"] for item in got["data"]] == list(range(len(TEXTS)))
    assert got["usage"]["prompt_tokens"] == got["usage"]["total_tokens"] > 0
    raw = _ok(_post(gateway, "/v1/classify", {"input": TEXTS, "use_activation": False}))  # the default classifier
    assert raw["model"] == CLASSIFIER
    for item, expected in zip(raw["data"], logits(text_classifier, TEXTS), strict=True):
        assert _close(item["probs"], expected)


def test_teis_predict_equals_transformers_pipeline(gateway, text_classifier):
    expected = pipeline_label_scores(text_classifier, [TEXTS[0], PAIR, *TEXTS[1:], LONG])

    def ranked(scores: dict[str, float]) -> list[str]:
        return sorted(scores, key=lambda label: -scores[label])

    one = _ok(_post(gateway, "/predict", {"inputs": TEXTS[0]}))  # the default classifier
    assert [p["label"] for p in one] == ranked(expected[0])
    assert _close([p["score"] for p in one], [expected[0][p["label"]] for p in one])
    pair = _ok(_post(gateway, "/predict", {"inputs": list(PAIR), "model": CLASSIFIER}))
    assert [p["label"] for p in pair] == ranked(expected[1])
    assert _close([p["score"] for p in pair], [expected[1][p["label"]] for p in pair])
    batch = _ok(_post(gateway, "/predict", {"inputs": [[t] for t in TEXTS[1:]] + [[LONG]], "truncate": True}))
    for predictions, scores in zip(batch, expected[2:], strict=True):
        assert [p["label"] for p in predictions] == ranked(scores)
        assert _close([p["score"] for p in predictions], [scores[p["label"]] for p in predictions])
    raw = _ok(_post(gateway, "/predict", {"inputs": [[t] for t in TEXTS], "raw_scores": True}))
    for predictions, row in zip(raw, logits(text_classifier, TEXTS), strict=True):  # every label, highest first
        assert [p["label"] for p in predictions] == ranked(dict(zip(CLASSIFIER_LABELS, row, strict=True)))
        assert _close([p["score"] for p in predictions], [row[CLASSIFIER_LABELS.index(p["label"])]
                                                          for p in predictions])


def test_vllms_tokenize_equals_the_models_tokenizer(gateway, service, minilm_tokenizer):
    max_len = service.stub.GetModel(pb.GetModelRequest(name=MINILM), timeout=30).model.max_sequence_length
    ids = minilm_tokenizer(MIXED)["input_ids"]
    got = _ok(_post(gateway, "/tokenize", {"model": MINILM, "prompt": MIXED, "return_token_strs": True}))
    assert got == {"count": len(ids), "max_model_len": max_len, "tokens": ids,
                   "token_strs": minilm_tokenizer.convert_ids_to_tokens(ids)}
    bare = _ok(_post(gateway, "/tokenize", {"prompt": MIXED, "add_special_tokens": False}))  # the default model
    assert bare["tokens"] == minilm_tokenizer(MIXED, add_special_tokens=False)["input_ids"]
    assert bare["token_strs"] is None


def test_teis_tokenize_equals_the_models_tokenizer_with_byte_offsets(gateway, minilm_tokenizer):
    texts = [MIXED, TEXTS[0]]
    reference = minilm_tokenizer(texts, return_offsets_mapping=True, return_special_tokens_mask=True)
    got = _ok(_post(gateway, "/tokenize", {"inputs": texts, "model": MINILM}))
    for text, tokens, ids, offsets, special in zip(texts, got, reference["input_ids"], reference["offset_mapping"],
                                                   reference["special_tokens_mask"], strict=True):
        assert [t["id"] for t in tokens] == ids
        assert [int(t["special"]) for t in tokens] == special
        for token, (start, end), is_special in zip(tokens, offsets, special, strict=True):
            if is_special:
                assert (token["start"], token["stop"]) == (None, None)
                assert token["text"] == minilm_tokenizer.convert_ids_to_tokens(token["id"])
            else:
                assert token["text"] == text[start:end]
                assert (token["start"], token["stop"]) == (len(text[:start].encode()), len(text[:end].encode()))


def test_detokenize_and_decode_round_trip(gateway, minilm_tokenizer):
    ids = minilm_tokenizer(MIXED)["input_ids"]
    assert _ok(_post(gateway, "/detokenize", {"model": MINILM, "tokens": ids})) == {
        "prompt": minilm_tokenizer.decode(ids)}
    assert _ok(_post(gateway, "/decode", {"ids": ids})) == [minilm_tokenizer.decode(ids, skip_special_tokens=True)]
    others = minilm_tokenizer(TEXTS)["input_ids"]
    decoded = _ok(_post(gateway, "/decode", {"ids": others, "model": MINILM}))
    assert decoded == [minilm_tokenizer.decode(i, skip_special_tokens=True) for i in others]
    again = _ok(_post(gateway, "/tokenize", {"inputs": decoded}))
    assert [[t["id"] for t in tokens] for tokens in again] == others  # the texts decoded tokenize to the same ids


def test_errors_are_openai_error_objects_naming_the_routes_fields(gateway, minilm_tokenizer):
    assert _post(gateway, "/predict", {"inputs": "x"}, key=None).status_code == 401
    cases = {
        "an embedding model classifying": ("/v1/classify", {"model": MINILM, "input": "x"}, 400, "model",
                                           "wrong_model_kind"),
        "an unknown model": ("/predict", {"model": "nope", "inputs": "x"}, 404, "model", "model_not_found"),
        "vLLM's default refuses a long input": ("/v1/classify", {"model": CLASSIFIER, "input": ["x", LONG]}, 400,
                                                "input", "input_too_long"),
        "TEI's default refuses a long input": ("/predict", {"inputs": [["x"], [LONG]]}, 400, "inputs",
                                               "input_too_long"),
        "an empty text": ("/tokenize", {"prompt": "", "model": MINILM}, 400, "prompt", None),
        "a token id past the vocabulary": ("/detokenize", {"tokens": [101, minilm_tokenizer.vocab_size]}, 400,
                                           "tokens", "token_id_out_of_range"),
        "too many ids": ("/decode", {"ids": [1] * 65_537}, 400, "ids", None),
    }
    for name, (path, body, status, param, code) in cases.items():
        reply = _post(gateway, path, body)
        assert reply.status_code == status, (name, reply.text)
        error = reply.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param, (name, error)
        if code is not None:
            assert error["code"] == code, (name, error)


def test_the_routes_are_counted_by_their_templates(gateway):
    _post(gateway, "/v1/classify", {"input": "x"})
    _post(gateway, "/tokenize", {"inputs": "x"})
    text = httpx.get(gateway + "/metrics", timeout=10).text
    families = list(text_string_to_metric_families(text))
    routes = {(s.labels["route"], s.labels["status"]) for f in families for s in f.samples
              if s.name == "embedding_gateway_http_requests_total"}
    assert {("/v1/classify", "200"), ("/tokenize", "200")} <= routes
    calls = {(s.labels["method"], s.labels["code"]) for f in families for s in f.samples
             if s.name == "embedding_gateway_upstream_calls_total"}
    assert {("Classify", "OK"), ("Tokenize", "OK"), ("GetModel", "OK")} <= calls
