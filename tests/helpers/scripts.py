"""The repository's scripts/ as modules, for the tests that check what they generate."""

from __future__ import annotations

import importlib.util
from types import ModuleType

from tests.helpers.paths import ROOT

SCRIPTS = ROOT / "scripts"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
