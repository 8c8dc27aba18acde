"""The classification kind: a transformers sequence classifier per replica (one text, or a pair of texts).

Scores are what transformers' text-classification pipeline computes: the model's logits through sigmoid (a
multi-label model, or one of a single label) or softmax (one label per input), as the model's config says, or
the logits themselves on request. Labels come from the config's id2label. The replica returns every label's score;
the router keeps each input's top_k.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable

import numpy as np

from embedding_service.config import ModelSettings
from embedding_service.model.forward import model_source, resolve_device
from embedding_service.model.replica import Loaded, Rows, ServedKind
from embedding_service.model.scoring import torch_threads, truncated
from embedding_service.model.tokenization import private_copy
from embedding_service.wire.messages import ClassifyOptions, ModelInfo, ShardRequest, ShardResult


def activation_of(config) -> str:
    """The pipeline's choice: sigmoid for a multi-label model or a single label, softmax for one of several."""
    if config.problem_type == "multi_label_classification" or config.num_labels == 1:
        return "sigmoid"
    return "softmax"


def activated(logits: np.ndarray, activation: str) -> np.ndarray:
    """As the text-classification pipeline computes them from float32 logits."""
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-logits))
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


class ClassifyModel(ServedKind):
    kind = "classify"
    span = "classify"

    def load(self, settings: ModelSettings) -> Loaded:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        torch_threads(settings)
        device = resolve_device(settings.device)
        source = model_source(settings.path)
        self.tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=settings.trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            source, trust_remote_code=settings.trust_remote_code).to(device).eval()
        config = self.model.config
        # The tokenizer's own maximum, within the positions the model has (a tokenizer saved without one says 1e30).
        self.max_length = settings.max_seq_length or min(int(self.tokenizer.model_max_length),
                                                         int(getattr(config, "max_position_embeddings", 512)))
        self._tokens = private_copy(self.tokenizer.backend_tokenizer)
        labels = tuple(str(config.id2label.get(i, f"LABEL_{i}")) for i in range(config.num_labels))
        return Loaded(ModelInfo(
            name=settings.name, dimension=len(labels), max_sequence_length=self.max_length, prompts={}, device=device,
            backend="torch", vocab_size=int(self.tokenizer.vocab_size), source=settings.path,
            tokenizer_json=self.tokenizer.backend_tokenizer.to_str(), kind="classify", labels=labels,
            activation=activation_of(config),
            decode_cleanup=bool(getattr(self.tokenizer, "clean_up_tokenization_spaces", False))))

    async def prepare(self, request: ShardRequest) -> Rows:
        """Tokens of each input (a pair's with the template's special tokens), counted in a thread; pairs and
        single texts run in passes of their own (the tokenizer takes a batch of one or the other)."""
        inputs = list(request.inputs)
        encodings = await asyncio.to_thread(self._tokens.encode_batch, inputs, add_special_tokens=True)
        full = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(inputs))
        counts, too_long = truncated(full, self.max_length, request.options.truncation)
        pairs = {isinstance(x, tuple) for x in inputs}
        if len(pairs) == 1:
            return Rows(inputs, counts, counts, too_long, group=pairs.pop())
        # A shard of both: singles as pairs would change their tokens, so the shard is run as two groups.
        return Rows(inputs, counts, counts, too_long, group=None)

    def forward(self, rows: list, group: Hashable) -> np.ndarray:
        import torch

        if group is None:  # a mixed shard: each sort on its own, put back in order
            out = np.empty((len(rows), self.info.dimension), dtype=np.float32)
            for is_pair in (False, True):
                picked = [k for k, r in enumerate(rows) if isinstance(r, tuple) == is_pair]
                if picked:
                    out[picked] = self.forward([rows[k] for k in picked], is_pair)
            return out
        texts = [r[0] for r in rows] if group else rows
        pairs = [r[1] for r in rows] if group else None
        features = self.tokenizer(texts, pairs, padding=True, truncation=True, max_length=self.max_length,
                                  return_tensors="pt").to(self.model.device)
        with torch.inference_mode():
            return self.model(**features).logits.float().cpu().numpy()

    async def shape(self, out: np.ndarray, rows: Rows, request: ShardRequest) -> ShardResult:
        options: ClassifyOptions = request.options
        scores = out if options.raw_scores else activated(out, self.info.activation)
        return ShardResult(scores.astype(np.float32, copy=False), rows.counts)
