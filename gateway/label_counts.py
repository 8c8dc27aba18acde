"""How many labels each classification model has, for vLLM's /v1/classify, whose `probs` hold every label's score.

A Classify reply without top_k holds every label only up to the service's max_labels_per_result, and cannot say
whether it was cut. The model's labels (GetModel) can: they are kept per model name, and asked again whenever a reply
disagrees with them, so a model served anew with other labels is seen at its first reply. Models are few, and the
names kept are those the service answered with.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from embedding_client.v1 import embedding_pb2 as pb


def _whole(reply: pb.ClassifyResponse, count: int) -> bool:
    return all(len(c.labels) == count for c in reply.classifications)


class LabelCounts:
    def __init__(self) -> None:
        self._by_model: dict[str, int] = {}

    async def of(self, reply: pb.ClassifyResponse, get_model: Callable[[str], Awaitable[pb.Model]]) -> int | None:
        """The labels of the model that answered `reply`, or None when its results were cut (it has more labels
        than the service returns per result); `get_model(name)`: the service's GetModel."""
        known = self._by_model.get(reply.model)
        if known is None or not _whole(reply, known):
            known = self._by_model[reply.model] = len((await get_model(reply.model)).labels)
        return known if _whole(reply, known) else None
