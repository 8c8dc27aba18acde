"""Truncation WINDOWS done by hand with sentence-transformers' own model: what the service's pooled vector must equal."""

from __future__ import annotations

import numpy as np


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer's single-sequence template puts before and after the content: [CLS] and [SEP] for a
    BERT, none and the EOS for a decoder such as Qwen3-Embedding."""
    with_special = tokenizer("x", add_special_tokens=True)["input_ids"]
    content = tokenizer("x", add_special_tokens=False)["input_ids"]
    start = next(k for k in range(len(with_special)) if with_special[k : k + len(content)] == content)
    return with_special[:start], with_special[start + len(content) :]


def prompt_tokens(ids: list[int], prompt_ids: list[int]) -> int:
    """The leading tokens of the prompt and text tokenized together that are the prompt's alone (a byte-level BPE
    merges a prompt's trailing space into the text's first token)."""
    n = 0
    while n < min(len(ids), len(prompt_ids)) and ids[n] == prompt_ids[n]:
        n += 1
    return n


def by_hand(model, text: str, window_tokens: int, overlap_tokens: int, prompt: str = "") -> tuple[np.ndarray, int]:
    """(pooled vector before normalization, tokens embedded): the text's tokens after the prompt cut into windows of
    window_tokens less the prompt's, each window run through the model with the prompt and the model's special tokens
    ([CLS]/[SEP], or a decoder's EOS), the window vectors averaged with each window's token count as its weight."""
    import torch

    tokenizer = model.tokenizer
    ids = tokenizer(prompt + text, add_special_tokens=False)["input_ids"]
    head = ids[: prompt_tokens(ids, tokenizer(prompt, add_special_tokens=False)["input_ids"])] if prompt else []
    body = ids[len(head):]
    span = window_tokens - len(head)
    starts = [0]
    while starts[-1] + span < len(body):
        starts.append(starts[-1] + span - overlap_tokens)
    before, after = special_tokens(tokenizer)
    vectors, weights = [], []
    for start in starts:
        ids_window = torch.tensor([[*before, *head, *body[start : start + span], *after]])
        features = {"input_ids": ids_window, "attention_mask": torch.ones_like(ids_window)}
        if "token_type_ids" in tokenizer.model_input_names:
            features["token_type_ids"] = torch.zeros_like(ids_window)
        with torch.no_grad():
            vectors.append(model(features)["sentence_embedding"][0].numpy())
        weights.append(ids_window.shape[1])
    return np.average(np.stack(vectors), axis=0, weights=weights), sum(weights)
