"""A batch job's model actor: what Ray Data's `map_batches` runs in each actor of the job's pool.

It loads the model with the replicas' own path (model/forward.py load_model: backend, precision, the start-up
canary and accuracy gate) and computes with their forward passes (embed_texts: passes within the model's token
budget), then cuts, normalizes and packs the vectors as a replica's `shape` does. Two row shapes:

- a dataset's rows (id, text) -> (id, embedding: a fixed-size list of the encoding's type, tokens);
- an OpenAI batch's lines (row, custom_id, inputs, dimensions, output_dtype, base64) -> (row, custom_id,
  status_code, body: the /v1/embeddings body as JSON, tokens).
"""

from __future__ import annotations

import numpy as np
import orjson
import pyarrow as pa

from embedding_service.config import ModelSettings
from embedding_service.jobs.spec import JobSpec
from embedding_service.model.forward import embed_texts, load_model, reference_vectors
from embedding_service.model.quantization import postprocess, quantize, ranges_for
from embedding_service.wire.openai_bodies import embeddings_body, error_body

RANGED = ("int8", "uint8")
ARROW_TYPES = {"float": pa.float32(), "int8": pa.int8(), "uint8": pa.uint8(), "binary": pa.int8(),
               "ubinary": pa.uint8()}


class Encoder:
    def __init__(self, settings: ModelSettings, spec: JobSpec) -> None:
        self.settings, self.spec = settings, spec
        self.loaded = load_model(settings)
        self.dimension = self.loaded.dimension
        self._reference: np.ndarray | None = None
        self._ranges: dict[int | None, np.ndarray] = {}
        self.prompt = self.loaded.model.prompts.get(spec.prompt_name) if spec.prompt_name else None

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
        texts = batch.column(spec.text_column).to_pylist()
        pooled, tokens = embed_texts(self.loaded, self.settings, [t if isinstance(t, str) else "" for t in texts],
                                     "end", self.prompt)
        vectors = self._shaped(pooled, spec.dimensions, spec.encoding, spec.normalize)
        width = vectors.shape[1]
        flat = pa.array(vectors.reshape(-1), type=ARROW_TYPES[spec.encoding])
        return pa.table({
            spec.id_column: batch.column(spec.id_column),
            "embedding": pa.FixedSizeListArray.from_arrays(flat, width),
            "tokens": pa.array(np.asarray(tokens, dtype=np.int32)),
        })

    # ---- an OpenAI batch's lines -------------------------------------------------

    def _lines(self, batch: pa.Table) -> pa.Table:
        lines = batch.to_pylist()
        texts = [text for line in lines for text in line["inputs"]]
        pooled, tokens = embed_texts(self.loaded, self.settings, texts, "end") if texts else (None, [])
        statuses, bodies, counts = [], [], []
        start = 0
        for line in lines:
            end = start + len(line["inputs"])
            used = int(sum(tokens[start:end]))
            status, body = self._answer(line, pooled[start:end], used)
            statuses.append(status)
            bodies.append(orjson.dumps(body).decode())
            counts.append(used)
            start = end
        return pa.table({
            "row": batch.column("row"),
            "custom_id": batch.column("custom_id"),
            "status_code": pa.array(statuses, type=pa.int32()),
            "body": pa.array(bodies, type=pa.string()),
            "tokens": pa.array(counts, type=pa.int32()),
        })

    def _answer(self, line: dict, pooled: np.ndarray, tokens: int) -> tuple[int, dict]:
        dimensions = line["dimensions"]
        if dimensions is not None and dimensions > self.dimension:
            return 400, error_body(f"dimensions must be at most the model's {self.dimension}", param="dimensions")
        vectors = self._shaped(pooled, dimensions, line["output_dtype"], True)
        return 200, embeddings_body(vectors, line["base64"], self.settings.name, tokens)
