"""Truncation WINDOWS done by hand with sentence-transformers' own model: what the service's pooled vector must equal."""

from __future__ import annotations

import numpy as np


def by_hand(model, text: str, window_tokens: int, overlap_tokens: int, prompt: str = "") -> tuple[np.ndarray, int]:
    """(pooled vector before normalization, tokens embedded): the text's tokens after the prompt cut into windows of
    window_tokens less the prompt's, each window run through the model with the prompt and [CLS]/[SEP], the window
    vectors averaged with each window's token count as its weight."""
    import torch

    tokenizer = model.tokenizer
    ids = tokenizer(prompt + text, add_special_tokens=False)["input_ids"]
    head = ids[: len(tokenizer(prompt, add_special_tokens=False)["input_ids"])] if prompt else []
    body = ids[len(head):]
    span = window_tokens - len(head)
    starts = [0]
    while starts[-1] + span < len(body):
        starts.append(starts[-1] + span - overlap_tokens)
    vectors, weights = [], []
    for start in starts:
        ids_window = torch.tensor([[tokenizer.cls_token_id, *head, *body[start : start + span], tokenizer.sep_token_id]])
        features = {"input_ids": ids_window, "attention_mask": torch.ones_like(ids_window),
                    "token_type_ids": torch.zeros_like(ids_window)}
        with torch.no_grad():
            vectors.append(model(features)["sentence_embedding"][0].numpy())
        weights.append(ids_window.shape[1])
    return np.average(np.stack(vectors), axis=0, weights=weights), sum(weights)
