"""Embedding in-process with sentence-transformers when no target can serve (off unless given to a client).

The same computation as the service's: the model's own tokenizer and truncation at its maximum length,
the Matryoshka cut before the L2 normalization. Needs sentence-transformers (and torch) installed:
the `fallback` extra; the client itself does not.
"""

from __future__ import annotations

import logging
import threading

import numpy as np

logger = logging.getLogger("embedding_client")


class LocalFallback:
    def __init__(self, model_path: str, device: str = "cpu", name: str | None = None) -> None:
        self.model_path = model_path
        self.device = device
        self.name = name or model_path
        self._model = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LocalFallback({self.model_path!r})"

    def model(self):
        with self._lock:
            if self._model is None:
                try:
                    from sentence_transformers import SentenceTransformer
                except ImportError as exc:
                    raise RuntimeError("the local fallback needs sentence-transformers (pip install "
                                       "'embedding-service-client[fallback]')") from exc
                logger.warning("loading the local fallback model from %s", self.model_path)
                self._model = SentenceTransformer(self.model_path, device=self.device)
                self._model.eval()
            return self._model

    def embed(self, texts: list[str], *, model: str = "", dimensions: int | None = None, normalize: bool = True,
              prompt_name: str = "", truncation: str = "end", output: str = "float") -> tuple[np.ndarray, int]:
        """(vectors, tokens) of texts. `model` names the served model the caller asked for (one local model
        stands in for it). Compact outputs: binary/ubinary (int8/uint8 need the service's ranges)."""
        if truncation != "end":
            raise ValueError(f"the local fallback truncates at the end only, not {truncation!r}")
        if output not in ("float", "binary", "ubinary"):
            raise ValueError(f"the local fallback makes float, binary and ubinary vectors; {output} needs the "
                             "ranges the service publishes")
        st = self.model()
        vectors = st.encode(texts, prompt_name=prompt_name or None, convert_to_numpy=True,
                            normalize_embeddings=False, batch_size=32).astype(np.float32)
        if dimensions is not None:
            vectors = vectors[:, :dimensions]
        if normalize:
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        prompt = st.prompts.get(prompt_name, "") if prompt_name else ""
        features = st.tokenize([prompt + t for t in texts])
        tokens = int(features["attention_mask"].sum())
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if output != "float":
            from sentence_transformers.util.quantization import quantize_embeddings

            vectors = quantize_embeddings(vectors, precision=output)
        return vectors, tokens
