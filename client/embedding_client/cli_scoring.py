"""The command line's `sparse` and `rerank` commands (cli.py has the docs and `embed`).

`sparse` is resumable as `embed` is: vectors are appended to OUTPUT (or, for Parquet, to a JSONL work file) a
chunk at a time, and OUTPUT.progress.json records the inputs done and the bytes written, so a run started
again with the same arguments cuts back to the last whole chunk and goes on. `rerank` ranks one query's
documents in one job (the client splits it into calls within the service's limits) and writes them ranked.
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
from embedding_client.files import fingerprint, read_inputs, write_json
from embedding_client.scoring import SCORING_TRUNCATION
from embedding_client.sync import EmbedClient


def add_commands(commands, common_options: Callable[[argparse.ArgumentParser], None]) -> None:
    sparse = commands.add_parser("sparse", help="sparse vectors of a text or JSONL file into .jsonl or .parquet, "
                                 "resumable")
    sparse.add_argument("input", help="a .txt (one input per line) or .jsonl file")
    sparse.add_argument("output", help="a .jsonl or .parquet file")
    common_options(sparse)
    sparse.add_argument("--top-k", type=int, default=None, help="keep each vector's heaviest terms")
    sparse.add_argument("--return-tokens", action="store_true", help="also write each term's token string")
    sparse.add_argument("--truncation", default="end", choices=list(SCORING_TRUNCATION))
    sparse.add_argument("--chunk", type=int, default=10_000, help="inputs per resumable step")
    rerank = commands.add_parser("rerank", help="rank a text or JSONL file's documents against a query")
    rerank.add_argument("query")
    rerank.add_argument("input", help="the documents: a .txt (one per line) or .jsonl file")
    rerank.add_argument("output", help="a .jsonl or .parquet file, highest score first")
    common_options(rerank)
    rerank.add_argument("--top-n", type=int, default=None, help="write only the top_n documents")
    rerank.add_argument("--activation", action="store_true", help="the model's activation on the scores (sigmoid)")
    rerank.add_argument("--return-documents", action="store_true", help="write each document beside its score")
    rerank.add_argument("--truncation", default="end", choices=list(SCORING_TRUNCATION))


def _client(args: argparse.Namespace) -> EmbedClient:
    return EmbedClient(args.target, api_key=os.environ.get(args.api_key_env) if args.api_key_env else None,
                       timeout_s=args.timeout_s)


def _check_parquet(output: Path) -> bool:
    if output.suffix != ".parquet":
        return False
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise SystemExit("Parquet output needs pyarrow (pip install 'embedding-service-client[parquet]')") from None
    return True


def sparse_file(args: argparse.Namespace) -> int:
    source, output = Path(args.input), Path(args.output)
    parquet = _check_parquet(output)
    work = output.with_name(output.name + ".partial.jsonl") if parquet else output
    record_path = output.with_name(output.name + ".progress.json")
    texts = read_inputs(source, args.field)
    options = {"model": args.model, "top_k": args.top_k, "return_tokens": args.return_tokens,
               "truncation": args.truncation}
    job = fingerprint(source, {"command": "sparse", **options})
    record = json.loads(record_path.read_text()) if record_path.exists() else None
    if record is not None and record.get("fingerprint") != job:
        if not args.overwrite:
            raise SystemExit(f"{record_path} belongs to another input or other options; --overwrite starts afresh")
        record = None
    if record is None and output.exists() and not args.overwrite:
        raise SystemExit(f"{output} exists; --overwrite replaces it")
    if record is None:
        record = {"fingerprint": job, "rows": len(texts), "done": 0, "bytes": 0, "tokens": 0}
        work.write_bytes(b"")
        write_json(record_path, record)
    else:
        print(f"resuming at input {record['done']} of {record['rows']}", file=sys.stderr)
    with _client(args) as client, work.open("r+b") as out:
        out.truncate(record["bytes"])  # whatever a stopped run wrote past its last whole chunk
        out.seek(record["bytes"])
        report, finish = progress_bars.reporter(not args.no_progress, len(texts), record["done"])
        try:
            for start in range(record["done"], len(texts), args.chunk):
                chunk = texts[start : start + args.chunk]
                result = client.embed_sparse(chunk, **options)
                for k, v in enumerate(result.vectors):
                    line = {"index": start + k, "indices": v.indices.tolist(), "values": v.values.tolist(),
                            "tokens": v.tokens, "active_terms": v.active_terms}
                    if v.terms is not None:
                        line["terms"] = v.terms
                    out.write((json.dumps(line) + "\n").encode())
                out.flush()
                os.fsync(out.fileno())
                record.update(done=start + len(chunk), bytes=out.tell(), tokens=record["tokens"] + result.tokens)
                write_json(record_path, record)
                report(len(chunk), len(texts))
        except EmbeddingError as exc:
            print(f"\nstopped at input {record['done']} of {len(texts)}: {exc}; run again to continue",
                  file=sys.stderr)
            return 1
        finally:
            finish()
    if parquet:
        _sparse_parquet(work, output)
        work.unlink()
    record_path.unlink()
    print(f"{len(texts)} inputs, {record['tokens']} tokens -> {output}", file=sys.stderr)
    return 0


def _sparse_parquet(work: Path, output: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in work.read_text().splitlines()]
    columns = {"index": pa.array([r["index"] for r in rows], pa.int64()),
               "indices": pa.array([r["indices"] for r in rows], pa.list_(pa.int32())),
               "values": pa.array([r["values"] for r in rows], pa.list_(pa.float32())),
               "tokens": pa.array([r["tokens"] for r in rows], pa.int32()),
               "active_terms": pa.array([r["active_terms"] for r in rows], pa.int32())}
    if rows and "terms" in rows[0]:
        columns["terms"] = pa.array([r["terms"] for r in rows], pa.list_(pa.string()))
    pq.write_table(pa.table(columns), output)


def rerank_file(args: argparse.Namespace) -> int:
    source, output = Path(args.input), Path(args.output)
    parquet = _check_parquet(output)
    if output.exists() and not args.overwrite:
        raise SystemExit(f"{output} exists; --overwrite replaces it")
    documents = read_inputs(source, args.field)
    with _client(args) as client:
        result = client.rerank(args.query, documents, model=args.model, top_n=args.top_n,
                               return_documents=args.return_documents, activation=args.activation,
                               truncation=args.truncation)
    rows = []
    for r in result.results:
        row = {"index": r.index, "score": r.score, "tokens": r.tokens}
        if args.return_documents:
            row["document"] = r.document
        rows.append(row)
    work = output.with_name(output.name + ".tmp")
    if parquet:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({key: [row[key] for row in rows] for key in (rows[0] if rows else {})}), work)
    else:
        work.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(work, output)
    print(f"{len(documents)} documents, {result.tokens} tokens -> {output}", file=sys.stderr)
    return 0


COMMANDS = {"sparse": sparse_file, "rerank": rerank_file}
