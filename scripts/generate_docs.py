"""Generate the docs' tables from their sources: the error reasons from the proto, the metrics from their specs, the
settings from the configuration models.

Run from anywhere: `python scripts/generate_docs.py`. It rewrites the part of docs/errors.md, docs/monitoring.md
and docs/configuration.md between their `<!-- name:begin -->` and `<!-- name:end -->` markers;
tests/unit/test_docs.py renders them again and fails on any difference, so the tables never drift from the proto
and the code.
"""

from __future__ import annotations

import inspect
import json
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

ROOT = Path(__file__).resolve().parent.parent
REASONS_PROTO = ROOT / "protos" / "embedding_service" / "v1" / "error_reason.proto"
ERRORS = ROOT / "docs" / "errors.md"
MONITORING = ROOT / "docs" / "monitoring.md"
CONFIGURATION = ROOT / "docs" / "configuration.md"
_VALUE = re.compile(r'^\s*ERROR_REASON_(\w+)\s*=\s*(\d+)\s*\[\(status_code\)\s*=\s*"(\w+)"\];')


def reason_rows() -> list[tuple[str, str, str]]:
    """(reason, status code, meaning) of every ErrorReason value, from the proto's text and comments."""
    rows, comment = [], []
    for line in REASONS_PROTO.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("//"):
            comment.append(stripped.removeprefix("//").strip())
            continue
        match = _VALUE.match(line)
        if match:
            name, _, code = match.groups()
            meaning = " ".join(comment)
            meaning = meaning.removeprefix(f"{code}:").strip()
            rows.append((name, code, meaning))
        comment = []
    return rows


def reasons_table() -> str:
    lines = ["| reason | status code | when |", "|---|---|---|"]
    lines += [f"| `{name}` | {code} | {meaning} |" for name, code, meaning in reason_rows()]
    return "\n".join(lines)


def metrics_table() -> str:
    from embedding_service.observability.metrics import SPECS
    from gateway.metrics import SPECS as GATEWAY_SPECS

    lines = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    lines += [f"| `{s.exported}` | {s.kind} | {', '.join(s.tags)} | {s.description} |" for s in SPECS]
    lines += [f"| `{s.exported}` | {s.kind} | {', '.join(s.labels)} | {s.description} |"
              for s in GATEWAY_SPECS.values()]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _section_model(annotation: Any) -> type | None:
    """The settings model a field's annotation holds (`X`, `X | None`, `list[X]`), if any."""
    from pydantic import BaseModel

    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def sections(model: type, path: str = "") -> Iterator[tuple[str, type]]:
    """(path, model) of `model` and of every settings model nested in it, depth first in field order; a list's
    path ends in `[]` (`models[]`, `models[].long_inputs`)."""
    yield path, model
    for name, field in model.model_fields.items():
        inner = _section_model(field.annotation)
        if inner is not None:
            listed = "[]" if get_origin(field.annotation) is list else ""
            yield from sections(inner, f"{path}.{name}{listed}" if path else f"{name}{listed}")


def _type(annotation: Any) -> str:
    from pydantic import BaseModel, SecretStr

    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_type(a) for a in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type(a) for a in args)}]"
    if annotation is type(None):
        return "null"
    if annotation is Any:
        return "any"
    if annotation is SecretStr:
        return "str (secret)"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return annotation.__name__


def _default(field) -> str:
    from pydantic import BaseModel

    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "its settings' defaults"
    if isinstance(value, list):
        value = [v.model_dump(mode="json", exclude_defaults=True) if isinstance(v, BaseModel) else v for v in value]
    return f"`{json.dumps(value)}`"


def _constraints(field) -> str:
    bounds = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "length >=", "max_length": "length <="}
    found = []
    for meta in field.metadata:
        for attribute, sign in bounds.items():
            if getattr(meta, attribute, None) is not None:
                found.append(f"{sign} {getattr(meta, attribute)}")
        if getattr(meta, "pattern", None) is not None:
            found.append(f"pattern `{meta.pattern}`")
    return ", ".join(found)


def _aliases(field) -> list[str]:
    alias = field.validation_alias
    return [alias] if isinstance(alias, str) else [a for a in getattr(alias, "choices", []) if isinstance(a, str)]


def _setting(path: str, name: str, field) -> str:
    others = [a for a in _aliases(field) if a != name]
    return f"`{path}`" + "".join(f" (or `{a}`)" for a in others)


def _doc(model: type) -> str:
    return " ".join(inspect.cleandoc(model.__doc__ or "").split())


def env_names(settings: type) -> dict[str, str]:
    """The environment variable pydantic-settings reads each field of a BaseSettings class from."""
    config = settings.model_config
    names = {}
    for name, field in settings.model_fields.items():
        aliases = _aliases(field)
        env = " or ".join(aliases) if aliases else config.get("env_prefix", "") + name
        names[name] = env if config.get("case_sensitive") else env.upper()
    return names


def _args_table(path: str, model: type) -> list[str]:
    lines = ["| setting | type | default | constraints | meaning |", "|---|---|---|---|---|"]
    for name, field in model.model_fields.items():
        setting = f"{path}.{name}" if path else name
        below = " (below)" if _section_model(field.annotation) else ""
        lines.append(f"| {_setting(setting, name, field)} | `{_cell(_type(field.annotation))}`{below} | "
                     f"{_default(field)} | {_cell(_constraints(field))} | {_cell(field.description or '')} |")
    return lines


def configuration_tables() -> str:
    """Every setting of serve-config.yaml's `applications[].args` (config.AppArgs, section by section), then the
    gateway's (GatewaySettings, with the environment variable and the flag each is read from)."""
    from embedding_service.config import AppArgs
    from gateway.main import arguments
    from gateway.settings import GatewaySettings

    parts = []
    for path, model in sections(AppArgs):
        parts += [f"## `{path or 'applications[].args'}`", "", _doc(model), "", *_args_table(path, model), ""]
    env = env_names(GatewaySettings)
    flags = {a.dest: a.option_strings[-1] for a in arguments()._actions if a.option_strings and a.dest != "help"}
    parts += ["## The gateway (`python -m gateway`)", "", _doc(GatewaySettings), "",
              "| setting | environment variable | flag | type | default | constraints | meaning |",
              "|---|---|---|---|---|---|---|"]
    for name, field in GatewaySettings.model_fields.items():
        flag = f"`{flags[name]}`" if name in flags else "-"
        parts.append(f"| {_setting(name, name, field)} | `{env[name]}` | {flag} | `{_cell(_type(field.annotation))}` | "
                     f"{_default(field)} | {_cell(_constraints(field))} | {_cell(field.description or '')} |")
    return "\n".join(parts)


def replaced(text: str, name: str, table: str) -> str:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    head, found, rest = text.partition(begin)
    if not found or end not in rest:
        raise ValueError(f"no {begin} ... {end} in the page")
    return f"{head}{begin}\n{table}\n{end}{rest.partition(end)[2]}"


def rendered() -> dict[Path, str]:
    """Each generated page's text as it should be."""
    return {ERRORS: replaced(ERRORS.read_text(), "reasons", reasons_table()),
            MONITORING: replaced(MONITORING.read_text(), "metrics", metrics_table()),
            CONFIGURATION: replaced(CONFIGURATION.read_text(), "configuration", configuration_tables())}


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    for path, text in rendered().items():
        path.write_text(text)
        print(path.relative_to(ROOT))
