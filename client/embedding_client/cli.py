"""Bulk embedding from the command line, resumable:

    python -m embedding_client embed texts.txt vectors.npy --target host:9000 [--target ...]
    python -m embedding_client embed docs.jsonl vectors.parquet --field body
    python -m embedding_client sparse docs.jsonl sparse.jsonl --top-k 128      (or sparse.parquet)
    python -m embedding_client rerank "a query" docs.jsonl ranked.jsonl --top-n 10
    python -m embedding_client classify corpus.parquet labels.parquet --id-field id --top-k 3   (or .jsonl)
    python -m embedding_client tokenize corpus.jsonl ids.jsonl --id-field id
    python -m embedding_client job submit s3://bucket/corpus/ --format parquet --wait   (a batch job: cli_jobs.py)

Input: a text file (one input per line), JSONL (an object per line, its `--field`, or a JSON string) or Parquet
(its column `--field`; pyarrow). Output: a float32 .npy of one row per input line (or Parquet when pyarrow is
installed); sparse vectors as JSONL (an object per input: index, indices, values, tokens, active_terms) or
Parquet; a rerank as JSONL of the ranked documents (index, score, tokens, with --return-documents the document)
or Parquet; classify and tokenize as JSONL or Parquet of one row per input, in input order (classify: index,
the `--id-field` when given, labels and scores highest first, tokens; with `--pair-field` each input is a text
pair; tokenize: index, the id, ids, with --return-tokens tokens and special, with --return-offsets starts and
ends). Work goes in chunks; after each the rows are flushed and OUTPUT.progress.json records how far it got, so
a run that is interrupted (Ctrl-C, SIGTERM, a lost connection) continues there when started again with the
same arguments. A finished output is never overwritten without --overwrite.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from embedding_client import cli_jobs, cli_records, cli_scoring
from embedding_client import progress as progress_bars
from embedding_client.cli_resumable import resumed_record
from embedding_client.encodings import TRUNCATION
from embedding_client.errors import EmbeddingError
from embedding_client.files import fingerprint, read_inputs, write_json
from embedding_client.sync import EmbedClient


def embed_file(args: argparse.Namespace) -> int:
    source, output = Path(args.input), Path(args.output)
    parquet = output.suffix == ".parquet"
    if parquet:
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise SystemExit("Parquet output needs pyarrow (pip install 'embedding-service-client[parquet]')") from None
    work = output.with_name(output.name + ".partial.npy") if parquet else output
    record_path = output.with_name(output.name + ".progress.json")
    texts = read_inputs(source, args.field)
    options = {"model": args.model, "dimensions": args.dimensions, "normalize": not args.no_normalize,
               "prompt_name": args.prompt_name, "truncation": args.truncation}
    job = fingerprint(source, options)
    record = resumed_record(record_path, job, output, args.overwrite)

    with EmbedClient(args.target, api_key=os.environ.get(args.api_key_env) if args.api_key_env else None,
                     timeout_s=args.timeout_s) as client:
        if record is None:
            dimension = args.dimensions or client.get_model(args.model).dimension
            vectors = np.lib.format.open_memmap(work, mode="w+", dtype=np.float32, shape=(len(texts), dimension))
            record = {"fingerprint": job, "rows": len(texts), "dimensions": dimension, "done": 0,
                      "tokens": 0}
            write_json(record_path, record)
        else:
            vectors = np.lib.format.open_memmap(work, mode="r+")
            print(f"resuming at input {record['done']} of {record['rows']}", file=sys.stderr)
        report, finish = progress_bars.reporter(not args.no_progress, len(texts), record["done"])
        try:
            for start in range(record["done"], len(texts), args.chunk):
                chunk = texts[start : start + args.chunk]
                result = client.embed(chunk, **options)
                vectors[start : start + len(chunk)] = result.vectors
                vectors.flush()
                record.update(done=start + len(chunk), tokens=record["tokens"] + result.usage.total_tokens)
                write_json(record_path, record)
                report(len(chunk), len(texts))
        except EmbeddingError as exc:
            print(f"\nstopped at input {record['done']} of {len(texts)}: {exc}; run again to continue",
                  file=sys.stderr)
            return 1
        finally:
            finish()
        del vectors
    if parquet:
        _to_parquet(np.load(work, mmap_mode="r"), output)
        work.unlink()
    record_path.unlink()
    print(f"{len(texts)} inputs, {record['tokens']} tokens -> {output}", file=sys.stderr)
    return 0


def _to_parquet(vectors: np.ndarray, output: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    flat = pa.array(np.ascontiguousarray(vectors).reshape(-1))
    column = pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])
    pq.write_table(pa.table({"index": np.arange(len(vectors)), "embedding": column}), output)


def common_options(command: argparse.ArgumentParser) -> None:
    """What every command takes: the service, the model, the input file's field, auth, deadline, output."""
    command.add_argument("--target", action="append", default=None,
                         help="host:port of the service (repeat for several; default 127.0.0.1:9000)")
    command.add_argument("--model", default="", help="served model name (default: the service's default of the kind)")
    command.add_argument("--field", default="text", help="the JSONL field or Parquet column holding the text")
    command.add_argument("--api-key-env", default="EMBEDDING_SERVICE_API_KEY",
                         help="environment variable holding the API key (never on the command line)")
    command.add_argument("--timeout-s", type=float, default=3600.0, help="deadline of each step, retries included")
    command.add_argument("--overwrite", action="store_true")
    command.add_argument("--no-progress", action="store_true")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m embedding_client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    embed = commands.add_parser("embed", help="embed a text or JSONL file into .npy or .parquet, resumable")
    embed.add_argument("input", help="a .txt (one input per line), .jsonl or .parquet file")
    embed.add_argument("output", help="a .npy or .parquet file")
    common_options(embed)
    embed.add_argument("--dimensions", type=int, default=None)
    embed.add_argument("--no-normalize", action="store_true")
    embed.add_argument("--prompt-name", default="")
    embed.add_argument("--truncation", default="end", choices=list(TRUNCATION))
    embed.add_argument("--chunk", type=int, default=10_000, help="inputs per resumable step")
    cli_scoring.add_commands(commands, common_options)
    cli_records.add_commands(commands, common_options)
    cli_jobs.add_commands(commands)
    args = parser.parse_args(argv)
    args.target = args.target or ["127.0.0.1:9000"]
    if getattr(args, "chunk", 1) < 1:
        parser.error("--chunk must be at least 1")
    try:
        return {"embed": embed_file, **cli_scoring.COMMANDS, **cli_records.COMMANDS, **cli_jobs.COMMANDS}[
            args.command](args)
    except EmbeddingError as exc:
        print(f"embedding_client: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
