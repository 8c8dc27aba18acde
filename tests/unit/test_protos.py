"""The API contract: buf lint clean, stubs in sync with the protos, importable without Ray."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.helpers import scripts
from tests.helpers.paths import ROOT


def test_buf_lint_standard_is_clean():
    buf = shutil.which("buf")
    assert buf, "the Buf CLI (pip package buf-bin) is installed by the test extra"
    result = subprocess.run([buf, "lint"], cwd=ROOT, capture_output=True, check=False, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_lint_catches_a_violation(tmp_path):
    # Proves the lint check can fail: a service without the Service suffix.
    (tmp_path / "protos" / "bad" / "v1").mkdir(parents=True)
    (tmp_path / "buf.yaml").write_text((ROOT / "buf.yaml").read_text())
    (tmp_path / "protos" / "bad" / "v1" / "bad.proto").write_text(
        'syntax = "proto3";\npackage bad.v1;\nmessage PingRequest {}\nmessage PingResponse {}\n'
        "service Pinger { rpc Ping(PingRequest) returns (PingResponse); }\n"
    )
    result = subprocess.run([shutil.which("buf"), "lint"], cwd=tmp_path, capture_output=True, check=False, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert "SERVICE_SUFFIX" in result.stdout + result.stderr or "Service" in result.stdout


def test_generated_stubs_match_the_protos(tmp_path):
    generated = scripts.load("generate_protos").generate(tmp_path)
    assert generated, "protoc produced nothing"
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in generated}
    assert {str(p) for p in fresh} >= {
        f"embedding_client/v1/{name}{suffix}"
        for name in ("embedding_pb2", "error_reason_pb2") for suffix in (".py", ".pyi")
    } | {"embedding_client/v1/embedding_pb2_grpc.py"}
    stale = [str(rel) for rel, data in fresh.items() if (ROOT / "client" / rel).read_bytes() != data]
    assert not stale, f"regenerate with `python scripts/generate_protos.py`: {stale} differ from the protos"


def test_generated_code_imports_without_ray():
    code = (
        "import sys\n"
        "from embedding_client.v1 import embedding_pb2, embedding_pb2_grpc\n"
        "assert embedding_pb2.DESCRIPTOR.services_by_name['EmbedService']\n"
        "assert hasattr(embedding_pb2_grpc, 'EmbedServiceStub')\n"
        "assert 'ray' not in sys.modules, 'generated code pulled in Ray'\n"
        "assert 'torch' not in sys.modules, 'generated code pulled in torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_method_names_do_not_collide_with_grpc_health():
    from grpc_health.v1 import health_pb2

    from embedding_client.v1 import embedding_pb2

    ours = {m.name for m in embedding_pb2.DESCRIPTOR.services_by_name["EmbedService"].methods}
    health = {m.name for m in health_pb2.DESCRIPTOR.services_by_name["Health"].methods}
    assert health >= {"Check", "Watch"}
    assert not ours & health


def test_every_error_reason_names_a_real_status_code():
    import grpc

    from embedding_client.v1 import error_reason_pb2
    from embedding_service.wire.reasons import STATUS_CODES, Reason

    values = error_reason_pb2.ErrorReason.DESCRIPTOR.values
    assert values[0].name == "ERROR_REASON_UNSPECIFIED" and values[0].number == 0
    assert {r.name for r in Reason} == {v.name.removeprefix("ERROR_REASON_") for v in values[1:]}
    assert set(STATUS_CODES) == set(Reason)
    assert grpc.StatusCode.OK not in STATUS_CODES.values() and grpc.StatusCode.UNKNOWN not in STATUS_CODES.values()
    assert STATUS_CODES[Reason.MALFORMED_REQUEST] == grpc.StatusCode.INVALID_ARGUMENT
    assert STATUS_CODES[Reason.OVERLOADED] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert STATUS_CODES[Reason.SHUTTING_DOWN] == grpc.StatusCode.UNAVAILABLE
    assert STATUS_CODES[Reason.API_KEY_INVALID] == grpc.StatusCode.UNAUTHENTICATED


def test_service_errors_carry_their_reason_and_retry_hint_on_the_wire():
    import pickle

    import grpc
    from google.rpc import error_details_pb2, status_pb2

    from embedding_client.errors import STATUS_DETAILS_KEY, read_details
    from embedding_service.wire.reasons import Reason, ServiceError

    error = ServiceError(Reason.OVERLOADED, "full", queue="router")
    assert error.retry_after_s == 1.0  # retryable codes carry a hint by default
    status = status_pb2.Status.FromString(error.status_bytes())
    assert status.code == 8 and status.message == "full"
    info = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(info)
    assert (info.reason, info.domain, dict(info.metadata)) == ("OVERLOADED", "embedding-service", {"queue": "router"})
    read = read_details([(STATUS_DETAILS_KEY, error.status_bytes())])
    assert (read.reason, read.metadata, read.retry_after_s) == ("OVERLOADED", {"queue": "router"}, 1.0)
    # A failed stream has no trailers: its reason leads the message.
    assert read_details([], error.stream_details()).reason == "OVERLOADED"
    assert read_details([], "not: a reason").reason is None
    assert ServiceError(Reason.NO_INPUTS, "x").retry_after_s is None
    copy = pickle.loads(pickle.dumps(ServiceError(Reason.INPUT_TOO_LONG, "long", index=3)))
    assert (copy.reason, copy.code, copy.metadata) == (Reason.INPUT_TOO_LONG, grpc.StatusCode.INVALID_ARGUMENT, {"index": "3"})


BASELINE = ROOT / "tests" / "data" / "proto-baseline"  # the protos as released before rerank and sparse (issue 23)


def _breaking(against: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([shutil.which("buf"), "breaking", "--against", str(against)], cwd=cwd,
                          capture_output=True, check=False, text=True, timeout=120)


def test_nothing_released_changes_in_the_protos():
    result = _breaking(BASELINE, ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_breaking_catches_a_removed_field(tmp_path):
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    proto = tmp_path / "protos" / "embedding_service" / "v1" / "embedding.proto"
    text = proto.read_text()
    assert "  string prompt_name = 6;\n" in text
    proto.write_text(text.replace("  string prompt_name = 6;\n", "", 1))
    result = _breaking(BASELINE, tmp_path)
    assert result.returncode != 0 and "prompt_name" in result.stdout + result.stderr
