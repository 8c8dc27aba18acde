"""Turns texts and token ids into model features, as sentence-transformers would.

The model's fast tokenizer runs without special tokens and without truncation,
so the service can count tokens, apply its truncation policy (end, start,
reject or windows) and accept pre-tokenized input; the special tokens of the
model's single-sequence template are then added back and the batch is padded.
For text truncated at the end this is exactly what `SentenceTransformer.encode`
feeds the model.

"windows" embeds a long input whole: its tokens after the prompt are cut into
windows that overlap, each window gets the prompt and the special tokens and
runs as a sequence of its own, and `Prepared.pool` averages the window vectors
weighted by each window's tokens (the sequence length the model pooled over),
so a short last window weighs little. The caller normalizes afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tokenizers import Tokenizer

from embedding_service.config import LongInputSettings
from embedding_service.wire.messages import Policy, Windows

_PROBE = "hello"


def private_copy(tokenizer: Tokenizer) -> Tokenizer:
    """A copy of a tokenizer without padding or truncation: a transformers fast tokenizer keeps both as state of its
    shared backend, set on every call (in the forward thread), so counting or cutting with it elsewhere races."""
    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.no_padding()
    copy.no_truncation()
    return copy


@dataclass(frozen=True)
class Prepared:
    """Token sequences (special tokens included) ready for the model."""

    sequences: list[np.ndarray]
    too_long: list[int]  # positions over the limit: "reject", or "windows" past max_windows
    # "windows": how many consecutive sequences each input became; None: one each.
    windows: np.ndarray | None = None

    @property
    def token_counts(self) -> np.ndarray:
        """Tokens per input (every window's, special tokens included)."""
        lengths = self._lengths()
        return lengths if self.windows is None else np.add.reduceat(lengths, self._firsts())

    def pool(self, vectors: np.ndarray) -> np.ndarray:
        """One vector per input from one per sequence: each input's window vectors averaged, weighted by tokens."""
        if self.windows is None:
            return vectors
        weights = self._lengths().astype(np.float64)[:, None]
        firsts = self._firsts()
        sums = np.add.reduceat(vectors.astype(np.float64) * weights, firsts, axis=0)
        return (sums / np.add.reduceat(weights, firsts, axis=0)).astype(np.float32)

    def _lengths(self) -> np.ndarray:
        return np.fromiter((len(s) for s in self.sequences), dtype=np.int64, count=len(self.sequences))

    def _firsts(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.windows)[:-1]])


class InputEncoder:
    def __init__(self, model, long_inputs: LongInputSettings | None = None) -> None:
        """`long_inputs`: how "windows" cuts inputs (None: the defaults)."""
        hf_tokenizer = model.tokenizer
        # A private copy: sentence-transformers mutates the shared backend's
        # truncation and padding on every call.
        self._tokenizer = private_copy(hf_tokenizer.backend_tokenizer)
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
        self.windows = _windows(long_inputs or LongInputSettings(), self.budget, self.max_length - self.budget)
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

        if policy == "windows":
            return self._windowed(content, prompt_ids)
        sequences: list[np.ndarray] = []
        too_long: list[int] = []
        for i, ids in enumerate(content):
            assert ids is not None
            if len(ids) > self.budget:
                if policy == "reject":
                    too_long.append(i)
                elif policy == "start":
                    keep = min(_prompt_tokens(ids, prompt_ids), self.budget)
                    ids = np.concatenate([ids[:keep], ids[len(ids) - (self.budget - keep) :]])
                else:
                    ids = ids[: self.budget]
            sequences.append(np.concatenate([self._prefix, ids, self._suffix]))
        return Prepared(sequences, too_long)

    def _windowed(self, content: list[np.ndarray | None], prompt_ids: np.ndarray) -> Prepared:
        w = self.windows
        sequences: list[np.ndarray] = []
        too_long: list[int] = []
        counts = np.ones(len(content), dtype=np.int64)
        for i, ids in enumerate(content):
            assert ids is not None
            if len(ids) <= w.window_tokens:
                sequences.append(np.concatenate([self._prefix, ids, self._suffix]))
                continue
            keep = min(_prompt_tokens(ids, prompt_ids), w.window_tokens - 1)  # the prompt opens every window
            head, body = ids[:keep], ids[keep:]
            span = w.window_tokens - keep
            starts = w.starts(len(body), span)
            if len(starts) > w.max_windows:
                too_long.append(i)
                sequences.append(np.concatenate([self._prefix, ids, self._suffix]))
                continue
            counts[i] = len(starts)
            sequences.extend(np.concatenate([self._prefix, head, body[s : s + span], self._suffix]) for s in starts)
        return Prepared(sequences, too_long, counts)

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


def _windows(settings: LongInputSettings, budget: int, special_tokens: int) -> Windows:
    window = budget if settings.window_tokens is None else settings.window_tokens
    if window > budget:
        raise ValueError(f"long_inputs.window_tokens {window} exceeds the {budget} input tokens the model takes")
    overlap = window // 8 if settings.overlap_tokens is None else settings.overlap_tokens
    if overlap >= window:
        raise ValueError(f"long_inputs.overlap_tokens {overlap} must be below the window's {window} tokens")
    return Windows(window, overlap, settings.max_windows, special_tokens)


def _prompt_tokens(ids: np.ndarray, prompt_ids: np.ndarray) -> int:
    """How many of the leading tokens of `ids` (prompt and text tokenized together) are the prompt's own: fewer than
    the prompt alone has where its last token merges with the text's first (a byte-level BPE, as decoders' are,
    reads "Query: " + "hello" as ..."Query", ":", " hello"), so that token is not repeated in every window."""
    n = min(len(ids), len(prompt_ids))
    differ = np.flatnonzero(ids[:n] != prompt_ids[:n])
    return int(differ[0]) if len(differ) else n


def _find(haystack: list[int], needle: list[int]) -> int:
    for start in range(len(haystack) - len(needle) + 1):
        if haystack[start : start + len(needle)] == needle:
            return start
    raise ValueError("cannot locate content tokens inside the tokenizer's special-token template")
