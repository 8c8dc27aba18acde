"""Bad input gets a precise status and reason through the proxy; the service keeps serving."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from embedding_service.errors import DOMAIN
from embedding_service.v1 import embedding_pb2 as pb
from tests.conftest import MAX_REQUEST_BYTES, TINY

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def text(t: str) -> pb.EmbedInput:
    return pb.EmbedInput(text=t)


def ids(*values: int) -> pb.EmbedInput:
    return pb.EmbedInput(token_ids=pb.TokenIds(ids=list(values)))


LONG_TEXT = " ".join(["embedding"] * 400)

BAD_REQUESTS = {
    "no inputs": (pb.EmbedRequest(), INVALID, "NO_INPUTS", {}),
    "empty string": (pb.EmbedRequest(inputs=[text("ok"), text("")]), INVALID, "EMPTY_INPUT", {"index": "1"}),
    "input with no kind": (pb.EmbedRequest(inputs=[text("ok"), pb.EmbedInput()]), INVALID, "INPUT_MISSING", {"index": "1"}),
    "empty token ids": (pb.EmbedRequest(inputs=[ids()]), INVALID, "EMPTY_INPUT", {"index": "0"}),
    "too many inputs": (pb.EmbedRequest(inputs=[text("x")] * 2049), INVALID, "TOO_MANY_INPUTS", {"limit": "2048"}),
    "input over the character limit": (
        pb.EmbedRequest(inputs=[text("x"), text("a" * 100_001)]),
        INVALID,
        "INPUT_TOO_LARGE",
        {"index": "1", "limit": "100000"},
    ),
    "too long with reject": (
        pb.EmbedRequest(inputs=[text("short"), text(LONG_TEXT)], truncation=pb.TRUNCATION_POLICY_REJECT),
        INVALID,
        "INPUT_TOO_LONG",
        {"index": "1", "max_tokens": "256"},
    ),
    "unknown model": (
        pb.EmbedRequest(model="no-such-model", inputs=[text("x")]),
        grpc.StatusCode.NOT_FOUND,
        "MODEL_NOT_FOUND",
        {"model": "no-such-model"},
    ),
    "dimensions zero": (pb.EmbedRequest(inputs=[text("x")], dimensions=0), INVALID, "INVALID_DIMENSIONS", {}),
    "dimensions negative": (pb.EmbedRequest(inputs=[text("x")], dimensions=-3), INVALID, "INVALID_DIMENSIONS", {}),
    "dimensions above the model's": (
        pb.EmbedRequest(inputs=[text("x")], dimensions=385),
        INVALID,
        "INVALID_DIMENSIONS",
        {"max": "384"},
    ),
    "dimensions above the tiny model's": (
        pb.EmbedRequest(model=TINY, inputs=[text("x")], dimensions=49),
        INVALID,
        "INVALID_DIMENSIONS",
        {"max": "48"},
    ),
    "token id above the vocabulary": (
        pb.EmbedRequest(inputs=[ids(7592, 2088), ids(7592, 30522)]),
        INVALID,
        "TOKEN_ID_OUT_OF_RANGE",
        {"index": "1", "token_id": "30522", "vocab_size": "30522"},
    ),
    "negative token id": (pb.EmbedRequest(inputs=[ids(-1)]), INVALID, "TOKEN_ID_OUT_OF_RANGE", {"index": "0"}),
    "unknown prompt": (
        pb.EmbedRequest(model=TINY, inputs=[text("x")], prompt_name="nope"),
        INVALID,
        "UNKNOWN_PROMPT",
        {"prompt_name": "nope"},
    ),
    "unknown truncation policy": (pb.EmbedRequest(inputs=[text("x")], truncation=42), INVALID, "INVALID_TRUNCATION", {}),
    "unknown encoding": (pb.EmbedRequest(inputs=[text("x")], encoding=9), INVALID, "INVALID_ENCODING", {}),
    "message over the size bound": (
        pb.EmbedRequest(inputs=[text("b" * 90_000)] * 60),  # about 5.4 MB, bound is 4 MiB
        INVALID,
        "REQUEST_TOO_LARGE",
        {"limit": str(MAX_REQUEST_BYTES)},
    ),
}


def error_info(err: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(err)
    assert status is not None, "the error carries a google.rpc.Status"
    assert status.code == err.code().value[0]
    infos = [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    assert len(infos) == 1
    info = error_details_pb2.ErrorInfo()
    infos[0].Unpack(info)
    return info


@pytest.mark.parametrize("case", list(BAD_REQUESTS), ids=list(BAD_REQUESTS))
def test_bad_embed_request_gets_precise_status_and_reason(service, case):
    request, code, reason, metadata = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as caught:
        service.stub.Embed(request, timeout=60)
    err = caught.value
    assert err.code() == code, err.details()
    assert "Traceback" not in err.details()
    info = error_info(err)
    assert info.reason == reason
    assert info.domain == DOMAIN
    for key, value in metadata.items():
        assert info.metadata[key] == value


def test_get_unknown_model_is_not_found(service):
    with pytest.raises(grpc.RpcError) as caught:
        service.stub.GetModel(pb.GetModelRequest(name="missing"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(caught.value).reason == "MODEL_NOT_FOUND"


@pytest.mark.parametrize(
    "request_, code, reason",
    [
        (pb.EmbedStreamRequest(), INVALID, "NO_INPUTS"),
        (pb.EmbedStreamRequest(model="missing", inputs=[text("x")]), grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND"),
        (pb.EmbedStreamRequest(inputs=[text("x"), text(LONG_TEXT)], truncation=3), INVALID, "INPUT_TOO_LONG"),
    ],
)
def test_bad_stream_request_gets_precise_status(service, request_, code, reason):
    # Ray's proxy ends a stream with the code and message alone (no trailers):
    # the reason leads the message.
    with pytest.raises(grpc.RpcError) as caught:
        list(service.stub.EmbedStream(request_, timeout=60))
    assert caught.value.code() == code
    assert caught.value.details().startswith(reason + ":")
    assert "Traceback" not in caught.value.details()


def test_service_keeps_serving_after_bad_input(service):
    for request, *_ in BAD_REQUESTS.values():
        with pytest.raises(grpc.RpcError):
            service.stub.Embed(request, timeout=60)
    ok = service.stub.Embed(pb.EmbedRequest(inputs=[text("still here")]), timeout=60)
    assert len(ok.embeddings) == 1 and len(ok.embeddings[0].values) == 384
