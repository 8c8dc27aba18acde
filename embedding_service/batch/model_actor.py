"""What Ray Data's `map_batches` is handed for a job's pool: a class the runner can name without importing the
model's code. Ray sends a class by reference, so the process that passes it imports its module: handing over the
Encoder itself made each runner import torch and the backends (seconds before its pool could start, and memory
the runner holds for the whole job). Here the Encoder is imported in the model actor, where it runs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from embedding_service.config import JobsSettings, Limits, ModelSettings
from embedding_service.jobs.spec import JobSpec

if TYPE_CHECKING:
    import pyarrow as pa


def actor_model(model: ModelSettings, jobs: JobsSettings) -> ModelSettings:
    """The model's settings in a job's model actor: its threads are jobs.threads_per_actor where that is set."""
    if jobs.threads_per_actor is None:
        return model
    return model.model_copy(update={"threads": jobs.threads_per_actor})


class ModelActor:
    def __init__(self, model: ModelSettings, spec: JobSpec, calls: Limits) -> None:
        from embedding_service.batch.encoder import Encoder

        self.encoder = Encoder(model, spec, calls)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.encoder(batch)
