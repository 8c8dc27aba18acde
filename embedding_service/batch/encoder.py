"""A batch job's model actor: what Ray Data's `map_batches` runs in each actor of the job's pool.

It loads the model with the replicas' own path (an embedding model: model/forward.py load_model, with its backend,
precision, start-up canary and accuracy gate; a reranker: model/scoring.py RerankScorer) and refuses to run what
the gate refused. It computes with their forward passes (passes within the model's token budget), then cuts,
normalizes and packs vectors as a replica's `shape` does, or ranks scores as the router does. Row shapes:

- a dataset's rows (id, text) -> (id, embedding: a fixed-size list of the encoding's type, tokens);
- an OpenAI batch's lines (row, custom_id, then the endpoint's columns: openai_input.SCHEMAS) -> (row, custom_id,
  status_code, body: the /v1/embeddings or /v1/rerank body as JSON, tokens).
"""

from __future__ import annotations

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from embedding_service.config import Limits, ModelSettings
from embedding_service.jobs.openai_batch import RERANK
from embedding_service.jobs.spec import JobSpec
from embedding_service.model.forward import embed_texts, load_model, plan_passes, reference_vectors
from embedding_service.model.quantization import postprocess, quantize, ranges_for
from embedding_service.model.scoring import RerankScorer, truncated
from embedding_service.wire.refusals import pair_too_long, query_too_long, ranked, too_many_characters
from embedding_service.wire.rest_bodies import embeddings_body, error_body, rerank_body

RANGED = ("int8", "uint8")
PAIRS_AT_ONCE = 4096  # rerank pairs tokenized and held at once in a model actor
ARROW_TYPES = {"float": pa.float32(), "int8": pa.int8(), "uint8": pa.uint8(), "binary": pa.int8(),
               "ubinary": pa.uint8()}


class ModelRefused(RuntimeError):
    """The model's start-up check (canary, accuracy gate) refused it: a job does not run what no replica serves."""


class BadRow(ValueError):
    """A dataset row the job cannot embed: its text missing or empty, or past max_chars_per_input. The job fails
    with it (a dataset job has no error file), naming the row by its id."""


