"""The command line's files: inputs read from text or JSONL, a fingerprint of a job, records written atomically."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def read_inputs(path: Path, field: str) -> list[str]:
    texts = []
    jsonl = path.suffix in (".jsonl", ".ndjson")
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\n").rstrip("\r")
            if jsonl:
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise SystemExit(f"{path}:{number}: not JSON ({exc})") from None
                text = item if isinstance(item, str) else item.get(field) if isinstance(item, dict) else None
                if not isinstance(text, str):
                    raise SystemExit(f"{path}:{number}: no string field {field!r}")
            else:
                text = line
            if not text:
                raise SystemExit(f"{path}:{number}: empty input (the service embeds no empty text)")
            texts.append(text)
    return texts


def fingerprint(path: Path, options: dict) -> str:
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)  # atomic: a kill leaves the old record or the new one
