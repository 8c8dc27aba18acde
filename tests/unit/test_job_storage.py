"""The jobs' storage root (embedding_service/jobs/storage.py) on a local folder and on a real S3-compatible server
(SeaweedFS, tests/helpers/seaweed.py), credentials from the AWS_* environment as the service takes them: several MB
streamed in chunks and read back, size/exists/delete of files and folders, listings by suffix, Parquet written and read
through the root's filesystem, path_of refusing URIs outside the root (`..` escapes, prefix siblings), and within(),
the dataset roots' check, for local paths and s3:// URIs against `..` and prefix tricks."""

from __future__ import annotations

import os
import posixpath
import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from embedding_service.jobs.storage import CHUNK, StorageRoot, within
from tests.helpers import seaweed


@pytest.fixture(scope="module")
def s3():
    """One server for the module: starting it takes about a second."""
    with seaweed.s3_server() as server:
        yield server


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path, monkeypatch) -> StorageRoot:
    if request.param == "local":
        return StorageRoot.open(str(tmp_path / "jobs"))
    server = request.getfixturevalue("s3")
    for name, value in seaweed.aws_env(server).items():  # filesystem_for reads its credentials from here
        monkeypatch.setenv(name, value)
    return StorageRoot.open(f"s3://{server.bucket}/jobs", server.endpoint)


@pytest.fixture
def folder(root) -> str:
    """A folder of this test's own under the root: the S3 root is shared by the module's tests."""
    return root.uri_of(uuid.uuid4().hex[:12])


def put(root: StorageRoot, uri: str, data: bytes = b"x") -> None:
    root.write_chunks(uri, iter([data]))


