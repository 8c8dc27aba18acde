"""What the router's calls and a batch job's lines share, so that both say the same: documents ranked highest
first, and the wording of an input refused for its characters, and of a query or a pair refused for its tokens."""

from __future__ import annotations

import numpy as np


def ranked(scores: np.ndarray, keep: int | None = None) -> np.ndarray:
    """The documents' indices, highest score first, ties in document order (CrossEncoder.rank's stable sort), the
    first `keep` of them (all when None)."""
    return np.argsort(-scores, kind="stable")[:keep]


def pair_too_long(index: int, tokens: int, model: str, max_tokens: int, setting: str) -> str:
    """A document whose pair with the query is longer than the model takes, under a setting that refuses it
    (`setting`: how the caller's API names it, as "truncation is REJECT" or "truncate is false")."""
    return (f"document {index} with the query has {tokens} tokens; model {model!r} takes at most {max_tokens} "
            f"and {setting}")


def query_too_long(tokens: int, max_tokens: int, model: str) -> str:
    """A query past max_query_tokens, its content tokens counted by the model's own tokenizer."""
    return f"query has {tokens} tokens; the limit is {max_tokens} (by model {model!r}'s tokenizer)"


def too_many_characters(what: str, chars: int, limit: int) -> str:
    """An input, a query or a document past max_chars_per_input (`what`: as "input 3" or "query")."""
    return f"{what} has {chars} characters; the limit is {limit}"
