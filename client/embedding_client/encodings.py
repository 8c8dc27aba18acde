"""The wire vocabulary of embed(): truncation policies and output types, and their proto values.

The one table of both, read by the clients, the gateway (its `output_dtype`) and the service (which maps a
request's encoding back to sentence-transformers' precision names).
"""

from __future__ import annotations

import numpy as np

from embedding_client.v1 import embedding_pb2 as pb

# embed(truncation=...): "windows" embeds a long input whole, in overlapping windows pooled by the service
# (Model.long_inputs).
TRUNCATION = {"end": pb.TRUNCATION_POLICY_END, "start": pb.TRUNCATION_POLICY_START,
              "reject": pb.TRUNCATION_POLICY_REJECT, "windows": pb.TRUNCATION_POLICY_WINDOWS}
# embed(output=...): the encoding asked for and the dtype of each vector's bytes. int8/uint8: one byte per dimension
# in the model's published ranges (ranges()); binary/ubinary: sign bits packed 8 to a byte (sentence-transformers'
# quantize_embeddings types).
OUTPUTS = {
    "float": (pb.VECTOR_ENCODING_FLOAT32_LE, np.dtype("<f4")),
    "int8": (pb.VECTOR_ENCODING_INT8, np.dtype(np.int8)),
    "uint8": (pb.VECTOR_ENCODING_UINT8, np.dtype(np.uint8)),
    "binary": (pb.VECTOR_ENCODING_BINARY, np.dtype(np.int8)),
    "ubinary": (pb.VECTOR_ENCODING_UBINARY, np.dtype(np.uint8)),
}
