"""POST /v1/files' multipart body, streamed: the file part goes to the storage root as it arrives (python-multipart's
push parser), never whole in memory or on a local disk, and stops at the first byte past the file bound.
Only two fields are taken: `purpose` (a short text) and `file`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from python_multipart.multipart import MultipartParser, parse_options_header

from gateway import errors

MAX_TEXT_FIELD = 256


@dataclass
class _Part:
    headers: dict[str, bytes] = field(default_factory=dict)
    name: str = ""
    filename: str | None = None
    text: bytearray = field(default_factory=bytearray)


class UploadRefused(Exception):
    def __init__(self, error: errors.OpenAIError) -> None:
        super().__init__(error.message)
        self.error = error


@dataclass
class Upload:
    purpose: str
    filename: str
    size: int


async def receive_upload(content_type: str, chunks: AsyncIterator[bytes], max_file_bytes: int, sink) -> Upload:
    """Parses the body from `chunks`; the file part's bytes go to `sink.write(bytes)` (a blocking stream, written
    from a thread). Raises UploadRefused for a malformed body or a file past `max_file_bytes`."""
    kind, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise UploadRefused(errors.invalid_request("the body must be multipart/form-data with a boundary"))
    parts: list[_Part] = []
    state = {"header": b"", "value": b"", "size": 0}
    pending: list[bytes] = []

    def on_part_begin() -> None:
        parts.append(_Part())

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["header"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        parts[-1].headers[state["header"].decode("latin-1").lower()] = state["value"]
        state["header"] = state["value"] = b""

    def on_headers_finished() -> None:
        part = parts[-1]
        _, disposition = parse_options_header(part.headers.get("content-disposition", b""))
        part.name = disposition.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in disposition:
            part.filename = disposition[b"filename"].decode("utf-8", "replace")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part = parts[-1]
        if part.name == "file":
            state["size"] += end - start
            if state["size"] > max_file_bytes:
                raise UploadRefused(errors.OpenAIError(
                    413, f"the file is larger than {max_file_bytes} bytes (the batch input file bound)",
                    "invalid_request_error", "file", "file_too_large"))
            pending.append(bytes(data[start:end]))
        else:
            part.text += data[start:end]
            if len(part.text) > MAX_TEXT_FIELD:
                raise UploadRefused(errors.invalid_request(f"field {part.name!r} is longer than {MAX_TEXT_FIELD} "
                                                           "bytes", part.name))

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished, "on_part_data": on_part_data})
    try:
        async for chunk in chunks:
            parser.write(chunk)
            if pending:
                data = b"".join(pending)
                pending.clear()
                await asyncio.to_thread(sink.write, data)
        parser.finalize()
    except UploadRefused:
        raise
    except Exception as error:  # python-multipart's own parse errors
        raise UploadRefused(errors.invalid_request(f"the multipart body does not parse: {error}")) from None
    files = [p for p in parts if p.name == "file"]
    purposes = [p for p in parts if p.name == "purpose"]
    if len(files) != 1:
        raise UploadRefused(errors.invalid_request("the body must carry one `file` part", "file"))
    if len(purposes) != 1:
        raise UploadRefused(errors.invalid_request("the body must carry one `purpose` field", "purpose"))
    return Upload(purposes[0].text.decode("utf-8", "replace"), files[0].filename or "upload.jsonl", state["size"])
