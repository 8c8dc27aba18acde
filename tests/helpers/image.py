"""The container image's script (scripts/image.sh), run for the tests: its build starts in the background as the
session starts, when the session holds the image's tests, so that it overlaps the unit tier (the build is mostly pip
unpacking wheels and buildah writing layers; the unit tier mostly one core of Python)."""

from __future__ import annotations

import os
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
    """`scripts/image.sh build` in a thread of its own; `result()` waits for it."""

    def __init__(self) -> None:
        self._done: subprocess.CompletedProcess | BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="image build", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._done = run_script("build", timeout=BUILD_TIMEOUT_S)
        except BaseException as exc:  # the waiting test reports it
            self._done = exc

    def result(self) -> subprocess.CompletedProcess:
        self._thread.join(BUILD_TIMEOUT_S)
        if isinstance(self._done, BaseException):
            raise self._done
        assert self._done is not None, "the image's build did not end"
        return self._done
