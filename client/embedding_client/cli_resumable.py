"""The resumable run of the bulk commands that write rows (sparse, classify, tokenize).

Rows are appended as JSONL to OUTPUT (or, for Parquet, to a work file made into OUTPUT at the end) a chunk of inputs
at a time, and OUTPUT.progress.json records the inputs done and the bytes written, so a run started again with the
same arguments cuts back to the last whole chunk and goes on. A finished output is never overwritten without
--overwrite.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from embedding_client import progress as progress_bars
from embedding_client.errors import EmbeddingError
from embedding_client.files import fingerprint, write_json
from embedding_client.sync import EmbedClient

# rows_of(client, start, end) -> (the rows of inputs [start, end), the tokens they cost)
RowsOf = Callable[[EmbedClient, int, int], tuple[list[dict], int]]


def client_of(args: argparse.Namespace) -> EmbedClient:
    return EmbedClient(args.target, api_key=os.environ.get(args.api_key_env) if args.api_key_env else None,
                       timeout_s=args.timeout_s)


def wants_parquet(output: Path) -> bool:
    if output.suffix != ".parquet":
        return False
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise SystemExit("Parquet output needs pyarrow (pip install 'embedding-service-client[parquet]')") from None
    return True


def resumed_record(record_path: Path, job: str, output: Path, overwrite: bool) -> dict | None:
    """The progress record of a stopped run of this very job (its fingerprint), to resume from; None to start
    afresh. A record of another job, or an output already there, stops the command unless `overwrite`."""
    record = json.loads(record_path.read_text()) if record_path.exists() else None
    if record is not None and record.get("fingerprint") != job:
        if not overwrite:
            raise SystemExit(f"{record_path} belongs to another input or other options; --overwrite starts afresh")
        record = None
    if record is None and output.exists() and not overwrite:
        raise SystemExit(f"{output} exists; --overwrite replaces it")
    return record


def write_rows_in_chunks(args: argparse.Namespace, source: Path, output: Path, total: int, options: dict,
                         rows_of: RowsOf, to_parquet: Callable[[list[dict], Path], None], desc: str) -> int:
    """Runs the job over inputs [0, total) in chunks of args.chunk (resuming where a record says), then writes
    Parquet with to_parquet(rows, output) when OUTPUT is .parquet. `options`: what makes the job, with the input
    file (its fingerprint)."""
    parquet = wants_parquet(output)
    work = output.with_name(output.name + ".partial.jsonl") if parquet else output
    record_path = output.with_name(output.name + ".progress.json")
    job = fingerprint(source, options)
    record = resumed_record(record_path, job, output, args.overwrite)
    if record is None:
        record = {"fingerprint": job, "rows": total, "done": 0, "bytes": 0, "tokens": 0}
        work.write_bytes(b"")
        write_json(record_path, record)
    else:
        print(f"resuming at input {record['done']} of {record['rows']}", file=sys.stderr)
    with client_of(args) as client, work.open("r+b") as out:
        out.truncate(record["bytes"])  # whatever a stopped run wrote past its last whole chunk
        out.seek(record["bytes"])
        report, finish = progress_bars.reporter(not args.no_progress, total, record["done"], desc=desc)
        try:
            for start in range(record["done"], total, args.chunk):
                end = min(total, start + args.chunk)
                rows, tokens = rows_of(client, start, end)
                # default=str: ids passed through from Parquet may be of types JSON lacks (dates, say)
                out.write("".join(json.dumps(row, default=str) + "\n" for row in rows).encode())
                out.flush()
                os.fsync(out.fileno())
                record.update(done=end, bytes=out.tell(), tokens=record["tokens"] + tokens)
                write_json(record_path, record)
                report(end - start, total)
        except EmbeddingError as exc:
            print(f"\nstopped at input {record['done']} of {total}: {exc}; run again to continue", file=sys.stderr)
            return 1
        finally:
            finish()
    if parquet:
        to_parquet([json.loads(line) for line in work.read_text().splitlines()], output)
        work.unlink()
    record_path.unlink()
    print(f"{total} inputs, {record['tokens']} tokens -> {output}", file=sys.stderr)
    return 0
