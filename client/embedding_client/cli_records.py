"""The command line's `classify` and `tokenize` commands (cli.py has the docs and `embed`): one output row per input
row, resumable as `sparse` is (cli_resumable.py).

An input row is a text (`--field`), for classify optionally with a pair text (`--pair-field`), and an id
(`--id-field`) copied into its output row, from JSONL objects or Parquet columns (a .txt file: texts alone).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from embedding_client.cli_resumable import write_rows_in_chunks
from embedding_client.files import Records, read_records
from embedding_client.scoring import SCORING_TRUNCATION

# The columns the commands write: an id field may not take their names.
WRITTEN = frozenset({"index", "labels", "scores", "tokens", "ids", "special", "starts", "ends"})


def add_commands(commands, common_options: Callable[[argparse.ArgumentParser], None]) -> None:
    classify = commands.add_parser("classify", help="labels and scores of a JSONL or Parquet file's texts (or text "
                                   "pairs) into .jsonl or .parquet, resumable")
    _files_and_ids(classify, common_options)
    classify.add_argument("--pair-field", default=None, help="the field or column of each input's pair text "
                          "(missing, null or empty: the text alone)")
    classify.add_argument("--top-k", type=int, default=None, help="write only each input's top_k labels")
    classify.add_argument("--raw-scores", action="store_true", help="the logits instead of the model's activation")
    classify.add_argument("--truncation", default="end", choices=list(SCORING_TRUNCATION))
    tokenize = commands.add_parser("tokenize", help="token ids of a text, JSONL or Parquet file's texts into .jsonl "
                                   "or .parquet, resumable")
    _files_and_ids(tokenize, common_options)
    tokenize.add_argument("--no-special-tokens", action="store_true", help="without the model's special tokens")
    tokenize.add_argument("--return-tokens", action="store_true", help="also each token's string and whether it "
                          "is special")
    tokenize.add_argument("--return-offsets", action="store_true", help="also each token's character offsets")


def _files_and_ids(command: argparse.ArgumentParser, common_options) -> None:
    command.add_argument("input", help="a .jsonl or .parquet file (or a .txt of one text per line)")
    command.add_argument("output", help="a .jsonl or .parquet file, one row per input row, in input order")
    common_options(command)
    command.add_argument("--id-field", default=None, help="the field or column of each input's id, copied to its "
                         "output row under the same name")
    command.add_argument("--chunk", type=int, default=10_000, help="inputs per resumable step")


def _read(args: argparse.Namespace, pair_field: str | None = None) -> tuple[Path, Path, Records]:
    if args.id_field in WRITTEN:
        raise SystemExit(f"--id-field {args.id_field!r} would clash with an output column of that name")
    source = Path(args.input)
    return source, Path(args.output), read_records(source, args.field, pair_field, args.id_field)


def _start_row(records: Records, id_field: str | None, position: int) -> dict:
    row = {"index": position}
    if id_field:
        row[id_field] = records.ids[position]
    return row


def classify_file(args: argparse.Namespace) -> int:
    source, output, records = _read(args, args.pair_field)
    inputs = list(zip(records.texts, records.pairs)) if records.pairs is not None else records.texts
    options = {"model": args.model, "top_k": args.top_k, "raw_scores": args.raw_scores, "truncation": args.truncation}

    def rows_of(client, start: int, end: int) -> tuple[list[dict], int]:
        result = client.classify(inputs[start:end], **options)
        rows = []
        for k, c in enumerate(result.classifications):
            row = _start_row(records, args.id_field, start + k)
            row.update(labels=[s.label for s in c.labels], scores=[s.score for s in c.labels], tokens=c.tokens)
            rows.append(row)
        return rows, result.tokens

    def to_parquet(rows: list[dict], path: Path) -> None:
        import pyarrow as pa

        _write_parquet(rows, records, args.id_field, path, {"labels": pa.list_(pa.string()),
                                                            "scores": pa.list_(pa.float32()), "tokens": pa.int32()})

    job = {"command": "classify", "field": args.field, "pair_field": args.pair_field, "id_field": args.id_field,
           **options}
    return write_rows_in_chunks(args, source, output, len(inputs), job, rows_of, to_parquet, "classifying")


def tokenize_file(args: argparse.Namespace) -> int:
    source, output, records = _read(args)
    options = {"model": args.model, "add_special_tokens": not args.no_special_tokens,
               "return_tokens": args.return_tokens, "return_offsets": args.return_offsets}

    def rows_of(client, start: int, end: int) -> tuple[list[dict], int]:
        result = client.tokenize(records.texts[start:end], **options)
        rows = []
        for k, t in enumerate(result.inputs):
            row = _start_row(records, args.id_field, start + k)
            row["ids"] = t.ids
            if t.tokens is not None:
                row.update(tokens=t.tokens, special=t.special)
            if t.offsets is not None:
                row.update(starts=[a for a, _ in t.offsets], ends=[b for _, b in t.offsets])
            rows.append(row)
        return rows, result.tokens

    def to_parquet(rows: list[dict], path: Path) -> None:
        import pyarrow as pa

        types = {"ids": pa.list_(pa.int32())}
        if args.return_tokens:
            types.update(tokens=pa.list_(pa.string()), special=pa.list_(pa.bool_()))
        if args.return_offsets:
            types.update(starts=pa.list_(pa.int32()), ends=pa.list_(pa.int32()))
        _write_parquet(rows, records, args.id_field, path, types)

    job = {"command": "tokenize", "field": args.field, "id_field": args.id_field, **options}
    return write_rows_in_chunks(args, source, output, len(records.texts), job, rows_of, to_parquet, "tokenizing")


def _write_parquet(rows: list[dict], records: Records, id_field: str | None, path: Path, types: dict) -> None:
    """index, the id column (from the input, so it keeps its type rather than the work file's JSON of it; a Parquet
    input's own type), then `types`' columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {"index": pa.array([r["index"] for r in rows], pa.int64())}
    if id_field:
        columns[id_field] = pa.array([records.ids[r["index"]] for r in rows], records.id_type)
    columns.update({name: pa.array([r[name] for r in rows], kind) for name, kind in types.items()})
    pq.write_table(pa.table(columns), path)


COMMANDS = {"classify": classify_file, "tokenize": tokenize_file}
