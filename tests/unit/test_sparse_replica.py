"""A sparse (SPLADE) replica built in-process through its constructor, as Serve builds it: what it says of its model."""

from __future__ import annotations

import asyncio
import json

from embedding_service.config import ModelSettings
from embedding_service.model.scoring import SparseModel
from embedding_service.model.watchdog import Placement
from tests.helpers.models import SPLADE
from tests.helpers.recycler import RecyclerHandle


def test_a_sparse_replica_reports_the_vocabulary_as_its_dimension_for_a_model_that_never_ran(scoring_model_dirs):
    """The tiny SPLADE model is saved before it ever ran: its pooling module does not know its output size yet."""
    folder = scoring_model_dirs[SPLADE]
    assert json.loads((folder / "1_SpladePooling" / "config.json").read_text())["embedding_dimension"] is None
    settings = ModelSettings(name=SPLADE, kind="sparse", path=str(folder), device="cpu")

    async def main() -> tuple[int, int]:
        replica = SparseModel(settings, RecyclerHandle(), heartbeat_s=3600, placement=Placement("node-1", "r-1"))
        try:
            return replica.info.dimension, replica.info.vocab_size
        finally:
            await replica.close()

    dimension, vocabulary = asyncio.run(main())
    assert dimension == vocabulary == 30522
