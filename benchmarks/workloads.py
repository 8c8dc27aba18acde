"""The benchmark's workloads: W1-W6, the same inputs for every side measured."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

WORDS = (
    "the a search engine ranks documents by semantic similarity of dense vectors computed with transformer "
    "models while users type queries about products places people science history music sports weather"
).split()


def sentences(n: int, tokens: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(max(1, tokens - 2))) for _ in range(n)]


def mixed(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 254))) for _ in range(n)]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


W1_TEXT = "how do I reset my password"
# W2's call: a batch of 256 sentences, unless a size says otherwise (the benchmark's own test runs small).
W2_SENTENCES = 256
SIZES = {
    "full": {"w1_n": 200, "w2_requests": 12, "w3_requests": 1280, "w4_requests": 12, "w5_inputs": 20000,
             "w6_inputs": 5000},
    "quick": {"w1_n": 50, "w2_requests": 4, "w3_requests": 256, "w4_requests": 4, "w5_inputs": 2000,
              "w6_inputs": 1024},
}


@dataclass
class Work:
    """The inputs of W1-W5 (the same for every side measured)."""

    sizes: dict
    w2: list[str]
    w3: list[str]
    w4: list[list[str]]
    w5: list[str]
    w6: list[str]  # real text: the packaged gate sentences (news and documentation prose)

    @property
    def w2_inputs(self) -> int:
        """W2's inputs over all its calls."""
        return len(self.w2) * self.sizes["w2_requests"]

    @property
    def w4_inputs(self) -> int:
        """W4's inputs over all its calls."""
        return sum(map(len, self.w4))

    @classmethod
    def make(cls, sizes: dict) -> Work:
        from embedding_service.model.accuracy import corpus

        return cls(sizes, sentences(sizes.get("w2_sentences", W2_SENTENCES), 30, 1),
                   sentences(sizes["w3_requests"], 12, 3),
                   [mixed(32, 100 + i) for i in range(sizes["w4_requests"])], sentences(sizes["w5_inputs"], 20, 5),
                   list(corpus().gate[: sizes["w6_inputs"]]))
