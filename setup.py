"""The service's dependencies: requirements/service.txt, and the client library it is built beside.

Both come from this repository, and only the client is on no package index: built from a checkout, the service
depends on the checkout's client/ by its file URL, so `pip install .` and `pip install ./client .` both work.
EMBEDDING_SERVICE_CLIENT_REQUIREMENT replaces that requirement: scripts/install.sh sets it to the version, which
the editable client it installs in the same command satisfies (pip refuses an editable and a file URL of one
project together), and a release built for an index would set it the same way.
"""

import os
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
CLIENT = HERE / "client"


def _client_requirement() -> str:
    given = os.environ.get("EMBEDDING_SERVICE_CLIENT_REQUIREMENT")
    if given:
        return given
    if (CLIENT / "pyproject.toml").is_file():
        return f"embedding-service-client @ {CLIENT.as_uri()}"
    return "embedding-service-client==0.1.0"


def _requirements() -> list[str]:
    lines = (HERE / "requirements" / "service.txt").read_text().splitlines()
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


setup(install_requires=[_client_requirement(), *_requirements()])
