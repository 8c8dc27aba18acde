"""Generate the docs' tables from their sources: the error reasons from the proto, the metrics from their specs.

Run from anywhere: `python scripts/generate_docs.py`. It rewrites the part of docs/errors.md and of
docs/monitoring.md between their `<!-- name:begin -->` and `<!-- name:end -->` markers; tests/test_docs.py
renders them again and fails on any difference, so the tables never drift from the proto and the code.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REASONS_PROTO = ROOT / "protos" / "embedding_service" / "v1" / "error_reason.proto"
ERRORS = ROOT / "docs" / "errors.md"
MONITORING = ROOT / "docs" / "monitoring.md"
_VALUE = re.compile(r'^\s*ERROR_REASON_(\w+)\s*=\s*(\d+)\s*\[\(status_code\)\s*=\s*"(\w+)"\];')


def reason_rows() -> list[tuple[str, str, str]]:
    """(reason, status code, meaning) of every ErrorReason value, from the proto's text and comments."""
    rows, comment = [], []
    for line in REASONS_PROTO.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("//"):
            comment.append(stripped.removeprefix("//").strip())
            continue
        match = _VALUE.match(line)
        if match:
            name, _, code = match.groups()
            meaning = " ".join(comment)
            meaning = meaning.removeprefix(f"{code}:").strip()
            rows.append((name, code, meaning))
        comment = []
    return rows


def reasons_table() -> str:
    lines = ["| reason | status code | when |", "|---|---|---|"]
    lines += [f"| `{name}` | {code} | {meaning} |" for name, code, meaning in reason_rows()]
    return "\n".join(lines)


def metrics_table() -> str:
    from embedding_service.observability.metrics import SPECS
    from gateway.metrics import SPECS as GATEWAY_SPECS

    lines = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    lines += [f"| `{s.exported}` | {s.kind} | {', '.join(s.tags)} | {s.description} |" for s in SPECS]
    lines += [f"| `{s.exported}` | {s.kind} | {', '.join(s.labels)} | {s.description} |" for s in GATEWAY_SPECS.values()]
    return "\n".join(lines)


def replaced(text: str, name: str, table: str) -> str:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    head, found, rest = text.partition(begin)
    if not found or end not in rest:
        raise ValueError(f"no {begin} ... {end} in the page")
    return f"{head}{begin}\n{table}\n{end}{rest.partition(end)[2]}"


def rendered() -> dict[Path, str]:
    """Each generated page's text as it should be."""
    return {ERRORS: replaced(ERRORS.read_text(), "reasons", reasons_table()),
            MONITORING: replaced(MONITORING.read_text(), "metrics", metrics_table())}


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    for path, text in rendered().items():
        path.write_text(text)
        print(path.relative_to(ROOT))
