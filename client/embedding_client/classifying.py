"""Classify calls of the asyncio client (AsyncEmbedClient inherits them): labels and scores per input, in input order.

A job within one call's limits (max_inputs_per_request, max_request_bytes) is one Classify call; a bigger one goes
through ClassifyStream calls within max_inputs_per_stream, results placed by index, a stream that breaks resumed
with only the inputs it had not returned (as embed() does with EmbedStream).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc

from embedding_client import progress as progress_bars
from embedding_client.errors import EmbeddingError
from embedding_client.planning import REQUEST_OVERHEAD, plan_calls
from embedding_client.scoring import scoring_policy
from embedding_client.v1 import embedding_pb2 as pb

# A text, or a pair of texts (a premise and a hypothesis, say) that the model's tokenizer joins.
ClassifyInput = str | tuple[str, str]


@dataclass(frozen=True)
class LabelScore:
    label: str  # the model's id2label name
    label_id: int  # its position in Model.labels
    score: float  # the activation of the label's logit (Model.activation), or the logit with raw_scores


@dataclass(frozen=True)
class Classification:
    labels: list[LabelScore]  # highest score first (ties in label order), top_k of them when asked
    tokens: int  # the model processed, special tokens included

    def scores(self) -> dict[str, float]:
        return {s.label: s.score for s in self.labels}


@dataclass(frozen=True)
class ClassifyResult:
    model: str
    classifications: list[Classification]  # one per input, in input order
    tokens: int


def classify_input(x: ClassifyInput | pb.ClassifyInput) -> pb.ClassifyInput:
    if isinstance(x, str):
        return pb.ClassifyInput(text=x)
    if isinstance(x, pb.ClassifyInput):
        return x
    if isinstance(x, (tuple, list)) and len(x) == 2 and all(isinstance(t, str) for t in x):
        return pb.ClassifyInput(text=x[0], text_pair=x[1])
    raise TypeError(f"a classify input is a text or a (text, text_pair) pair of texts, not {x!r}")


class _Classifications:
    """One classify() call's results as they arrive, by input position."""

    def __init__(self, n: int, report: Callable[[int, int], None]) -> None:
        self.slots: list[Classification | None] = [None] * n
        self.report = report
        self.tokens = 0
        self.model = ""

    def take(self, positions: list[int], reply) -> None:
        fresh = 0
        for p, c in zip(positions, reply.classifications):
            fresh += self.slots[p] is None
            self.slots[p] = Classification([LabelScore(s.label, s.label_id, s.score) for s in c.labels], c.tokens)
        self.tokens += reply.usage.total_tokens
        self.model = reply.model or self.model
        self.report(fresh, len(self.slots))

    def result(self) -> ClassifyResult:
        missing = [p for p, c in enumerate(self.slots) if c is None]
        if missing:  # the service answered without them: a defect there, not a gap to hand back as results
            raise EmbeddingError(grpc.StatusCode.INTERNAL, f"the service returned no result for inputs {missing[:10]}")
        return ClassifyResult(self.model, self.slots, self.tokens)


class ClassifyCalls:
    """Needs the client's limits_within(), call(), deadline() and resumable_stream()."""

    async def classify(self, inputs: Sequence[ClassifyInput], *, model: str = "", top_k: int | None = None,
                       raw_scores: bool = False, truncation: str = "end", progress=None,
                       timeout_s: float | None = None) -> ClassifyResult:
        """Labels with scores of each input (a text or a (text, text_pair) pair), in input order, highest score
        first. `top_k`: labels per input (default: every label, up to the service's max_labels_per_result).
        `raw_scores`: the logits instead of the model's activation. `progress`: as embed()'s."""
        fields = {"model": model, "raw_scores": raw_scores, "truncation": scoring_policy(truncation)}
        if top_k is not None:
            if top_k < 1:
                raise ValueError(f"top_k must be at least 1, got {top_k}")
            fields["top_k"] = top_k
        items = [classify_input(x) for x in inputs]
        deadline = self.deadline(timeout_s)
        report, finish = progress_bars.reporter(progress, len(items), desc="classifying")
        job = _Classifications(len(items), report)
        try:
            if items:
                await self._classify(items, fields, deadline, job)
        finally:
            finish()
        return job.result()

    async def _classify(self, items: list[pb.ClassifyInput], fields: dict, deadline: float,
                        job: _Classifications) -> None:
        limits = await self.limits_within(deadline)
        sizes = [i.ByteSize() for i in items]
        if len(items) <= limits.max_inputs_per_request and sum(sizes) + REQUEST_OVERHEAD <= limits.max_request_bytes:
            reply = await self.call("Classify", pb.ClassifyRequest(inputs=items, **fields), deadline=deadline)
            job.take([c.index for c in reply.classifications], reply)
            return

        def request_of(pending: list[int]) -> pb.ClassifyStreamRequest:
            return pb.ClassifyStreamRequest(inputs=[items[p] for p in pending], **fields)

        for start, end in plan_calls(sizes, limits.max_inputs_per_stream, limits.max_request_bytes):
            await self.resumable_stream("ClassifyStream", request_of, lambda chunk: chunk.classifications, job.take,
                                        list(range(start, end)), deadline)
