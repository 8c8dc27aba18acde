"""sentence-transformers' own scores for the rerank and sparse models: the ground truth their replies are held to."""

from __future__ import annotations

import numpy as np


def raw_scores(cross_encoder, query: str, documents: list[str]) -> np.ndarray:
    """The CrossEncoder's scores of (query, document) pairs with no activation."""
    import torch

    return cross_encoder.predict([[query, d] for d in documents], activation_fn=torch.nn.Identity())


def sparse_reference(sparse_encoder, texts: list[str], top_k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each text's (term indices, weights) from the SparseEncoder, its top_k heaviest terms kept."""
    encoded = sparse_encoder.encode(texts, convert_to_sparse_tensor=True, max_active_dims=top_k)
    rows = []
    for i in range(len(texts)):
        row = encoded[i].coalesce()
        rows.append((row.indices()[0].numpy(), row.values().numpy()))
    return rows
