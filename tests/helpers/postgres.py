"""A real PostgreSQL server for the tests, from Debian's `postgresql` package (its initdb and postgres binaries), on a
free loopback port in a folder of its own, stopped and removed afterwards. initdb refuses to run as root: as root the
server runs as the package's `postgres` user."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.helpers.ports import free_port


def binaries() -> Path | None:
    """The newest installed PostgreSQL's bin folder, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parent.parent.name))
    return Path(found[-1]).parent if found else None


def _as_postgres(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@contextlib.contextmanager
def running_postgres() -> Iterator[str]:
    """An SQLAlchemy URL (psycopg) of a fresh server's `postgres` database, user `test`, no password (trust, on
    127.0.0.1 only)."""
    bin_dir = binaries()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL's binaries are not installed (Debian's postgresql package)")
    folder = Path(tempfile.mkdtemp(prefix="embedding-tests-pg-"))
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(folder, user.pw_uid, user.pw_gid)
    data, port = folder / "data", free_port()
    process = None
    try:
        subprocess.run(_as_postgres([str(bin_dir / "initdb"), "-D", str(data), "-U", "test", "--auth=trust",
                                     "--no-sync", "-E", "UTF8"]), check=True, capture_output=True, timeout=120)
        log = folder / "postgres.log"
        with open(log, "wb") as out:  # a file, not a pipe no one reads: a chatty server never blocks on it
            process = subprocess.Popen(_as_postgres([str(bin_dir / "postgres"), "-D", str(data), "-p", str(port),
                                                     "-k", str(folder), "-c", "listen_addresses=127.0.0.1",
                                                     "-c", "fsync=off"]),
                                       stdout=subprocess.DEVNULL, stderr=out)
        url = f"postgresql+psycopg://test@127.0.0.1:{port}/postgres"
        _wait_ready(port, process, log)
        yield url
    finally:
        if process is not None:
            process.terminate()  # SIGTERM: PostgreSQL's smart shutdown; nothing is connected any more
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)
        shutil.rmtree(folder, ignore_errors=True)


def _wait_ready(port: int, process: subprocess.Popen, log: Path) -> None:
    import psycopg

    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"postgres exited ({process.returncode}): {log.read_text(errors='replace')[-2000:]}")
        try:
            psycopg.connect(f"host=127.0.0.1 port={port} user=test dbname=postgres", connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
