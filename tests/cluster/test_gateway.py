"""The OpenAI gateway: the official openai SDK against real HTTP, a real gateway and the session's service."""

from __future__ import annotations

import base64
import json
import signal
import threading
import time

import httpx
import numpy as np
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embedding_client.v1 import embedding_pb2 as pb
from tests.helpers.classifiers import CLASSIFIER
from tests.helpers.gateways import gateway_process, post, readiness, running_gateway
from tests.helpers.models import MINILM, RERANKER, SPLADE, TINY
from tests.helpers.ports import free_port
from tests.helpers.session import REFUSING
from tests.helpers.texts import make_texts, text_inputs, vectors_of

KEY = "test-key"
BODY_LIMIT = 1024 * 1024
TOL = 1e-5


@pytest.fixture(scope="module")
def gateway(service):
    with running_gateway(targets=[service.target], api_keys=[KEY], max_body_bytes=BODY_LIMIT) as base:
        yield base


@pytest.fixture(scope="module")
def client(gateway):
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key=KEY, max_retries=0, timeout=120)


def test_float_and_base64_equal_grpc_and_sentence_transformers(gateway, client, service, reference_models):
    texts = make_texts(300, seed=31)
    as_float = client.embeddings.create(model=MINILM, input=texts, encoding_format="float")
    via_grpc = vectors_of(service.stub.Embed(pb.EmbedRequest(inputs=text_inputs(texts))))
    expected = reference_models[MINILM].encode(texts, normalize_embeddings=True)

    assert as_float.object == "list" and as_float.model == MINILM
    assert [d.index for d in as_float.data] == list(range(len(texts)))
    assert all(d.object == "embedding" for d in as_float.data)
    floats = np.array([d.embedding for d in as_float.data], dtype=np.float32)
    assert np.abs(floats - expected).max() < TOL
    assert np.abs(floats - via_grpc).max() < TOL

    tokens = sum(len(i) for i in reference_models[MINILM].tokenizer(texts, truncation=True, max_length=256)["input_ids"])
    assert as_float.usage.prompt_tokens == tokens == as_float.usage.total_tokens

    # The SDK asks for base64 by default and decodes it itself.
    default = client.embeddings.create(model=MINILM, input=texts)
    assert np.abs(np.array([d.embedding for d in default.data], dtype=np.float32) - expected).max() < TOL

    raw = post(gateway, {"model": MINILM, "input": texts[:3], "encoding_format": "base64"}, {"Authorization": f"Bearer {KEY}"})
    assert raw.status_code == 200
    decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in raw.json()["data"]])
    assert np.abs(decoded - expected[:3]).max() < TOL


def test_dimensions_and_single_string(client, reference_models):
    response = client.embeddings.create(model=MINILM, input="one sentence", dimensions=64, encoding_format="float")
    expected = reference_models[MINILM].encode(["one sentence"], truncate_dim=64, normalize_embeddings=True)
    assert len(response.data) == 1 and len(response.data[0].embedding) == 64
    assert np.abs(np.array(response.data[0].embedding) - expected[0]).max() < TOL


def test_token_id_inputs(client, reference_models):
    texts = ["token ids go in", "and come out as vectors"]
    ids = reference_models[MINILM].tokenizer(texts, add_special_tokens=False)["input_ids"]
    expected = reference_models[MINILM].encode(texts, normalize_embeddings=True)
    many = client.embeddings.create(model=MINILM, input=ids, encoding_format="float")
    one = client.embeddings.create(model=MINILM, input=ids[0], encoding_format="float")
    assert np.abs(np.array([d.embedding for d in many.data]) - expected).max() < TOL
    assert np.abs(np.array(one.data[0].embedding) - expected[0]).max() < TOL


def test_list_and_retrieve_models(client):
    listed = client.models.list()
    assert {m.id for m in listed.data} == {MINILM, TINY, REFUSING, RERANKER, SPLADE, CLASSIFIER}  # every kind, as OpenAI lists
    assert all(m.object == "model" for m in listed.data)
    assert client.models.retrieve(TINY).id == TINY


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": "x", "dimensions": 0}, "dimensions"),
        ({"input": "x", "dimensions": 999}, "dimensions"),
        ({"input": [[1, -5]]}, "input"),
        ({"input": [[30522]]}, "input"),
        ({"input": ["x"] * 2049}, "input"),
    ],
)
def test_bad_requests_are_400_with_param(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=MINILM, encoding_format="float", **kwargs)
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == param
    assert caught.value.body["type"] == "invalid_request_error"


def test_wrong_or_missing_key_is_401(gateway):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{gateway}/v1", api_key="wrong", max_retries=0).embeddings.create(model=MINILM, input="x")
    assert post(gateway, {"model": MINILM, "input": "x"}).status_code == 401


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.embeddings.create(model="no-such-model", input="x")
    assert caught.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_body_over_the_bound_is_413(client):
    with pytest.raises(openai.APIStatusError) as caught:
        client.embeddings.create(model=MINILM, input=["y" * 1000] * 1100)
    assert caught.value.status_code == 413