def test_bytes_round_trip_in_chunks(root, folder):
    data = os.urandom(5 * CHUNK + 12345)  # several chunks and a partial one; random, so nothing compresses it away
    uri = f"{folder}/batch/input.jsonl"  # its folders are made by the write
    pieces = [data[i:i + 300_007] for i in range(0, len(data), 300_007)]  # not aligned with the reads' chunks
    assert root.write_chunks(uri, iter(pieces)) == len(data)
    assert root.size(uri) == len(data)
    chunks = list(root.read_chunks(uri))
    assert b"".join(chunks) == data
    # Streamed in bounded chunks (a job's file is never read whole into memory).
    assert [len(c) for c in chunks[:-1]] == [CHUNK] * (len(chunks) - 1) and 0 < len(chunks[-1]) <= CHUNK
    assert b"".join(root.read_chunks(uri, chunk=CHUNK // 4)) == data


def test_overwrite_replaces_the_file(root, folder):
    uri = f"{folder}/out.jsonl"
    put(root, uri, b"first, longer contents")
    put(root, uri, b"second")
    assert b"".join(root.read_chunks(uri)) == b"second" and root.size(uri) == 6


def test_size_exists_and_delete_of_a_file(root, folder):
    uri, sibling = f"{folder}/a.jsonl", f"{folder}/b.jsonl"
    assert not root.exists(uri)
    put(root, uri, b"12345")
    put(root, sibling)
    assert root.exists(uri) and root.size(uri) == 5
    root.delete(uri)
    assert not root.exists(uri) and root.exists(sibling)
    root.delete(uri)  # gone already: nothing to do, no error


def test_exists_and_delete_of_a_folder(root, folder):
    files = [f"{folder}/job/output/part-0.parquet", f"{folder}/job/output/deeper/part-1.parquet",
             f"{folder}/job/errors.jsonl"]
    for uri in files:
        put(root, uri)
    put(root, f"{folder}/other-job/errors.jsonl")
    assert root.exists(f"{folder}/job") and root.exists(f"{folder}/job/output/deeper")
    root.delete(f"{folder}/job")  # recursively
    assert not any(root.exists(uri) for uri in files) and root.listing(f"{folder}/job") == []
    if root.uri.startswith("s3://"):
        # SeaweedFS keeps a folder as an empty filer directory when its marker goes in the same multi-object delete
        # as its contents (HEAD job/ still answers 200, no listing shows it): only its contents are gone.
        assert all(i.base_name != "job" for i in root.filesystem.get_file_info(
            pafs.FileSelector(root.path_of(folder), recursive=True)))
    else:
        assert not root.exists(f"{folder}/job")
    assert root.exists(f"{folder}/other-job/errors.jsonl")  # a folder whose name shares the prefix stays
    root.delete(f"{folder}/job")


def test_listing_recursive_with_a_suffix(root, folder):
    parquet = [f"{folder}/out/part-1.parquet", f"{folder}/out/part-0.parquet", f"{folder}/out/sub/part-2.parquet"]
    for uri in [*parquet, f"{folder}/out/_SUCCESS", f"{folder}/out/part-0.parquet.tmp", f"{folder}/elsewhere.parquet"]:
        put(root, uri)
    root.filesystem.create_dir(root.path_of(f"{folder}/out/empty.parquet"), recursive=True)  # a folder: not listed
    assert root.listing(f"{folder}/out", ".parquet") == sorted(root.path_of(uri) for uri in parquet)
    assert len(root.listing(f"{folder}/out")) == 5  # every file, none of the folders
    assert root.listing(f"{folder}/missing", ".parquet") == []  # a job that wrote nothing yet


def test_parquet_through_the_roots_filesystem(root, folder):
    table = pa.table({
        "id": pa.array(range(2000), pa.int64()),
        "text": [f"line {i}" for i in range(2000)],
        "vector": pa.array([[float(i), -float(i), 0.5] for i in range(2000)], pa.list_(pa.float32())),
    })
    path = root.path_of(f"{folder}/output/part-0.parquet")
    root.filesystem.create_dir(posixpath.dirname(path), recursive=True)  # a local folder must exist first
    pq.write_table(table, path, filesystem=root.filesystem, row_group_size=500)
    assert root.listing(f"{folder}/output", ".parquet") == [path]
    assert pq.read_metadata(path, filesystem=root.filesystem).num_rows == 2000
    assert pq.read_table(path, filesystem=root.filesystem).equals(table)


def test_path_of_inside_the_root(root):
    assert root.path_of(root.uri) == root.path
    assert root.path_of(root.uri + "/") == root.path
    assert root.path_of(root.uri_of("files", "file-1")) == f"{root.path}/files/file-1"
    assert root.path_of(root.uri_of("a", ".", "b", "..", "c")) == f"{root.path}/a/c"  # normalized, still inside


@pytest.mark.parametrize("rest", ["/..", "/../other/x", "/a/../../x", "/a/b/../../../x", "/./../x"])
def test_path_of_refuses_dot_dot_escapes(root, rest):
    with pytest.raises(ValueError, match="leaves the storage root"):
        root.path_of(root.uri + rest)


def test_path_of_refuses_uris_outside_the_root(root):
    outside = [root.uri + "-other/x", root.uri + "x", posixpath.dirname(root.uri), posixpath.dirname(root.uri) + "/x",
               "s3://another-bucket/jobs/x", "/etc/passwd", "relative/jobs/x"]
    for uri in outside:
        with pytest.raises(ValueError, match="is not under the storage root"):
            root.path_of(uri)


def test_nothing_outside_the_root_is_read_written_or_deleted(root):
    """Every operation goes through path_of: a URI that escapes never reaches the filesystem."""
    victim = posixpath.join(posixpath.dirname(root.path), f"outside-{uuid.uuid4().hex[:12]}")
    with root.filesystem.open_output_stream(victim) as out:
        out.write(b"keep me")
    escape = root.uri + "/../" + posixpath.basename(victim)
    for attempt in (lambda: root.delete(escape), lambda: put(root, escape, b"overwritten"), lambda: root.size(escape),
                    lambda: list(root.read_chunks(escape)), lambda: root.listing(root.uri + "/..")):
        with pytest.raises(ValueError):
            attempt()
    with root.filesystem.open_input_stream(victim) as stream:
        assert stream.read() == b"keep me"
    root.filesystem.delete_file(victim)


def test_s3_credentials_come_from_the_environment(s3, monkeypatch):
    for name, value in seaweed.aws_env(s3).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(OSError, match="(?i)access.denied|signature|forbidden"):  # the server refuses the signature
        StorageRoot.open(f"s3://{s3.bucket}/jobs", s3.endpoint)


def test_s3_uris_map_to_bucket_and_key(s3, monkeypatch):
    for name, value in seaweed.aws_env(s3).items():
        monkeypatch.setenv(name, value)
    root = StorageRoot.open(f"s3://{s3.bucket}/jobs/", s3.endpoint)  # a trailing slash is dropped
    assert (root.uri, root.path) == (f"s3://{s3.bucket}/jobs", f"{s3.bucket}/jobs")
    uri = root.uri_of("files", "file-abc")
    put(root, uri, b"abc")
    # The same object through a filesystem of the helper's own: the key is the URI's path under the bucket.
    assert s3.filesystem().get_file_info(f"{s3.bucket}/jobs/files/file-abc").size == 3


@pytest.mark.parametrize("uri, expected", [
    ("/data", True),
    ("/data/", True),
    ("/data/in.jsonl", True),
    ("/data/sub/../in.jsonl", True),  # normalized, still inside
    ("file:///data/in.jsonl", True),
    ("/data-other/in.jsonl", False),  # a sibling sharing the prefix
    ("/datain.jsonl", False),
    ("/data/../etc/passwd", False),
    ("/data/sub/../../etc/passwd", False),
    ("file:///data/../etc/passwd", False),
    ("/", False),
    ("/srv", False),
    ("/srv/datasets/a/b.parquet", True),  # the second root
    ("s3://data/in.jsonl", False),  # another scheme: a bucket named like the folder is not the folder
])
def test_within_local_roots(uri, expected):
    assert within(uri, ["/data", "/srv/datasets/"]) is expected


@pytest.mark.parametrize("uri, expected", [
    ("s3://bucket/datasets", True),
    ("s3://bucket/datasets/", True),
    ("s3://bucket/datasets/a/b.parquet", True),
    ("s3://bucket/datasets/a/../b.parquet", True),  # normalized, still inside
    ("s3://bucket/datasets-other/x", False),  # a sibling prefix
    ("s3://bucket/datasetsx", False),
    ("s3://bucket/x", False),
    ("s3://bucket", False),
    ("s3://bucket/datasets/../secret/x", False),
    ("s3://bucket/datasets/a/../../secret/x", False),
    ("s3://bucket-other/datasets/x", False),  # another bucket sharing the prefix
    ("s3://other/datasets/x", False),
    # A `..` never crosses buckets: these are read from bucket `other` (key `../bucket/datasets/x`), not `bucket`.
    ("s3://other/../bucket/datasets/x", False),
    ("s3://other/a/../../bucket/datasets/x", False),
    ("s3://bucket/../bucket/datasets/x", False),  # climbs above its bucket: refused
    ("s3://whole/any/key", True),  # a whole bucket as a root
    ("s3://whole", True),
    ("s3://wholesale/x", False),
    ("s3://whole/../bucket/datasets/x", False),
    ("/bucket/datasets/x", False),  # a local path is no s3 URI
    ("gs://bucket/datasets/x", False),
])
def test_within_s3_roots(uri, expected):
    assert within(uri, ["s3://bucket/datasets", "s3://whole/"]) is expected


def test_within_relative_paths_and_no_roots(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative path is taken from the working folder, as the filesystem takes it
    roots = [str(tmp_path / "data")]
    assert within("data/in.jsonl", roots)
    assert within("./data/sub/../in.jsonl", roots)
    assert not within("data/../in.jsonl", roots)
    assert not within("../data/in.jsonl", roots)
    assert not within("data-other/in.jsonl", roots)
    assert not within(str(tmp_path / "data" / "x"), [])  # no roots: nothing is allowed
