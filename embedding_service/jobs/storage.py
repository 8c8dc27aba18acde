"""The storage root: where batch files and job outputs lie, a local folder or an S3-compatible bucket, reached
through pyarrow's filesystems (which Ray Data reads and writes with too).

Every location kept in the store is a URI under the root (`/srv/jobs/files/file-...` or `s3://bucket/prefix/...`);
the gateway, the job manager and the runners each open the root from the same settings.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow.fs as pafs

from embedding_service.config import JobsSettings

CHUNK = 1 << 20


@dataclass(frozen=True)
class StorageRoot:
    """A root URI and the filesystem that reaches it. `path` is the filesystem's own path (no scheme)."""

    uri: str
    filesystem: pafs.FileSystem
    path: str

    @classmethod
    def of(cls, jobs: JobsSettings) -> StorageRoot:
        return cls.open(jobs.storage_root, jobs.s3_endpoint)

    @classmethod
    def open(cls, uri: str, s3_endpoint: str | None = None) -> StorageRoot:
        filesystem, path = filesystem_for(uri, s3_endpoint)
        root = cls(uri.rstrip("/"), filesystem, path.rstrip("/"))
        filesystem.create_dir(root.path, recursive=True)
        return root

    def uri_of(self, *parts: str) -> str:
        return "/".join([self.uri, *parts])

    def path_of(self, uri: str) -> str:
        """The filesystem path of a URI under this root; ValueError for one outside it."""
        if uri != self.uri and not uri.startswith(self.uri + "/"):
            raise ValueError(f"{uri} is not under the storage root")
        rest = uri[len(self.uri):].lstrip("/")
        normal = posixpath.normpath(rest) if rest else ""
        if normal == ".." or normal.startswith("../"):
            raise ValueError(f"{uri} leaves the storage root")
        return posixpath.join(self.path, normal) if normal else self.path

    def open_writer(self, uri: str):
        """An output stream at `uri` (its folders made)."""
        path = self.path_of(uri)
        self.filesystem.create_dir(posixpath.dirname(path), recursive=True)
        return self.filesystem.open_output_stream(path)

    def write_chunks(self, uri: str, chunks: Iterator[bytes]) -> int:
        """Writes the chunks to `uri`, streamed; the bytes written."""
        size = 0
        with self.open_writer(uri) as out:
            for chunk in chunks:
                out.write(chunk)
                size += len(chunk)
        return size

    def read_chunks(self, uri: str, chunk: int = CHUNK) -> Iterator[bytes]:
        with self.filesystem.open_input_stream(self.path_of(uri)) as stream:
            while block := stream.read(chunk):
                yield block

    def size(self, uri: str) -> int:
        return self.filesystem.get_file_info(self.path_of(uri)).size

    def exists(self, uri: str) -> bool:
        return self.filesystem.get_file_info(self.path_of(uri)).type != pafs.FileType.NotFound

    def delete(self, uri: str) -> None:
        """Deletes a file or a folder under the root; nothing when it is gone already."""
        path = self.path_of(uri)
        kind = self.filesystem.get_file_info(path).type
        try:
            if kind == pafs.FileType.Directory:
                self.filesystem.delete_dir(path)
            elif kind == pafs.FileType.File:
                self.filesystem.delete_file(path)
        except FileNotFoundError:  # gone since: another deleter, or an S3 store's emptied folder (SeaweedFS keeps one)
            pass

    def listing(self, uri: str, suffix: str = "") -> list[str]:
        """The files under a folder (recursively) whose names end with `suffix`, as filesystem paths, sorted."""
        selector = pafs.FileSelector(self.path_of(uri), allow_not_found=True, recursive=True)
        return sorted(i.path for i in self.filesystem.get_file_info(selector)
                      if i.type == pafs.FileType.File and i.path.endswith(suffix))


def filesystem_for(uri: str, s3_endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """The filesystem of a local path or an s3:// URI (credentials from the AWS_* environment), and its path."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        options = {"endpoint_override": s3_endpoint} if s3_endpoint else {}
        if s3_endpoint and s3_endpoint.startswith("http://"):
            options["scheme"] = "http"
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            options["region"] = region
        return pafs.S3FileSystem(**options), (parsed.netloc + parsed.path)
    if parsed.scheme in ("", "file"):
        return pafs.LocalFileSystem(), os.path.abspath(parsed.path if parsed.scheme else uri)
    raise ValueError(f"unsupported storage URI scheme {parsed.scheme!r} (a local path or s3://)")


def within(uri: str, roots: list[str]) -> bool:
    """Whether `uri` lies under one of `roots` once normalized (no `..` leaves a root)."""
    def normal(value: str) -> tuple[str, str] | None:
        parsed = urlparse(value)
        if parsed.scheme == "s3":
            # The bucket is the netloc, not a folder: a `..` in the key never reaches another bucket (s3://other/../
            # bucket/x is read from `other`), and a key that climbs above its bucket is refused.
            key = posixpath.normpath(parsed.path.lstrip("/") or ".")
            if key == ".." or key.startswith("../"):
                return None
            return "s3", parsed.netloc + ("" if key == "." else "/" + key)
        if parsed.scheme in ("", "file"):
            return "file", posixpath.normpath(os.path.abspath(parsed.path if parsed.scheme else value))
        return parsed.scheme, value

    if (target := normal(uri)) is None:
        return False
    scheme, path = target
    for root in roots:
        if (normalized := normal(root)) is None:
            continue
        root_scheme, root_path = normalized
        if scheme == root_scheme and (path == root_path or path.startswith(root_path.rstrip("/") + "/")):
            return True
    return False
