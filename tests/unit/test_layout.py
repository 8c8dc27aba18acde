"""The layout follows the processes: what each package imports, and what each thin process loads.

Packages by where their code runs (docs/architecture.md): the router replica (router/), the model replica
(model/), the fleet's recycler (fleet/), Serve's proxy (proxy/), the gateway (gateway/), the batch jobs' manager,
runners and model actors (batch/); below them what crosses processes (wire/), shared asyncio utilities (batching/),
observability/, the jobs' store and storage (jobs/), config.py and kinds.py (the registry of model kinds); above them
the compositions: app.py (Serve's builder), ops/ (the driver: launcher, config file, manifests), cli.py.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.paths import ROOT

HEAVY = ("torch", "transformers", "sentence_transformers")

SHARED = {"kinds", "config", "wire", "batching", "observability", "jobs"}
PROCESSES = {"router", "model", "fleet", "proxy", "gateway", "batch"}
# What each part may import of ours (besides itself and the client library).
ALLOWED = {
    "kinds": set(),
    "config": {"kinds"},
    "wire": {"kinds", "config", "observability"},
    "batching": {"wire"},
    "observability": {"config"},
    "jobs": {"config", "wire"},
    **{process: SHARED for process in PROCESSES},
    # The batch jobs' model actors load models as the replicas do (model/forward.py): one loading path.
    "batch": SHARED | {"model"},
    "app": SHARED | {"router", "model", "fleet", "batch"},
    "ops": SHARED | {"app", "router", "model", "fleet"},
    "cli": SHARED | {"ops", "router", "model"},
    "__main__": {"cli"},
}


def _part(module: str) -> str | None:
    """The part of the layout a module of ours belongs to; None for anything else."""
    names = module.split(".")
    if names[0] == "gateway":
        return "gateway"
    if names[0] != "embedding_service" or len(names) < 2:
        return None
    return names[1]


def _modules() -> dict[str, Path]:
    found = {}
    for package in ("embedding_service", "gateway"):
        for path in (ROOT / package).rglob("*.py"):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[module.removesuffix(".__init__")] = path
    return found


def _imports(path: Path, module: str) -> set[str]:
    """Every module of ours it imports, at its top or inside a function (a lazy import still runs there)."""
    out = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in out if m.split(".")[0] in ("embedding_service", "gateway")}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: {i for i in _imports(p, m) if i in modules and i != m} for m, p in modules.items()}


def test_no_module_imports_a_part_of_a_process_it_does_not_run_in():
    broken = []
    for module, imported in _graph().items():
        part = _part(module)
        for target in imported:
            other = _part(target)
            if other in (None, part) or other in ALLOWED.get(part, set()):
                continue
            broken.append(f"{module} -> {target}")
    assert not broken, broken


def test_the_import_graph_has_no_circles():
    graph = _graph()
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert not circles, circles


def test_every_package_init_is_empty():
    """Ray's raylet imports a proxy module into every worker: its packages' __init__ must cost nothing."""
    inits = [p for p in (ROOT / "embedding_service").rglob("__init__.py")
             if p.read_text().strip() and "calibration" not in str(p)]
    assert not inits, inits


def _loads(code: str, env: dict[str, str] | None = None) -> list[str]:
    """The heavy libraries a fresh interpreter holds after running `code`."""
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {HEAVY + ('ray',)!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, check=False, text=True, timeout=180,
                          cwd=ROOT, env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()


def test_the_gateway_loads_no_torch_transformers_or_ray():
    assert _loads("import gateway.app, gateway.main; gateway.app.create_app(gateway.main.parse_args([]))") == []


@pytest.mark.parametrize("module", [
    "embedding_service.router.deployment",  # the router replica: the ingress
    "embedding_service.router.replica_routing",  # its request router for the model handles
    "embedding_service.proxy.ingress",  # what runs in Serve's proxy
    "embedding_service.fleet.recycler",  # the recycler replica
    "embedding_service.batch.manager",  # the job manager replica
    "embedding_service.batch.runner",  # a job's runner: its Ray Data driver
])
def test_the_thin_processes_load_no_torch_or_transformers(module):
    assert not set(_loads(f"import {module}")) & set(HEAVY)


def test_a_jobs_runner_hands_ray_data_its_pool_without_loading_the_model_code():
    """Ray sends map_batches' class by reference, so the runner (a job's Ray Data driver) imports the module that
    names it: what the runner hands Ray Data for the pool pickles with no torch or transformers loaded."""
    code = ("import embedding_service.batch.runner, ray.cloudpickle\n"
            "from embedding_service.batch.pipeline import embedding_stage\n"
            "from embedding_service.config import JobsSettings, Limits, ModelSettings\n"
            "from embedding_service.jobs.spec import JobSpec\n"
            "spec = JobSpec(source='dataset', model='m', input_uri='unused', input_format='parquet', "
            "text_column='text', id_column='id')\n"
            "stage = embedding_stage(spec, ModelSettings(name='m'), JobsSettings(storage_root='/unused'), Limits())\n"
            "ray.cloudpickle.dumps(stage)")
    assert not set(_loads(code)) & set(HEAVY)


def test_the_drivers_modules_import_no_ray_serve_before_the_apps_environment_is_exported():
    """Serve reads its settings (its gRPC transport between deployments above all) as `ray.serve` is first
    imported; the deployment handles the driver builds keep what it read then. So nothing the run command, the
    benchmark or the tests import before ServeFile.export_app_env may import it (the ops fence once did)."""
    code = ("import sys, embedding_service.cli, embedding_service.ops.launcher, embedding_service.ops.kubernetes, "
            "benchmarks.run\nprint(' '.join(m for m in sys.modules if m.startswith('ray.serve')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, check=False, text=True, timeout=180,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == []


def test_the_preloaded_module_loads_nothing_heavy_into_every_worker():
    loaded = _loads("import embedding_service.proxy.grpc_options",
                    {"EMBEDDING_SERVE_GRPC_OPTIONS": '[["grpc.server.max_pending_requests", 7]]'})
    assert not set(loaded) & set(HEAVY)


def _maps_torch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def test_the_gateways_memory(tmp_path):
    """The gateway as it runs (python -m gateway, after answering), its resident memory (docs/gateway.md)."""
    import httpx

    from tests.helpers.observe import wait_until
    from tests.helpers.ports import free_port

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "gateway", "--targets", "127.0.0.1:1", "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def answering() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(answering, 60, "the gateway answering")
        for _ in range(20):  # requests through its parsing, errors and metrics (no service behind it)
            assert httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"input": 3}, timeout=30).status_code == 400
            httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30)
        status = Path(f"/proc/{process.pid}/status").read_text()
        rss_mib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) / 1024
        print(f"the gateway's resident memory: {rss_mib:.0f} MiB")
        assert not _maps_torch(process.pid)
        assert rss_mib < 160, rss_mib  # with torch loaded it was 270 MiB
    finally:
        process.kill()
        process.wait(timeout=30)


def test_the_suite_has_two_tiers_and_its_shared_code_lives_in_its_helpers():
    """Every test module is in tests/unit/ or tests/cluster/ and imports no other test module: what two test modules
    share is in tests/helpers/, which imports no test module either (so a tier runs alone)."""
    tests = ROOT / "tests"
    modules = sorted(tests.rglob("test_*.py"))
    assert modules and all(p.parent.name in ("unit", "cluster") and p.parent.parent == tests for p in modules), \
        [str(p.relative_to(ROOT)) for p in modules if p.parent.parent != tests]
    broken = []
    for path in [*modules, *(tests / "helpers").glob("*.py"), *tests.rglob("conftest.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            relative = isinstance(node, ast.ImportFrom) and node.level
            if relative or any(n.startswith("tests.") and not n.startswith("tests.helpers") for n in names):
                broken.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not broken, broken
