"""An OpenAI batch file made ready for Ray Data (the job's "validating"): its lines read as a stream, checked
(jobs/openai_batch.py), the lines that run written as Parquet with a row number (the id Ray Data's checkpoints
keep), the others straight to the job's error lines. Memory: one row group and the custom_ids seen (at most
max_lines_per_file of them)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from embedding_service.config import JobLimits, Limits
from embedding_service.jobs.openai_batch import EMBEDDINGS, RERANK, BadLine, FileRefused, parse_line, result_line
from embedding_service.jobs.storage import StorageRoot
from embedding_service.wire.rest_bodies import error_body

ROW_GROUP = 1024
_LINE = [("row", pa.int64()), ("custom_id", pa.string())]
SCHEMAS = {  # each endpoint's runnable lines: the line's number and custom_id, then its body's columns
    EMBEDDINGS: pa.schema(_LINE + [("inputs", pa.list_(pa.string())), ("dimensions", pa.int32()),
                                   ("output_dtype", pa.string()), ("base64", pa.bool_())]),
    RERANK: pa.schema(_LINE + [("query", pa.string()), ("documents", pa.list_(pa.string())), ("top_n", pa.int32()),
                               ("return_documents", pa.bool_()), ("activation", pa.bool_()), ("truncate", pa.bool_())]),
}


@dataclass(frozen=True)
class Validated:
    total: int  # the file's lines
    runnable: int  # lines written for the pool
    refused: int  # error lines written already
    model: str


def lines_of(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The file's lines, without their ends; blank lines skipped."""
    rest = b""
    for chunk in chunks:
        rest += chunk
        *whole, rest = rest.split(b"\n")
        for line in whole:
            if line.strip():
                yield line
    if rest.strip():
        yield rest


def validate(root: StorageRoot, input_uri: str, runnable_uri: str, errors_uri: str, endpoint: str,
             limits: JobLimits, calls: Limits, served: frozenset[str]) -> Validated:
    """Writes the runnable lines to `runnable_uri` (Parquet) and the refused ones to `errors_uri` (OpenAI's error
    lines); FileRefused when the file cannot be a batch. `calls`: the service's bounds on one call, which a line
    (one call's body) keeps too. `served`: the models of the endpoint's kind."""
    fs = root.filesystem
    schema = SCHEMAS[endpoint]
    seen: set[str] = set()
    model = None
    total = runnable = refused = 0
    pending: list[dict] = []
    fs.create_dir(root.path_of(runnable_uri).rpartition("/")[0], recursive=True)
    with pq.ParquetWriter(root.path_of(runnable_uri), schema, filesystem=fs) as writer, \
            fs.open_output_stream(root.path_of(errors_uri)) as errors:
        for number, raw in enumerate(lines_of(root.read_chunks(input_uri)), start=1):
            total = number
            if total > limits.max_lines_per_file:
                raise FileRefused("too_many_lines", f"the file holds more than {limits.max_lines_per_file} lines "
                                  "(limits.max_lines_per_file)", number)
            line = parse_line(raw, endpoint, limits, calls)
            custom_id = line.custom_id
            if custom_id is not None:
                if custom_id in seen:
                    raise FileRefused("duplicate_custom_id", f"custom_id {custom_id!r} appears twice; each line's "
                                      "must be unique", number, "custom_id")
                seen.add(custom_id)
            if not isinstance(line, BadLine):
                if model is None:
                    model = line.model
                elif line.model != model:
                    raise FileRefused("mismatched_model", f"every line of a batch must name the same model: line "
                                      f"{number} names {line.model!r}, earlier lines {model!r}", number, "model")
                if line.model not in served:
                    line = BadLine(custom_id, 404, error_body(f"The model '{line.model}' does not exist or is not "
                                                              f"a model served here for {endpoint}", param="model",
                                                              code="model_not_found"))
            if isinstance(line, BadLine):
                errors.write(result_line(line.custom_id, line.status_code, line.body))
                refused += 1
                continue
            pending.append({"row": number, "custom_id": line.custom_id, **line.row})
            runnable += 1
            if len(pending) >= ROW_GROUP:
                writer.write_table(pa.Table.from_pylist(pending, schema=schema))
                pending = []
        if pending:
            writer.write_table(pa.Table.from_pylist(pending, schema=schema))
    if total == 0:
        raise FileRefused("empty_file", "the file holds no lines")
    return Validated(total, runnable, refused, model or "")
