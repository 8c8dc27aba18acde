"""The command line's `job` commands: batch jobs on the service's cluster (jobs.py), each printed as JSON.

    python -m embedding_client job submit s3://bucket/corpus/ --format parquet --text-column body --id-column id
    python -m embedding_client job submit /data/corpus.jsonl --format jsonl --wait     (a progress bar until done)
    python -m embedding_client job status batch_...  |  job wait batch_...  |  job cancel batch_...  |  job list
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from google.protobuf.json_format import MessageToDict

from embedding_client.jobs import ENCODINGS, FORMATS, Job, JobFailed
from embedding_client.sync import EmbedClient


def add_commands(commands) -> None:
    job = commands.add_parser("job", help="batch jobs on the service's cluster: submit, status, wait, cancel, list")
    actions = job.add_subparsers(dest="action", required=True)
    submit = actions.add_parser("submit", help="start a job over a dataset the service can read")
    submit.add_argument("input_uri", help="a file or folder (local to the service's nodes, or s3://...) under one "
                        "of the service's dataset roots")
    submit.add_argument("--format", required=True, choices=sorted(FORMATS), dest="input_format")
    submit.add_argument("--text-column", default="text")
    submit.add_argument("--id-column", default="id", help="a column of unique ids, copied to the output")
    submit.add_argument("--output-uri", default="", help="the output folder (default: the job's own)")
    submit.add_argument("--dimensions", type=int, default=None)
    submit.add_argument("--encoding", default="float", choices=sorted(ENCODINGS))
    submit.add_argument("--prompt-name", default="")
    submit.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE")
    submit.add_argument("--wait", action="store_true", help="follow the job until it ends, with a progress bar")
    for name in ("status", "wait", "cancel"):
        one = actions.add_parser(name, help={"status": "the job now", "wait": "follow the job until it ends",
                                             "cancel": "stop the job (its output so far is kept)"}[name])
        one.add_argument("job_id")
    listing = actions.add_parser("list", help="the key's jobs, newest first")
    listing.add_argument("--limit", type=int, default=20, help="jobs to list (most recent first)")
    for parser in [submit, listing, *[actions.choices[n] for n in ("status", "wait", "cancel")]]:
        _connection_options(parser)


def _connection_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--target", action="append", default=None,
                         help="host:port of the service (repeat for several; default 127.0.0.1:9000)")
    command.add_argument("--model", default="", help="served model name (default: the service's default)")
    command.add_argument("--api-key-env", default="EMBEDDING_SERVICE_API_KEY",
                         help="environment variable holding the API key (never on the command line)")
    command.add_argument("--timeout-s", type=float, default=None, help="how long `wait` follows the job")
    command.add_argument("--no-progress", action="store_true")


def _print(job: Job) -> None:
    print(json.dumps(MessageToDict(job.message, preserving_proto_field_name=True), sort_keys=True))


def run(args) -> int:
    key = os.environ.get(args.api_key_env) if args.api_key_env else None
    with EmbedClient(args.target, api_key=key) as client:
        if args.action == "list":
            for _, job in zip(range(args.limit), client.jobs(page_size=min(args.limit, 100))):
                _print(job)
            return 0
        if args.action == "submit":
            metadata = dict(pair.split("=", 1) for pair in args.metadata if "=" in pair)
            job = client.submit_job(args.input_uri, input_format=args.input_format, model=args.model,
                                    text_column=args.text_column, id_column=args.id_column,
                                    dimensions=args.dimensions, encoding=args.encoding, output_uri=args.output_uri,
                                    prompt_name=args.prompt_name, metadata=metadata)
            if not args.wait:
                _print(job)
                return 0
        else:
            job = client.job(args.job_id)
            if args.action == "cancel":
                job.cancel()
        if args.action in ("submit", "wait"):
            try:
                job.wait(timeout_s=args.timeout_s, progress=not args.no_progress)
            except JobFailed as failed:
                _print(job)
                print(f"embedding_client: {failed}", file=sys.stderr)
                return 1
        _print(job)
        return 0


COMMANDS = {"job": run}
