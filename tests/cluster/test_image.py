"""The container image, as the project ships it: built with buildah from deploy/docker/Dockerfile, its default
command run and probed from outside and inside (scripts/image.sh, scripts/image_check.py), and the manifests
rendered for the tag built. These run last in the session (tests/conftest.py), their build started with it in the
background (tests/helpers/image.py); the image's Ray uses Ray's default ports on the host's network, which the
session's own Ray leaves free."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests.helpers.image import run_script
from tests.helpers.paths import ROOT

IMAGE = "localhost/embedding-service:0.1.0-cpu"
pytestmark = pytest.mark.timeout(3600)


@pytest.fixture(scope="module")
def built(image_build) -> tuple[str, str]:
    """The build the session started in the background (tests/helpers/image.py)."""
    done = image_build.result()
    assert done.returncode == 0, f"scripts/image.sh build failed:\n{done.stderr[-6000:]}"
    return done.stdout.strip().splitlines()[-1], done.stderr


def _buildah_run(tag: str, *command: str) -> str:
    ctr = subprocess.run(["buildah", "from", "--pull-never", tag], check=True, capture_output=True,
                         text=True).stdout.strip()
    try:
        return subprocess.run(["buildah", "run", "--isolation", "chroot", ctr, "--", *command], check=True,
                              capture_output=True, text=True, timeout=300).stdout
    finally:
        subprocess.run(["buildah", "rm", ctr], capture_output=True)


def test_the_image_serves_from_its_default_command_and_stops_on_sigterm(built, tmp_path):
    tag, log = built
    assert tag == IMAGE
    # Where no registry answers the build says so, and names the stand-in it used.
    assert "FROM docker.io/library/python:" in log or "LOCAL STAND-IN" in log, log[-3000:]
    done = run_script("check", str(tmp_path / "report.json"), timeout=1500)
    assert (tmp_path / "report.json").exists(), done.stderr[-4000:] + done.stdout[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["failed"] == [] and done.returncode == 0, report
    assert report["health"] == "SERVING" and report["model"] == "all-MiniLM-L6-v2"
    assert report["embed_max_abs_diff"] <= 1e-5 and report["openai_max_abs_diff"] <= 1e-5
    assert report["metrics"] and all(m["service_metrics"] and m["serve_metrics"] for m in report["metrics"])
    assert report["gateway_metrics"]["gateway_metrics"]
    assert report["uids"] == [1000] and report["processes"] >= 3  # the run command, Ray's daemons, replicas
    assert report["image_config"]["user"] == "1000:1000"
    assert report["offline_env"] == {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    assert report["offline_load"] == {"returncode": 0, "dimensions": 384, "stderr_tail": ""}
    assert report["stop"]["exited_s"] <= report["stop"]["bound_s"] and report["stop"]["left_behind"] == 0


def test_the_image_holds_an_installed_service_and_no_checkout(built):
    tag, _ = built
    code = ("import embedding_service, gateway, embedding_client, json, os, site; print(json.dumps({"
            "'files': [m.__file__ for m in (embedding_service, gateway, embedding_client)],"
            "'editable': [f for f in os.listdir(site.getsitepackages()[0]) if f.startswith('__editable__') or f.endswith('.egg-link')],"
            "'checkout': sorted(os.listdir('/opt/embedding-service')),"
            "'caches': [p for p in ('/root/.cache', '/home/ray/.cache') if os.path.exists(p)]}))")
    found = json.loads(_buildah_run(tag, "python3", "-c", code).strip().splitlines()[-1])
    assert all(f.startswith("/opt/venv/lib/python3.11/site-packages/") for f in found["files"]), found
    assert found["editable"] == [] and found["caches"] == []
    assert found["checkout"] == ["serve-config.yaml"]  # no sources, tests or benchmark results
    # The copy of the config the image serves is the repository's.
    assert _buildah_run(tag, "cat", "/opt/embedding-service/serve-config.yaml") == (ROOT / "serve-config.yaml").read_text()


def test_the_manifests_rendered_for_the_built_tag_name_it_and_its_ray(built, tmp_path):
    tag, _ = built
    out = tmp_path / "k8s"
    subprocess.run([sys.executable, "-m", "embedding_service", "render-k8s", "--out", str(out), "--image", tag,
                    "--gpu-image", tag.replace("-cpu", "-cuda")], check=True, capture_output=True, cwd=ROOT)
    docs = [d for f in sorted(out.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    images = _images(docs)
    assert images and set(images) == {tag, tag.replace("-cpu", "-cuda")} and images.count(tag) >= 3
    ray_version = _buildah_run(tag, "python3", "-c", "import ray; print(ray.__version__)").strip()
    assert {d["spec"]["rayClusterConfig"]["rayVersion"] for d in docs if d.get("kind") == "RayService"} == {ray_version}
    # The committed manifests name the same image and tag, in their example registry.
    committed = [yaml.safe_load_all(f.read_text()) for f in (ROOT / "deploy" / "kubernetes").glob("*.yaml")]
    names = {i.split("/", 1)[1] for i in _images([d for ds in committed for d in ds if d])}
    assert names == {i.split("/", 1)[1] for i in images}


def _images(node) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "image" and isinstance(v, str)] + \
            [i for k, v in node.items() if k != "image" for i in _images(v)]
    if isinstance(node, list):
        return [i for v in node for i in _images(v)]
    return []
