"""Truncation WINDOWS, in-process: where the windows start, and window settings out of bounds refused at start-up."""

from __future__ import annotations

import pytest

from embedding_client.v1 import embedding_pb2 as pb
from embedding_service.wire.messages import Windows
from tests.helpers.models import MINILM

WINDOWS = pb.TRUNCATION_POLICY_WINDOWS
# all-MiniLM-L6-v2 keeps the defaults: all it takes (256 less [CLS] and [SEP]), an eighth of that overlapping.


@pytest.mark.parametrize("tokens,span,overlap,expected", [
    (10, 10, 3, [0]),            # fits: one window
    (11, 10, 3, [0, 7]),         # one token over: a second window
    (24, 10, 3, [0, 7, 14]),     # the last window ends exactly at the end
    (25, 10, 3, [0, 7, 14, 21]),
    (12, 4, 9, list(range(9))),  # an overlap past the span (a long prompt) still advances a token a window
])
def test_window_starts_cover_every_token(tokens, span, overlap, expected):
    starts = list(Windows(span, overlap, 100, 2).starts(tokens, span))
    assert starts == expected
    covered = set().union(*(range(s, min(s + span, tokens)) for s in starts))
    assert covered == set(range(tokens))


def test_windows_settings_out_of_bounds_are_refused(reference_models):
    from pydantic import ValidationError

    from embedding_service.config import LongInputSettings
    from embedding_service.model.tokenization import InputEncoder

    with pytest.raises(ValidationError, match="overlap_tokens"):
        LongInputSettings(window_tokens=64, overlap_tokens=64)
    with pytest.raises(ValueError, match="exceeds the 254 input tokens"):
        InputEncoder(reference_models[MINILM], LongInputSettings(window_tokens=255))
    with pytest.raises(ValueError, match="must be below the window"):
        InputEncoder(reference_models[MINILM], LongInputSettings(overlap_tokens=254))
    windows = InputEncoder(reference_models[MINILM], LongInputSettings(window_tokens=100, max_windows=3)).windows
    assert windows.max_tokens == 100 + 2 * (100 - 12) + 2  # overlap: an eighth of the window
