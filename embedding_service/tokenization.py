"""Turns texts and token ids into model features, as sentence-transformers would.

The model's fast tokenizer runs without special tokens and without truncation,
so the service can count tokens, apply its truncation policy (end, start or
reject) and accept pre-tokenized input; the special tokens of the model's
single-sequence template are then added back and the batch is padded. For
text truncated at the end this is exactly what `SentenceTransformer.encode`
feeds the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch
from tokenizers import Tokenizer

Policy = Literal["end", "start", "reject"]

_PROBE = "hello"


@dataclass(frozen=True)
class Prepared:
    """Token sequences (special tokens included) ready for the model."""

    sequences: list[np.ndarray]
    too_long: list[int]  # positions over the limit, filled only for "reject"

    @property
    def token_counts(self) -> np.ndarray:
        return np.fromiter((len(s) for s in self.sequences), dtype=np.int64, count=len(self.sequences))


class InputEncoder:
    def __init__(self, model) -> None:
        hf_tokenizer = model.tokenizer
        # A private copy: sentence-transformers mutates the shared backend's
        # truncation and padding on every call.
        self._tokenizer = Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self._model = model
        self.max_length = int(model.max_seq_length)
        self.vocab_size = int(self._tokenizer.get_vocab_size(with_added_tokens=True))
        self.pad_id = int(hf_tokenizer.pad_token_id or 0)
        self.pad_left = hf_tokenizer.padding_side == "left"
        self.uses_token_types = "token_type_ids" in hf_tokenizer.model_input_names

        with_special = self._tokenizer.encode(_PROBE, add_special_tokens=True)
        content = self._tokenizer.encode(_PROBE, add_special_tokens=False).ids
        start = _find(with_special.ids, content)
        end = start + len(content)
        self._prefix = np.asarray(with_special.ids[:start], dtype=np.int64)
        self._suffix = np.asarray(with_special.ids[end:], dtype=np.int64)
        types = with_special.type_ids
        self._prefix_types = np.asarray(types[:start], dtype=np.int64)
        self._suffix_types = np.asarray(types[end:], dtype=np.int64)
        self._content_type = types[start] if content else 0
        self.budget = self.max_length - len(self._prefix) - len(self._suffix)
        if self.budget < 1:
            raise ValueError(f"max_seq_length {self.max_length} leaves no room for content tokens")
        self._prompt_cache: dict[str, tuple[np.ndarray, int | None]] = {}

    def tokenizer_json(self) -> str:
        """The tokenizer as tokenizers' JSON (what the router counts tokens with)."""
        return self._tokenizer.to_str()

    def _prompt(self, prompt: str) -> tuple[np.ndarray, int | None]:
        """Prompt token ids, and the prompt_length pooling wants (if any)."""
        if prompt not in self._prompt_cache:
            ids = np.asarray(self._tokenizer.encode(prompt, add_special_tokens=False).ids, dtype=np.int64)
            features = self._model.preprocess(["x"], prompt=prompt)
            length = features.get("prompt_length")
            self._prompt_cache[prompt] = (ids, None if length is None else int(length))
        return self._prompt_cache[prompt]

    def prepare(self, inputs: Sequence[str | np.ndarray], policy: Policy, prompt: str | None = None) -> Prepared:
        texts = [(i, (prompt or "") + x) for i, x in enumerate(inputs) if isinstance(x, str)]
        content: list[np.ndarray | None] = [None] * len(inputs)
        if texts:
            encodings = self._tokenizer.encode_batch([t for _, t in texts], add_special_tokens=False)
            for (i, _), enc in zip(texts, encodings):
                content[i] = np.asarray(enc.ids, dtype=np.int64)
        prompt_ids = self._prompt(prompt)[0] if prompt else np.empty(0, dtype=np.int64)
        for i, x in enumerate(inputs):
            if not isinstance(x, str):
                content[i] = np.concatenate([prompt_ids, np.asarray(x, dtype=np.int64)])

        sequences: list[np.ndarray] = []
        too_long: list[int] = []
        for i, ids in enumerate(content):
            assert ids is not None
            if len(ids) > self.budget:
                if policy == "reject":
                    too_long.append(i)
                elif policy == "start":
                    keep = min(len(prompt_ids), self.budget)
                    ids = np.concatenate([ids[:keep], ids[len(ids) - (self.budget - keep) :]])
                else:
                    ids = ids[: self.budget]
            sequences.append(np.concatenate([self._prefix, ids, self._suffix]))
        return Prepared(sequences, too_long)

    def features(self, sequences: Sequence[np.ndarray], prompt: str | None = None) -> dict:
        """Pad a batch of sequences into the tensors the model's forward takes."""
        width = max(len(s) for s in sequences)
        ids = np.full((len(sequences), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(sequences), width), dtype=np.int64)
        types = np.zeros((len(sequences), width), dtype=np.int64)
        for row, seq in enumerate(sequences):
            cols = slice(width - len(seq), width) if self.pad_left else slice(0, len(seq))
            ids[row, cols] = seq
            mask[row, cols] = 1
            if self.uses_token_types:
                n_content = len(seq) - len(self._prefix) - len(self._suffix)
                types[row, cols] = np.concatenate(
                    [self._prefix_types, np.full(n_content, self._content_type), self._suffix_types]
                )
        features = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        if self.uses_token_types:
            features["token_type_ids"] = torch.from_numpy(types)
        features["modality"] = "text"
        if prompt:
            length = self._prompt(prompt)[1]
            if length is not None:
                features["prompt_length"] = length
        return features


def _find(haystack: list[int], needle: list[int]) -> int:
    for start in range(len(haystack) - len(needle) + 1):
        if haystack[start : start + len(needle)] == needle:
            return start
    raise ValueError("cannot locate content tokens inside the tokenizer's special-token template")
