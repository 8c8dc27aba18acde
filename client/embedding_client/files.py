"""The command line's files: inputs read from text, JSONL or Parquet, a fingerprint of a job, records written
atomically."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Records:
    """The inputs of a bulk command, in file order: each one's text, and its pair's text and id when asked."""

    texts: list[str]
    pairs: list[str] | None = None  # "" where a row has no pair
    ids: list | None = None
    id_type: object = None  # a Parquet input's id column's arrow type, kept in Parquet output


def read_inputs(path: Path, field: str) -> list[str]:
    """The texts of a .txt file (one per line), a JSONL file (each object's `field`, or a JSON string) or a
    Parquet file (its column `field`)."""
    return read_records(path, field).texts


def read_records(path: Path, field: str, pair_field: str | None = None, id_field: str | None = None) -> Records:
    """As read_inputs, with each row's pair text (`pair_field`: missing, null or empty is none) and id (`id_field`,
    any value, passed through) from JSONL or Parquet."""
    if path.suffix == ".parquet":
        return _parquet_records(path, field, pair_field, id_field)
    jsonl = path.suffix in (".jsonl", ".ndjson")
    if not jsonl and (pair_field or id_field):
        raise SystemExit(f"{path}: pairs and ids come from JSONL or Parquet rows, not a text file")
    records = Records([], [] if pair_field else None, [] if id_field else None)
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\n").rstrip("\r")
            where = f"{path}:{number}"
            if not jsonl:
                records.texts.append(_text(line, where))
                continue
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SystemExit(f"{where}: not JSON ({exc})") from None
            if isinstance(item, str) and not (pair_field or id_field):
                records.texts.append(_text(item, where))
                continue
            if not isinstance(item, dict) or not isinstance(item.get(field), str):
                raise SystemExit(f"{where}: no string field {field!r}")
            _add_row(records, item[field], item.get(pair_field) if pair_field else None, where)
            if id_field:
                if id_field not in item:
                    raise SystemExit(f"{where}: no id field {id_field!r}")
                records.ids.append(item[id_field])
    return records


def _parquet_records(path: Path, field: str, pair_field: str | None, id_field: str | None) -> Records:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SystemExit("Parquet input needs pyarrow (pip install 'embedding-service-client[parquet]')") from None
    wanted = [c for c in (field, pair_field, id_field) if c]
    missing = [c for c in wanted if c not in pq.read_schema(path).names]
    if missing:
        raise SystemExit(f"{path}: no column {missing[0]!r}")
    table = pq.read_table(path, columns=list(dict.fromkeys(wanted)))
    texts = table.column(field).to_pylist()
    pairs = table.column(pair_field).to_pylist() if pair_field else [None] * len(texts)
    records = Records([], [] if pair_field else None, table.column(id_field).to_pylist() if id_field else None,
                      table.column(id_field).type if id_field else None)
    for row, (text, pair) in enumerate(zip(texts, pairs)):
        _add_row(records, text, pair, f"{path}: row {row}")
    return records


def _add_row(records: Records, text, pair, where: str) -> None:
    records.texts.append(_text(text, where))
    if records.pairs is not None:
        if pair is not None and not isinstance(pair, str):
            raise SystemExit(f"{where}: the pair is not a string")
        records.pairs.append(pair or "")


def _text(text, where: str) -> str:
    if not isinstance(text, str):
        raise SystemExit(f"{where}: no string text")
    if not text:
        raise SystemExit(f"{where}: empty input (the service embeds no empty text)")
    return text


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
