"""Generate the Python messages, type stubs and gRPC stubs from protos/ into the client package.

Run from anywhere: `python scripts/generate_protos.py`. The output is committed under
client/embedding_client/v1; tests/unit/test_protos.py regenerates into a temporary folder and fails
on any difference, so the stubs never drift from the protos.

The protos keep their package (`embedding_service.v1`: the wire names every client uses) and
their buf-linted layout; they are compiled from a copy placed at embedding_client/v1 so the
Python modules live in the client package, which the service and the gateway import too.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
SOURCE = PROTO_ROOT / "embedding_service" / "v1"
PYTHON_PACKAGE = Path("embedding_client") / "v1"  # where the modules go, under the client project
CLIENT_ROOT = ROOT / "client"
# google/protobuf/*.proto (descriptor.proto for the ErrorReason option), as shipped with grpcio-tools.
WELL_KNOWN = Path(grpc_tools.__file__).parent / "_proto"


def proto_files() -> list[Path]:
    return sorted(SOURCE.glob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Compile every proto of embedding_service.v1 into out_dir/embedding_client/v1; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as staged:
        (Path(staged) / PYTHON_PACKAGE).mkdir(parents=True)
        for proto in proto_files():
            shutil.copy(proto, Path(staged) / PYTHON_PACKAGE / proto.name)
        args = [
            "grpc_tools.protoc",
            f"-I{staged}",
            f"-I{WELL_KNOWN}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            *(str(PYTHON_PACKAGE / p.name) for p in proto_files()),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return sorted(p for p in (out_dir / PYTHON_PACKAGE).rglob("*") if p.suffix in {".py", ".pyi"})


if __name__ == "__main__":
    written = generate(CLIENT_ROOT)
    print("\n".join(str(p.relative_to(ROOT)) for p in written))
    sys.exit(0)
