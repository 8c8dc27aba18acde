"""A dataset job's rows are bounded as online inputs are: a row whose text is missing, empty or past
max_chars_per_input fails the job with an error naming the row by its id, before any of the batch is tokenized;
rows within the bounds are embedded as sentence-transformers embeds them."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from embedding_service.batch.encoder import BadRow, Encoder
from embedding_service.batch.model_actor import ModelActor, actor_model
from embedding_service.config import JobsSettings, Limits, ModelSettings
from embedding_service.jobs.spec import JobSpec
from tests.helpers.models import TINY

LIMIT = 50
SPEC = JobSpec(source="dataset", model=TINY, input_uri="unused", input_format="parquet", text_column="body",
               id_column="doc_id")


@pytest.fixture(scope="module")
def encoder(tiny_model_dir):
    settings = ModelSettings(name=TINY, path=str(tiny_model_dir), device="cpu", backend="torch")
    return Encoder(settings, SPEC, Limits(max_chars_per_input=LIMIT))


def _batch(texts) -> pa.Table:
    return pa.table({"doc_id": [f"d{i}" for i in range(len(texts))], "body": pa.array(texts, type=pa.string())})


def test_rows_within_the_bounds_equal_sentence_transformers(encoder, reference_models):
    texts = ["a short one", "é" * LIMIT, "two words"]  # characters, not bytes: 50 accented letters are within
    out = encoder(_batch(texts))
    assert out.column("doc_id").to_pylist() == ["d0", "d1", "d2"]
    got = np.stack(out.column("embedding").to_numpy(zero_copy_only=False))
    expected = reference_models[TINY].encode(texts, normalize_embeddings=True)
    assert np.abs(got - expected).max() < 1e-5


@pytest.mark.parametrize(("texts", "message"), [
    (["fine", "x" * (LIMIT + 1)], "row 'd1': its 'body' has 51 characters; the limit is 50"),
    (["fine", None, "x" * 99], "row 'd1': its 'body' is empty or missing"),
    (["fine", ""], "row 'd1': its 'body' is empty or missing"),
])
def test_a_bad_row_fails_the_batch_naming_its_id(encoder, texts, message):
    with pytest.raises(BadRow) as refused:
        encoder(_batch(texts))
    assert str(refused.value) == message


def test_a_column_that_is_not_text_is_refused(encoder):
    with pytest.raises(BadRow, match="column 'body' holds int64, not text"):
        encoder(pa.table({"doc_id": ["d0"], "body": [7]}))


def test_a_model_actor_runs_its_model_with_the_jobs_threads_per_actor(tiny_model_dir, reference_models):
    """jobs.threads_per_actor reaches the backend in a job's model actor (OpenVINO's compiled model says how many
    threads it runs), and the vectors are the same; unset, the actor keeps the model's own threads."""
    import torch

    model = ModelSettings(name=TINY, path=str(tiny_model_dir), device="cpu", backend="openvino", threads=2)
    assert actor_model(model, JobsSettings(storage_root="/unused")).threads == 2
    kept = torch.get_num_threads()  # load_model sets torch's threads process-wide
    try:
        actor = ModelActor(actor_model(model, JobsSettings(storage_root="/unused", threads_per_actor=1)), SPEC,
                           Limits(max_chars_per_input=LIMIT))
        assert actor.encoder.loaded.runtime.compiled.get_property("INFERENCE_NUM_THREADS") == 1
        texts = ["one thread", "the same vectors"]
        got = np.stack(actor(_batch(texts)).column("embedding").to_numpy(zero_copy_only=False))
    finally:
        torch.set_num_threads(kept)
    assert np.abs(got - reference_models[TINY].encode(texts, normalize_embeddings=True)).max() < 1e-5
