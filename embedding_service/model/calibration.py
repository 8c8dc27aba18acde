"""A model's calibration: fp32 torch vectors of the canary and gate sentences, bound to the model's weights.

Shipped for the packaged model (model/calibrations/<fingerprint>.npz) and made for any
other with `python -m embedding_service calibrate --model PATH --out FILE`
(then `calibration: FILE` in the model's settings). Replicas check their backend
against it at start-up (model/verification.py): the canary always, the accuracy gate
for precisions other than fp32. A model without one still starts: its replicas
compute the reference with fp32 torch first (logged; the gate's 5,000
sentences take seconds to minutes on CPU).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from embedding_service.model.accuracy import corpus
from embedding_service.observability.logs import service_logger

logger = service_logger(__name__)

SHIPPED = "embedding_service.model.calibrations"
SHIPPED_SOURCE = "shipped calibration"
COMPUTED_SOURCE = "computed at start-up with fp32 torch"


@dataclass(frozen=True)
class Calibration:
    fingerprint: str
    canary: np.ndarray  # float32 [canary sentences, dim]
    gate: np.ndarray  # float32 [gate sentences, dim] (stored as float16: cosines move < 1e-6)
    source: str


def fingerprint(model) -> str:
    """sha256 of what decides the vectors: the weights, the tokenizer and the maximum sequence length."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(dtype=torch.uint8).numpy())
    # Without truncation and padding: sentence-transformers sets them on the shared tokenizer at each call.
    tokenizer = {k: v for k, v in json.loads(model.tokenizer.backend_tokenizer.to_str()).items()
                 if k not in ("truncation", "padding")}
    digest.update(json.dumps(tokenizer, sort_keys=True).encode())
    digest.update(str(model.max_seq_length).encode())
    return digest.hexdigest()


def reference_vectors(model, sentences) -> np.ndarray:
    """sentence-transformers' own fp32 vectors, batches of 32, on the model's device."""
    return np.asarray(model.encode(list(sentences), batch_size=32, convert_to_numpy=True), dtype=np.float32)


def compute(model, gate: bool = True, known_fingerprint: str | None = None) -> Calibration:
    """The reference vectors; with `gate` False only the canary's (the gate is for precisions below fp32).
    `known_fingerprint`: the model's, when the caller has it already."""
    c = corpus()
    canary = reference_vectors(model, c.canary)
    vectors = reference_vectors(model, c.gate) if gate else np.empty((0, canary.shape[1]), np.float32)
    return Calibration(known_fingerprint or fingerprint(model), canary, vectors, COMPUTED_SOURCE)


def save(calibration: Calibration, path: str | Path) -> None:
    np.savez_compressed(path, fingerprint=np.array(calibration.fingerprint), canary=calibration.canary,
                        gate=calibration.gate.astype(np.float16))


def load(path, source: str, gate: bool = True) -> Calibration:
    """The file's vectors; the gate's only when `gate` (fp32 replicas check the canary alone)."""
    with np.load(path) as data:
        canary = data["canary"].astype(np.float32)
        vectors = data["gate"].astype(np.float32) if gate else np.empty((0, canary.shape[1]), np.float32)
        return Calibration(str(data["fingerprint"]), canary, vectors, source)


def shipped_path(model_fingerprint: str):
    return resources.files(SHIPPED).joinpath(f"{model_fingerprint[:16]}.npz")


def calibration_for(model, configured: str, gate: bool) -> Calibration:
    """The configured file, else the shipped one for these weights, else computed now (the gate's vectors
    only when `gate`)."""
    own = fingerprint(model)
    if configured != "auto":
        calibration = load(configured, configured, gate)
        if calibration.fingerprint != own:
            raise ValueError(f"calibration {configured} was made for other weights, tokenizer or max_seq_length "
                             f"({calibration.fingerprint[:16]}, this model is {own[:16]}); run "
                             f"`python -m embedding_service calibrate` again")
        return calibration
    path = shipped_path(own)
    if path.is_file():
        with resources.as_file(path) as file:
            return load(file, SHIPPED_SOURCE, gate)
    if gate:
        logger.warning("no calibration for this model (%s): computing fp32 torch reference vectors of the gate "
                       "now; `python -m embedding_service calibrate` makes one to ship", own[:16])
    return compute(model, gate, own)

