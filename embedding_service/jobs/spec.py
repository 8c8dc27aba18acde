"""What a batch job runs, as the store keeps it (the job row's `spec`): its source, model, options and where its
input and output lie. Written by whoever creates the job (the gateway's Batch API, the router's CreateJob) and read
by its runner."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# The dataset jobs' vector encodings (the service's own: the client library's OUTPUTS).
ENCODINGS = ("float", "int8", "uint8", "binary", "ubinary")


class JobSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Literal["openai", "dataset"] = Field(
        description="openai: an uploaded file of OpenAI batch lines (each its own options); dataset: a JSONL or "
        "Parquet dataset with a text and an id column.")
    model: str
    endpoint: Literal["/v1/embeddings", "/v1/rerank"] = Field(
        "/v1/embeddings", description="An OpenAI batch's endpoint: the shape of its lines and what they run on.")
    input_uri: str = Field(description="The uploaded file's location, or the dataset's URI (a file or a folder).")
    input_format: Literal["openai", "jsonl", "parquet"] = "openai"
    text_column: str = "text"
    id_column: str = "id"
    dimensions: int | None = Field(None, ge=1)
    encoding: Literal["float", "int8", "uint8", "binary", "ubinary"] = "float"
    normalize: bool = True
    prompt_name: str | None = None
    completion_window_s: float | None = Field(
        None, gt=0, description="Seconds from its creation an unfinished job has before it expires: an OpenAI "
        "batch's completion_window; None: never.")
    output_uri: str = Field("", description="The folder the Parquet output is written to; empty: the job's own "
                            "folder's `output` (output_of).")


# A create's idempotency key (CreateJob's request_id, the gateway's Idempotency-Key header).
MAX_REQUEST_KEY = 128

def request_key_refusal(key: str | None, name: str) -> str | None:
    """Why a create's idempotency key (`name`: how the caller's API calls it) is refused, or None."""
    if key is not None and len(key) > MAX_REQUEST_KEY:
        return f"{name} is longer than {MAX_REQUEST_KEY} characters"
    return None


# A job's metadata, as OpenAI bounds a batch's.
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512


def metadata_refusal(metadata: dict[str, str]) -> str | None:
    """Why a job's metadata is refused (past OpenAI's bounds), or None."""
    if len(metadata) > MAX_METADATA_PAIRS or any(len(k) > MAX_METADATA_KEY or len(v) > MAX_METADATA_VALUE
                                                 for k, v in metadata.items()):
        return (f"metadata holds at most {MAX_METADATA_PAIRS} pairs, keys of at most {MAX_METADATA_KEY} characters "
                f"and values of at most {MAX_METADATA_VALUE}")
    return None


def job_folder(storage_uri: str, job_id: str) -> str:
    """Where a job's own working files lie under the storage root (normalized input, checkpoints, output)."""
    return f"{storage_uri.rstrip('/')}/jobs/{job_id}"


def output_of(spec: dict | JobSpec, storage_uri: str, job_id: str) -> str:
    """Where a job's Parquet output lies: the folder its request named, else its own folder's `output`."""
    named = spec.output_uri if isinstance(spec, JobSpec) else spec.get("output_uri", "")
    return named or f"{job_folder(storage_uri, job_id)}/output"


def deadline_of(spec: dict, created_at_ms: int) -> int | None:
    """When a job still unfinished expires (ms since the epoch), or None."""
    window = spec.get("completion_window_s")
    return None if window is None else created_at_ms + int(window * 1000)
