"""The container image's script (scripts/image.sh), run for the tests: its build starts in the background as the
session starts, when the session holds the image's tests, so that it overlaps the unit tier (the build is mostly pip
unpacking wheels and buildah writing layers; the unit tier mostly one core of Python)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading

from tests.helpers.paths import ROOT

BUILD_TIMEOUT_S = 2400


def run_script(*args: str, timeout: float) -> subprocess.CompletedProcess:
    """scripts/image.sh with `args`, its IMAGE and BASE_IMAGE its own defaults."""
    env = {k: v for k, v in os.environ.items() if k not in ("IMAGE", "BASE_IMAGE")}
    return subprocess.run([str(ROOT / "scripts" / "image.sh"), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)


class BackgroundBuild:
    """`scripts/image.sh build` in a process group of its own, read by a thread; `result()` waits for it, `stop()` ends
    it (a session that ends before the image's tests must not leave a build running)."""

    def __init__(self) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("IMAGE", "BASE_IMAGE")}
        self._process = subprocess.Popen([str(ROOT / "scripts" / "image.sh"), "build"], stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
        self._done: subprocess.CompletedProcess | None = None
        self._thread = threading.Thread(target=self._read, name="image build", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        stdout, stderr = self._process.communicate()
        self._done = subprocess.CompletedProcess(self._process.args, self._process.returncode, stdout, stderr)

    def result(self) -> subprocess.CompletedProcess:
        self._thread.join(BUILD_TIMEOUT_S)
        if self._done is None:
            self.stop()
            raise TimeoutError(f"the image's build took over {BUILD_TIMEOUT_S} s")
        return self._done

    def stop(self) -> None:
        if self._process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait(timeout=30)
