"""Compact vectors' recall@10 against float on the packaged corpus, for each type."""

from __future__ import annotations

# The service's float vectors are within 1e-5 of sentence-transformers' own: a value that close to a step
# edge (or to 0, for the sign bits) may land on either side. Everywhere else the bytes must be equal.


def test_recall_at_10_of_each_type_against_float_on_the_packaged_corpus():
    """The figures the README gives (benchmarks/compact_recall.py), on 300 queries here."""
    from benchmarks.compact_recall import recall_at_10, shipped_vectors

    recall = recall_at_10(shipped_vectors(), queries=300)
    assert recall["int8"] >= 0.98 and recall["uint8"] >= 0.98, recall
    assert 0.5 <= recall["binary"] == recall["ubinary"] < recall["int8"], recall
