"""The docs a newcomer reads: the README a front page that maps docs/, every link resolving, and the generated
tables (error reasons from the proto, metrics from their declarations, settings from the configuration models)
equal to their sources."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import get_args, get_origin

from pydantic import BaseModel

from tests.helpers import scripts
from tests.helpers.paths import ROOT

DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS, ROOT / "benchmarks" / "results" / "HISTORY.md"]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_the_generated_tables_equal_their_sources():
    for path, text in scripts.load("generate_docs").rendered().items():
        assert path.read_text() == text, f"{path.relative_to(ROOT)} is stale: run python scripts/generate_docs.py"


def test_the_reason_table_lists_every_reason_of_the_proto_with_its_code():
    from embedding_service.wire.reasons import STATUS_CODES

    errors = (ROOT / "docs" / "errors.md").read_text()
    rows = dict(re.findall(r"^\| `([A-Z_]+)` \| ([A-Z_]+) \|", errors, re.MULTILINE))
    assert rows == {reason.name: code.name for reason, code in STATUS_CODES.items()}


def test_the_metric_table_lists_every_metric_defined_and_no_other():
    from embedding_service.observability.metrics import SPECS
    from gateway.metrics import GatewayMetrics

    gateway = {family.name + ("_total" if family.type == "counter" else "")
               for family in GatewayMetrics().registry.collect()}  # as the gateway exports them
    monitoring = (ROOT / "docs" / "monitoring.md").read_text()
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", monitoring, re.MULTILINE))
    assert documented == {s.exported for s in SPECS} | gateway


def _settings(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, object]]:
    """(dotted path as in serve-config.yaml's args, field) of every field of `model` and of the models inside it."""
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        yield path, field
        for inner in (field.annotation, *get_args(field.annotation)):
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                yield from _settings(inner, f"{path}{'[]' if get_origin(field.annotation) is list else ''}.")


def test_every_setting_has_a_meaning_and_a_row_in_the_configuration_page():
    from embedding_service.config import AppArgs
    from gateway.settings import GatewaySettings

    args, gateway = list(_settings(AppArgs)), list(_settings(GatewaySettings))
    assert {"models[].long_inputs.window_tokens", "limits.request_timeout_s", "models[].autoscaling.max_replicas",
            "tracing.sample_ratio"} <= dict(args).keys()
    undescribed = [path for path, field in args + gateway if not (field.description or "").strip()]
    assert not undescribed, undescribed

    page = (ROOT / "docs" / "configuration.md").read_text()
    rows = re.findall(r"^\| `([^`]+)`[^|]*\| (?:`(GATEWAY_\w+)`)?", page, re.MULTILINE)
    assert sorted(path for path, env in rows if not env) == sorted(path for path, _ in args)
    assert sorted((path, env) for path, env in rows if env) == sorted((p, f"GATEWAY_{p.upper()}") for p, _ in gateway)


def test_the_readme_is_a_front_page_that_maps_every_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 10 * 1024
    linked = {(ROOT / target).resolve() for target in LINK.findall(readme)}
    assert set(DOCS) <= linked, sorted(str(p.relative_to(ROOT)) for p in set(DOCS) - linked)
    for command in ("scripts/install.sh && python3 -m embedding_service run",
                    "scripts/install.sh test && python3 -m pytest -q"):
        assert f"\n{command}\n" in readme, command


def test_every_link_between_the_pages_resolves():
    broken = [f"{page.relative_to(ROOT)} -> {target}" for page in PAGES for target in LINK.findall(page.read_text())
              if not target.startswith(("http://", "https://")) and not (page.parent / target).exists()]
    assert not broken, broken


def test_every_module_path_the_docs_name_exists():
    """`embedding_service/...py`, `gateway/...py` and `tests/...py` named in the docs are files of the tree (no stale
    paths)."""
    named = {m for page in PAGES
             for m in re.findall(r"`((?:embedding_service|gateway|tests)/[\w/]+\.py)(?:::\w+)?`", page.read_text())}
    missing = sorted(m for m in named if not (ROOT / m).exists())
    assert not missing, missing
