"""A mini-batch whose replica dies mid-request is retried on a live replica."""

from __future__ import annotations

import threading

import numpy as np

from embedding_client.v1 import embedding_pb2 as pb
from embedding_service.wire.messages import model_deployment_name
from tests.helpers.models import MINILM
from tests.helpers.observe import total, wait_until
from tests.helpers.replicas import first_working, replica_actors, replica_processes, wait_healthy
from tests.helpers.texts import make_texts, text_inputs, vectors_of

RETRIED = "ray_embedding_shard_retries_total"

# Long texts: the call runs for seconds on a fast machine, far longer than it takes to see a replica computing (a
# tenth of a second); on a slow one, with a replica lost, well within the service's request bound (docs/testing.md).
INPUTS = 256
MAX_WORDS = 200


def test_a_replica_killed_while_it_computes_a_shard_has_the_shard_retried(service, reference_models):
    deployment = model_deployment_name(MINILM)
    replicas = {a["name"] for a in replica_actors(deployment)}
    assert len(replicas) == 2, replicas
    # A replica an earlier test replaced may still be shutting down.
    wait_until(lambda: len(replica_processes(deployment)) == 2, 60, "two replica processes")
    processes = replica_processes(deployment)

    texts = make_texts(INPUTS, seed=23, max_words=MAX_WORDS)
    outcome: dict = {}

    def call():
        try:
            outcome["response"] = service.stub.Embed(pb.EmbedRequest(inputs=text_inputs(texts)), timeout=300)
        except Exception as exc:  # reported below
            outcome["error"] = exc

    retried_before = total(RETRIED, model=MINILM)
    caller = threading.Thread(target=call)
    caller.start()
    # Killed the moment it is seen computing (the replica's own CPU, not metrics Ray reports later): the shard it
    # runs dies with it, as when the kernel's OOM killer or a lost node takes a replica.
    victim = first_working(processes, until=lambda: not caller.is_alive(), timeout_s=60)
    assert victim is not None and caller.is_alive(), (
        f"no replica was seen computing while the request ({len(texts)} inputs) ran: "
        f"{outcome.get('error') or ('answered' if 'response' in outcome else 'still running')}")
    victim.kill()
    caller.join(timeout=300)

    assert "error" not in outcome, outcome.get("error")
    response = outcome["response"]
    assert [e.index for e in response.embeddings] == list(range(len(texts)))
    expected = reference_models[MINILM].encode(texts, normalize_embeddings=True)
    assert np.abs(vectors_of(response) - expected).max() < 1e-5
    # The shard the victim was computing was sent again (counted by the error's class).
    wait_until(lambda: total(RETRIED, model=MINILM) > retried_before, 30, "the lost shard counted as retried")

    # Serve replaces the dead replica; the service is whole again.
    def replaced() -> bool:
        names = {a["name"] for a in replica_actors(deployment)}
        return len(names) == 2 and len(names & replicas) == 1

    wait_until(replaced, 120, "the killed replica replaced")
    wait_healthy()
