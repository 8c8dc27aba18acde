"""The API contract: buf lint clean, stubs in sync with the protos, importable without Ray."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent


def _load_generator():
    spec = importlib.util.spec_from_file_location("generate_protos", ROOT / "scripts" / "generate_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_buf_lint_standard_is_clean():
    buf = shutil.which("buf")
    assert buf, "the Buf CLI (pip package buf-bin) is installed by the test extra"
    result = subprocess.run([buf, "lint"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_lint_catches_a_violation(tmp_path):
    # Proves the lint check can fail: a service without the Service suffix.
    (tmp_path / "protos" / "bad" / "v1").mkdir(parents=True)
    (tmp_path / "buf.yaml").write_text((ROOT / "buf.yaml").read_text())
    (tmp_path / "protos" / "bad" / "v1" / "bad.proto").write_text(
        'syntax = "proto3";\npackage bad.v1;\nmessage PingRequest {}\nmessage PingResponse {}\n'
        "service Pinger { rpc Ping(PingRequest) returns (PingResponse); }\n"
    )
    result = subprocess.run([shutil.which("buf"), "lint"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "SERVICE_SUFFIX" in result.stdout + result.stderr or "Service" in result.stdout


def test_generated_stubs_match_the_protos(tmp_path):
    generated = _load_generator().generate(tmp_path)
    assert generated, "protoc produced nothing"
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in generated}
    assert {str(p) for p in fresh} >= {
        "embedding_service/v1/embedding_pb2.py",
        "embedding_service/v1/embedding_pb2.pyi",
        "embedding_service/v1/embedding_pb2_grpc.py",
    }
    stale = [str(rel) for rel, data in fresh.items() if (ROOT / rel).read_bytes() != data]
    assert not stale, f"regenerate with `python scripts/generate_protos.py`: {stale} differ from the protos"


def test_generated_code_imports_without_ray():
    code = (
        "import sys\n"
        "from embedding_service.v1 import embedding_pb2, embedding_pb2_grpc\n"
        "assert embedding_pb2.DESCRIPTOR.services_by_name['EmbedService']\n"
        "assert hasattr(embedding_pb2_grpc, 'EmbedServiceStub')\n"
        "assert 'ray' not in sys.modules, 'generated code pulled in Ray'\n"
        "assert 'torch' not in sys.modules, 'generated code pulled in torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_method_names_do_not_collide_with_grpc_health():
    from grpc_health.v1 import health_pb2

    from embedding_service.v1 import embedding_pb2

    ours = {m.name for m in embedding_pb2.DESCRIPTOR.services_by_name["EmbedService"].methods}
    health = {m.name for m in health_pb2.DESCRIPTOR.services_by_name["Health"].methods}
    assert health >= {"Check", "Watch"}
    assert not ours & health
