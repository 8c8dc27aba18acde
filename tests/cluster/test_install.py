"""The service installs as users install it: `pip install ./client .` and `pip install .`, non-editable, into
clean virtual environments, from a copy of the checkout.

The venvs see this machine's site-packages for the heavy dependencies (Ray, torch, ...: a clean download would
take a CUDA build of torch), and pip may fetch nothing (--no-index): what is tested is that pip resolves the
service's own two distributions and that what it installed runs. The client alone in a venv of its own, with its
dependencies from the index, is tested in test_client.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.paths import ROOT

OFFLINE = ["--no-index", "--no-build-isolation"]  # the other dependencies: this machine's, nothing fetched


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A copy of what a checkout holds for the two packages (pip builds in the source folder)."""
    copy = tmp_path_factory.mktemp("checkout") / "embedding-service"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(
        ".git", "build", "*.egg-info", "__pycache__", "tests", "benchmarks", "docs", "deploy", "monitoring"))
    return copy


def _venv(path: Path) -> Path:
    # No pip or setuptools of its own: the machine's (a venv's bundled setuptools is older and cannot build offline).
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(path)], check=True,
                   timeout=120)
    return path / "bin" / "python"


def _installed(python: Path, cwd: Path) -> dict[str, str]:
    """Our two distributions as this venv has them: name -> where their code is."""
    code = ("import json, embedding_client, embedding_service, gateway\n"
            "print(json.dumps({m.__name__: m.__file__ for m in (embedding_client, embedding_service, gateway)}))")
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120, cwd=cwd, check=True)
    return json.loads(done.stdout)


def _works(python: Path, source: Path, venv: Path) -> None:
    """The installed copy runs: its package data is there, its import graph loads, its command line answers."""
    where = _installed(python, venv)
    assert all(str(venv) in path for path in where.values()), where  # the venv's copies, not the checkout's
    code = ("from embedding_service.model.accuracy import corpus\n"
            "from embedding_service.model.calibration import shipped_path\n"
            "import embedding_service.app, gateway.app\n"
            "assert len(corpus().gate) == 5000\n"
            "assert any(p.name.endswith('.npz') for p in shipped_path('0' * 16).parent.iterdir())\n")
    subprocess.run([python, "-c", code], check=True, timeout=180, cwd=venv)
    printed = subprocess.run([python, "-m", "embedding_service", "node-env", "--config", str(source / "serve-config.yaml")],
                             capture_output=True, text=True, timeout=180, cwd=venv, check=True).stdout
    assert "export RAY_preload_python_modules=embedding_service.proxy.grpc_options" in printed
    check = subprocess.run([python, "-m", "pip", "check"], capture_output=True, check=False, text=True, timeout=180)
    assert "embedding-service" not in check.stdout, check.stdout  # nothing of ours misses a dependency


def test_pip_install_client_and_service_non_editable(source, tmp_path):
    python = _venv(tmp_path / "venv")
    subprocess.run([python, "-m", "pip", "install", "-q", *OFFLINE, str(source / "client"), str(source)],
                   check=True, timeout=600)
    _works(python, source, tmp_path / "venv")


def test_pip_install_service_alone_takes_the_client_beside_it(source, tmp_path):
    python = _venv(tmp_path / "venv")
    subprocess.run([python, "-m", "pip", "install", "-q", *OFFLINE, str(source)], check=True, timeout=600)
    _works(python, source, tmp_path / "venv")
    shown = subprocess.run([python, "-m", "pip", "show", "embedding-service"], capture_output=True, text=True,
                           check=True, timeout=120).stdout
    assert "embedding-service-client" in shown  # what it requires, and pip resolved it from the checkout
