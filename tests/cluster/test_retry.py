"""A mini-batch whose replica dies mid-request is retried on a live replica."""

from __future__ import annotations

import threading
import time

import numpy as np
import ray

from embedding_client.v1 import embedding_pb2 as pb
from embedding_service.wire.messages import model_deployment_name
from tests.helpers.models import MINILM
from tests.helpers.observe import scrape, wait_until
from tests.helpers.replicas import replica_actors, wait_healthy
from tests.helpers.session import REQUEST_TIMEOUT_S
from tests.helpers.texts import make_texts, text_inputs, vectors_of


def forwarded_by_replica() -> dict[str, float]:
    return {s.labels["replica"]: s.value for s in scrape()
            if s.name == "ray_embedding_sequences_forwarded_total" and s.labels.get("model") == MINILM}


# The call lasts about this long at the model's measured speed (both replicas): long enough that its shards are seen
# at both replicas (Ray reports metrics every half second, then a scrape) before it ends, however fast the machine;
# and within the service's request bound with a replica lost, however slow. Long texts, so that a fast machine's
# seconds of work stay within the inputs a call may hold (short ones sized a call past it on a fast machine: the
# call was refused, TOO_MANY_INPUTS, before the test could kill a replica).
TARGET_S = 6.0
MAX_WORDS = 200


def sized_for(service, seconds: float) -> int:
    """Inputs of make_texts(max_words=MAX_WORDS) the model embeds in about `seconds` on both replicas, measured now,
    within the inputs a call may hold."""
    probe = make_texts(128, seed=22, max_words=MAX_WORDS)
    took = []
    for _ in range(3):  # the fastest of three: replicas just started (the recycler's tests) run their first calls slow
        started = time.perf_counter()
        service.stub.Embed(pb.EmbedRequest(inputs=text_inputs(probe)), timeout=60)
        took.append(time.perf_counter() - started)
    rate = len(probe) / min(took)
    most = rate / 2 * REQUEST_TIMEOUT_S / 3  # a third of the bound on one replica
    limit = service.stub.ListModels(pb.ListModelsRequest(), timeout=30).limits.max_inputs_per_request
    return int(min(max(256, min(rate * seconds, most)), limit))


def test_killed_replica_mid_request_is_retried(service, reference_models):
    deployment = model_deployment_name(MINILM)
    replicas = replica_actors(deployment)
    assert len(replicas) == 2, replicas

    texts = make_texts(sized_for(service, TARGET_S), seed=23, max_words=MAX_WORDS)
    outcome: dict = {}

    def call():
        try:
            outcome["response"] = service.stub.Embed(pb.EmbedRequest(inputs=text_inputs(texts)), timeout=300)
        except Exception as exc:  # reported below
            outcome["error"] = exc

    before = forwarded_by_replica()
    caller = threading.Thread(target=call)
    caller.start()

    def both_replicas_working_or_ended() -> bool:
        now = forwarded_by_replica()
        return sum(now[r] > before.get(r, 0) for r in now) >= 2 or not caller.is_alive()

    wait_until(both_replicas_working_or_ended, 60, "shards at both replicas")
    assert caller.is_alive(), (f"the request ({len(texts)} inputs) ended before a replica could be killed: "
                               f"{outcome.get('error') or 'answered'}")
    victim = replicas[0]
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
    caller.join(timeout=300)

    assert "error" not in outcome, outcome.get("error")
    response = outcome["response"]
    assert [e.index for e in response.embeddings] == list(range(len(texts)))
    expected = reference_models[MINILM].encode(texts, normalize_embeddings=True)
    assert np.abs(vectors_of(response) - expected).max() < 1e-5

    # Serve replaces the dead replica; the service is whole again.
    wait_healthy()
    names = {a["name"] for a in replica_actors(deployment)}
    assert len(names) == 2 and victim["name"] not in names