class Encoder:
    def __init__(self, settings: ModelSettings, spec: JobSpec, calls: Limits) -> None:
        """`calls`: the service's bounds on one call (a rerank line's query tokens: max_query_tokens)."""
        self.settings, self.spec, self.calls = settings, spec, calls
        if spec.source == "openai" and spec.endpoint == RERANK:
            self.scorer = RerankScorer(settings)
            verification = self.scorer.loaded.info.verification
        else:
            self.loaded = load_model(settings)
            self.dimension = self.loaded.dimension
            self._reference: np.ndarray | None = None
            self._ranges: dict[int | None, np.ndarray] = {}
            self.prompt = self.loaded.model.prompts.get(spec.prompt_name) if spec.prompt_name else None
            verification = self.loaded.verification
        if verification is not None and verification.refused:
            raise ModelRefused(f"model {settings.name!r} failed its start-up check: {verification.refused}")

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.spec.source == "openai":
            return self._lines(batch)
        return self._rows(batch)

    # ---- shaping, as a replica's shape() ------------------------------------

    def _shaped(self, pooled: np.ndarray, dimensions: int | None, encoding: str, normalize: bool) -> np.ndarray:
        vectors = postprocess(pooled, dimensions, normalize)
        if encoding == "float":
            return vectors
        return quantize(vectors, encoding, self._ranges_of(dimensions, normalize) if encoding in RANGED else None)

    def _ranges_of(self, dimensions: int | None, normalize: bool) -> np.ndarray:
        if self._reference is None:
            self._reference = reference_vectors(self.loaded, self.settings)
        key = (dimensions, normalize)
        if key not in self._ranges:
            self._ranges[key] = ranges_for(self._reference, dimensions, normalize)
        return self._ranges[key]

    # ---- a dataset's rows ------------------------------------------------------

    def _rows(self, batch: pa.Table) -> pa.Table:
        spec = self.spec
        self._check_rows(batch)
        texts = batch.column(spec.text_column).to_pylist()
        pooled, tokens = embed_texts(self.loaded, self.settings, texts, "end", self.prompt)
        vectors = self._shaped(pooled, spec.dimensions, spec.encoding, spec.normalize)
        width = vectors.shape[1]
        flat = pa.array(vectors.reshape(-1), type=ARROW_TYPES[spec.encoding])
        return pa.table({
            spec.id_column: batch.column(spec.id_column),
            "embedding": pa.FixedSizeListArray.from_arrays(flat, width),
            "tokens": pa.array(np.asarray(tokens, dtype=np.int32)),
        })

    def _check_rows(self, batch: pa.Table) -> None:
        """Every row's text there, not empty, and within the characters an input may have (counted by Arrow before
        any of it is tokenized): an online call refuses such an input, and a job does not embed it either."""
        spec, limit = self.spec, self.calls.max_chars_per_input
        column = batch.column(spec.text_column)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            raise BadRow(f"column {spec.text_column!r} holds {column.type}, not text")
        lengths = pc.fill_null(pc.utf8_length(column), 0)
        bad = pc.or_(pc.equal(lengths, 0), pc.greater(lengths, limit))
        if not pc.any(bad).as_py():
            return
        first = pc.index(bad, True).as_py()
        row = batch.column(spec.id_column)[first].as_py()
        chars = lengths[first].as_py()
        if chars == 0:
            raise BadRow(f"row {row!r}: its {spec.text_column!r} is empty or missing")
        raise BadRow(f"row {row!r}: " + too_many_characters(f"its {spec.text_column!r}", chars, limit))

    # ---- an OpenAI batch's lines -------------------------------------------------

    def _lines(self, batch: pa.Table) -> pa.Table:
        lines = batch.to_pylist()
        answers = self._rerank_answers(lines) if self.spec.endpoint == RERANK else self._embedding_answers(lines)
        statuses, bodies, counts = zip(*answers) if answers else ((), (), ())
        return pa.table({
            "row": batch.column("row"),
            "custom_id": batch.column("custom_id"),
            "status_code": pa.array(statuses, type=pa.int32()),
            "body": pa.array([orjson.dumps(b).decode() for b in bodies], type=pa.string()),
            "tokens": pa.array(counts, type=pa.int32()),
        })

    def _embedding_answers(self, lines: list[dict]) -> list[tuple[int, dict, int]]:
        texts = [text for line in lines for text in line["inputs"]]
        pooled, tokens = embed_texts(self.loaded, self.settings, texts, "end") if texts else (None, [])
        answers, start = [], 0
        for line in lines:
            end = start + len(line["inputs"])
            used = int(sum(tokens[start:end]))
            answers.append((*self._embedding_answer(line, pooled[start:end], used), used))
            start = end
        return answers

    def _embedding_answer(self, line: dict, pooled: np.ndarray, tokens: int) -> tuple[int, dict]:
        dimensions = line["dimensions"]
        if dimensions is not None and dimensions > self.dimension:
            return 400, error_body(f"dimensions must be at most the model's {self.dimension}", param="dimensions")
        vectors = self._shaped(pooled, dimensions, line["output_dtype"], True)
        return 200, embeddings_body(vectors, line["base64"], self.settings.name, tokens)

    def _rerank_answers(self, lines: list[dict]) -> list[tuple[int, dict, int]]:
        """The lines' answers, scored a group of lines at a time: at most PAIRS_AT_ONCE pairs (or one line) held
        tokenized at once, whatever the batch's lines hold."""
        answers: list[tuple[int, dict, int]] = []
        group: list[dict] = []
        pairs = 0
        for line in lines:
            if group and pairs + len(line["documents"]) > PAIRS_AT_ONCE:
                answers += self._rerank_group(group)
                group, pairs = [], 0
            group.append(line)
            pairs += len(line["documents"])
        return answers + (self._rerank_group(group) if group else [])

    def _rerank_group(self, lines: list[dict]) -> list[tuple[int, dict, int]]:
        """Each line's pairs tokenized as a rerank replica tokenizes a shard, all the lines' pairs run in passes
        within the token budget, each line's scores ranked as the router ranks them."""
        scorer, info = self.scorer, self.scorer.loaded.info
        maximum = info.max_sequence_length
        rows: list = []
        lengths: list[int] = []
        answers: list[tuple[int, dict, int] | None] = []  # a refused line's answer; None: its pairs run
        spans: list[tuple[int, np.ndarray]] = []  # each running line's first row and its pairs' tokens
        for line in lines:
            head = scorer.pairs.query_tokens(line["query"])
            if len(head) > self.calls.max_query_tokens:  # as the router refuses it, before any pair is scored
                message = query_too_long(len(head), self.calls.max_query_tokens, self.settings.name)
                answers.append((400, error_body(message, param="query", code="input_too_long"), 0))
                continue
            pairs = scorer.pairs.pairs(line["query"], line["documents"], head)
            counts, too_long = truncated(pairs.full, maximum, "end" if line["truncate"] else "reject")
            if too_long:
                k = too_long[0]
                message = pair_too_long(k, int(counts[k]), self.settings.name, maximum, "truncate is false")
                answers.append((400, error_body(message, param="documents", code="input_too_long"), 0))
                continue
            answers.append(None)
            spans.append((len(rows), counts))
            rows.extend(pairs.rows)
            lengths.extend(int(c) for c in counts)
        raw = np.empty(len(rows), dtype=np.float32)
        budget = self.settings.forward_token_budget(info.device)
        for group in plan_passes(lengths, self.settings.forward_batch_size, budget):
            raw[group] = scorer.raw_scores([rows[k] for k in group])
        running = iter(spans)
        for i, line in enumerate(lines):
            if answers[i] is not None:
                continue
            start, counts = next(running)
            scores = raw[start : start + len(counts)]
            if line["activation"]:
                scores = scorer.activated(scores)
            order = ranked(scores, line["top_n"])
            documents = line["documents"] if line["return_documents"] else None
            results = ((int(k), float(scores[k]), documents[k] if documents else None) for k in order)
            used = int(counts.sum())
            answers[i] = (200, rerank_body(self.settings.name, results, used), used)
        return answers
