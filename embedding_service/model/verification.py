"""A replica's start-up check of its backend against fp32 torch: the canary, then the accuracy gate.

Every replica embeds the canary sentences and compares them with the fp32
torch vectors of its model's calibration (model/calibration.py): a backend, device or
precision that drifts (a broken kernel, a corrupted quantization scale, a GPU
computing garbage) is caught before it serves, and a mixed fleet (torch on one
node, OpenVINO on another) cannot silently return vectors that disagree.
Precisions other than fp32 also measure the gate sentences (model/accuracy.py) and
must reach the configured gate. A replica that fails either refuses to serve:
it stays up to say why (GetModel, WatchNodes), but the recycler does not count
it as serving, so its model's health is NOT_SERVING unless another replica serves.
Backend auto first tries torch in place of a compiled backend that fails
(forward.checked_runtime).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from embedding_service.config import ModelSettings
from embedding_service.model.accuracy import canary_failure, corpus, gate_failure, measure
from embedding_service.model.calibration import Calibration
from embedding_service.observability.logs import service_logger
from embedding_service.wire.messages import Verification

logger = service_logger(__name__)


def check(embed: Callable[[Sequence[str]], np.ndarray], calibration: Calibration,
          settings: ModelSettings) -> Verification:
    """`embed(texts)`: the replica's own vectors for texts, as it would serve them. The canary, then the gate below
    fp32, not logged: backend auto may try torch after a refusal (forward.checked_runtime), and only the check of
    the backend that stays is reported (`report`)."""
    gate = settings.accuracy_gate
    threshold = settings.canary_threshold
    worst, refused = canary_failure(embed(corpus().canary), calibration.canary, threshold)
    accuracy = None
    if refused is None and settings.precision != "fp32":
        accuracy = measure(embed(corpus().gate), calibration.gate)
        refused = gate_failure(accuracy, gate.min_mean_cosine, gate.min_recall_at_10)
    if refused is not None:
        refused = f"{settings.precision} on this backend: {refused}"
    return Verification(settings.precision, calibration.source, worst, threshold, accuracy,
                        gate.min_mean_cosine, gate.min_recall_at_10, refused)


def report(verification: Verification, settings: ModelSettings) -> None:
    """The check of the backend that serves, logged: ERROR with the reason it refuses, else INFO with its figures."""
    if verification.refused is not None:
        logger.error("model %s: refusing to serve: %s", settings.name, verification.refused)
        return
    accuracy = verification.accuracy
    logger.info("model %s: %s passed its canary (min cosine %.6f)%s", settings.name, settings.precision,
                verification.canary_min_cosine, "" if accuracy is None else
                f" and gate (mean cosine {accuracy.mean_cosine:.5f}, recall@10 {accuracy.recall_at_10:.4f})")