def test_malformed_bodies_are_400_never_422(gateway):
    headers = {"Authorization": f"Bearer {KEY}"}
    for body in [{"input": "x"}, {"model": MINILM}, {"model": MINILM, "input": [1.5]}, {"model": 3, "input": "x"},
                 {"model": MINILM, "input": "x", "encoding_format": "int8"}, [1, 2], "text"]:
        r = post(gateway, body, headers)
        assert r.status_code == 400, (body, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(f"{gateway}/v1/embeddings", content=b"{not json", headers=headers)
    assert r.status_code == 400


def test_second_target_serves_when_the_first_is_down(service):
    dead = f"127.0.0.1:{free_port()}"
    with running_gateway(targets=[dead, service.target], max_retries=2, backoff_initial_s=0.01) as base:
        for _ in range(4):
            r = post(base, {"model": MINILM, "input": "spread me", "encoding_format": "float"})
            assert r.status_code == 200, r.text


def test_deadline_is_504(service):
    with running_gateway(targets=[service.target], call_timeout_s=0.001, request_timeout_s=0.001) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError) as caught:
            client.embeddings.create(model=MINILM, input=make_texts(500, seed=2), encoding_format="float")
    assert caught.value.status_code == 504
    assert caught.value.body["type"] == "timeout"


def test_readiness_follows_grpc_health_and_openapi_is_served(gateway):
    assert httpx.get(f"{gateway}/readyz").status_code == 200
    assert httpx.get(f"{gateway}/healthz").json() == {"status": "ok"}
    spec = httpx.get(f"{gateway}/openapi.json").json()
    assert {"/v1/embeddings", "/v1/models", "/v1/models/{model}"} <= set(spec["paths"])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
near_valid = st.fixed_dictionaries(
    {"model": st.sampled_from([MINILM, TINY, "", "nope"]) | json_values},
    optional={
        "input": st.text(max_size=30) | st.lists(st.text(max_size=10), max_size=3)
        | st.lists(st.integers(-5, 40000), max_size=4) | st.lists(st.lists(st.integers(-5, 40000), max_size=3), max_size=3)
        | json_values,
        "encoding_format": st.sampled_from(["float", "base64", "int8"]) | json_values,
        "dimensions": st.integers(-3, 500) | json_values,
        "user": json_values,
    },
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=near_valid | json_values)
def test_fuzzed_bodies_never_get_a_5xx(gateway, body):
    r = httpx.post(f"{gateway}/v1/embeddings", content=json.dumps(body), headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code < 500, (body, r.status_code, r.text)
    if r.status_code != 200:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_an_idle_connection_outlives_uvicorns_default_keep_alive(service):
    """A load balancer reuses idle connections for up to its own timeout: the gateway keeps them longer."""
    import http.client
    from urllib.parse import urlsplit

    with gateway_process("--targets", service.target, "--keep-alive-s", "30") as (base, _):
        url = urlsplit(base)
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
        conn.request("GET", "/healthz")
        assert conn.getresponse().read() == b'{"status":"ok"}'
        sock = conn.sock
        time.sleep(6.5)  # past uvicorn's default of 5 s
        conn.request("GET", "/healthz")  # on the same connection: RemoteDisconnected had the gateway closed it
        assert conn.getresponse().read() == b'{"status":"ok"}' and conn.sock is sock
        conn.close()


def test_run_command_starts_the_gateway_as_its_own_process(service, reference_models):
    from embedding_service.ops import launcher

    port = free_port()
    process = launcher.start_gateway(service.config, service.target, port)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, "the gateway process exited"
            assert time.monotonic() < deadline, "the gateway never became ready"
            time.sleep(0.3)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused-on-loopback", max_retries=0)
        response = client.embeddings.create(model=MINILM, input=["a separate process"], encoding_format="float")
        expected = reference_models[MINILM].encode(["a separate process"], normalize_embeddings=True)
        assert np.abs(np.array(response.data[0].embedding) - expected[0]).max() < TOL
    finally:
        process.terminate()
        assert process.wait(timeout=30) is not None


def test_sigterm_turns_readiness_off_first_and_lets_requests_in_flight_finish(service, reference_models):
    from tests.helpers.observe import total, wait_until

    with gateway_process("--targets", service.target, "--drain-delay-s", "1", "--shutdown-timeout-s", "60") as (
            base, process):
        texts = make_texts(1500, seed=41, max_words=60)  # seconds of work: still running when the gateway stops
        outcome: dict = {}
        forwarded = "ray_embedding_sequences_forwarded_total"
        before = total(forwarded, model=MINILM)

        def slow_request() -> None:
            outcome["response"] = post(base, {"model": MINILM, "input": texts, "encoding_format": "float"})
            outcome["done"] = time.monotonic()

        caller = threading.Thread(target=slow_request)
        caller.start()
        wait_until(lambda: total(forwarded, model=MINILM) > before, 60, "the request at the model")
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        wait_until(lambda: readiness(base) == 503, 5, "/readyz 503 on SIGTERM")
        assert post(base, {"model": MINILM, "input": "during the drain delay"}).status_code == 200
        caller.join(timeout=120)
        assert outcome["done"] - sent > 1.0, "the request ended before the gateway stopped accepting"
        response = outcome["response"]
        assert response.status_code == 200, response.text
        got = np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)
        assert np.abs(got - reference_models[MINILM].encode(texts, normalize_embeddings=True)).max() < TOL
        process.wait(timeout=30)  # it exits by itself once the request is answered
