"""The command line's `sparse` and `rerank` commands (cli.py has the docs and `embed`).

`sparse` is resumable as `embed` is (cli_resumable.py): vectors are appended to OUTPUT (or, for Parquet, to a JSONL
work file) a chunk at a time, and a run started again with the same arguments goes on from the last whole chunk.
`rerank` ranks one query's documents in one job (the client splits it into calls within the service's limits) and
writes them ranked.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from embedding_client.cli_resumable import client_of, wants_parquet, write_rows_in_chunks
from embedding_client.files import read_inputs
from embedding_client.scoring import SCORING_TRUNCATION


def add_commands(commands, common_options: Callable[[argparse.ArgumentParser], None]) -> None:
    sparse = commands.add_parser("sparse", help="sparse vectors of a text or JSONL file into .jsonl or .parquet, "
                                 "resumable")
    sparse.add_argument("input", help="a .txt (one input per line), .jsonl or .parquet file")
    sparse.add_argument("output", help="a .jsonl or .parquet file")
    common_options(sparse)
    sparse.add_argument("--top-k", type=int, default=None, help="keep each vector's heaviest terms")
    sparse.add_argument("--return-tokens", action="store_true", help="also write each term's token string")
    sparse.add_argument("--truncation", default="end", choices=list(SCORING_TRUNCATION))
    sparse.add_argument("--chunk", type=int, default=10_000, help="inputs per resumable step")
    rerank = commands.add_parser("rerank", help="rank a text or JSONL file's documents against a query")
    rerank.add_argument("query")
    rerank.add_argument("input", help="the documents: a .txt (one per line), .jsonl or .parquet file")
    rerank.add_argument("output", help="a .jsonl or .parquet file, highest score first")
    common_options(rerank)
    rerank.add_argument("--top-n", type=int, default=None, help="write only the top_n documents")
    rerank.add_argument("--activation", action="store_true", help="the model's activation on the scores (sigmoid)")
    rerank.add_argument("--return-documents", action="store_true", help="write each document beside its score")
    rerank.add_argument("--truncation", default="end", choices=list(SCORING_TRUNCATION))


def sparse_file(args: argparse.Namespace) -> int:
    source, output = Path(args.input), Path(args.output)
    texts = read_inputs(source, args.field)
    options = {"model": args.model, "top_k": args.top_k, "return_tokens": args.return_tokens,
               "truncation": args.truncation}

    def rows_of(client, start: int, end: int) -> tuple[list[dict], int]:
        result = client.embed_sparse(texts[start:end], **options)
        rows = []
        for k, v in enumerate(result.vectors):
            row = {"index": start + k, "indices": v.indices.tolist(), "values": v.values.tolist(),
                   "tokens": v.tokens, "active_terms": v.active_terms}
            if v.terms is not None:
                row["terms"] = v.terms
            rows.append(row)
        return rows, result.tokens

    return write_rows_in_chunks(args, source, output, len(texts), {"command": "sparse", **options}, rows_of,
                                _sparse_parquet, "sparse")


def _sparse_parquet(rows: list[dict], output: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

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
    parquet = wants_parquet(output)
    if output.exists() and not args.overwrite:
        raise SystemExit(f"{output} exists; --overwrite replaces it")
    documents = read_inputs(source, args.field)
    with client_of(args) as client:
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
