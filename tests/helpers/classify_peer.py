"""A scripted stand-in for the service's Classify, GetModel, Tokenize and Detokenize (served by
gateways.scripted_grpc_peer), for the gateway's classification and tokenizer routes: a "model" of LABELS whose scores
are a function of the input, a "tokenizer" of one token per word, every request kept, refusals as scripted."""

from __future__ import annotations

import math
import re
import threading

from embedding_client.v1 import embedding_pb2 as pb
from embedding_service.wire.reasons import ServiceError
from tests.helpers.gateways import ScriptedPeer

LABELS = ("sports", "politics", "science", "arts")
DEFAULT_CLASSIFIER = "peer-classifier"  # the model a Classify naming none gets
DEFAULT_MODEL = "peer-embedder"  # the model a Tokenize or Detokenize naming none gets
MAX_SEQUENCE_LENGTH = 128
CLS, SEP = 101, 102  # the "tokenizer's" special tokens
SPECIAL = {CLS: "[CLS]", SEP: "[SEP]"}
FIRST_WORD_ID = 1000


def logits(text: str, pair: str = "") -> list[float]:
    """The peer's "model": a different logit per label, and per input."""
    return [float((len(text) * (j + 2) + 3 * len(pair) + j) % 11 - 5) for j in range(len(LABELS))]


def scores(text: str, pair: str = "", raw: bool = False) -> list[float]:
    """Each label's score in label-id order: the logits, or their sigmoid (as float32 on the wire)."""
    return [float(pb.LabelScore(score=x if raw else 1 / (1 + math.exp(-x))).score) for x in logits(text, pair)]


def ranked(text: str, pair: str = "", raw: bool = False) -> list[tuple[str, float]]:
    """(label, score) highest first, ties in label order, as the service ranks them."""
    values = scores(text, pair, raw)
    return [(LABELS[j], values[j]) for j in sorted(range(len(LABELS)), key=lambda j: (-values[j], j))]


class ClassifyPeer(ScriptedPeer):
    """Classify returns at most `max_labels` labels per input (the service's max_labels_per_result); each call of
    Classify, Tokenize or Detokenize first fails with the next of `refusals`, while any are left."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list = []
        self.refusals: list[ServiceError] = []
        self.max_labels = 100
        self.get_model_calls = 0
        self.words: dict[str, int] = {}
        self.lock = threading.Lock()

    def _received(self, request, context) -> None:
        with self.lock:
            self.requests.append(request)
            refusal = self.refusals.pop(0) if self.refusals else None
        if refusal is not None:
            context.set_trailing_metadata([("grpc-status-details-bin", refusal.status_bytes())])
            context.abort(refusal.code, refusal.message)

    def Classify(self, request, context):
        self._received(request, context)
        most = min(request.top_k, self.max_labels) if request.HasField("top_k") else self.max_labels
        results = []
        for i, item in enumerate(request.inputs):
            labels = [pb.LabelScore(label=label, label_id=LABELS.index(label), score=score)
                      for label, score in ranked(item.text, item.text_pair, request.raw_scores)[:most]]
            results.append(pb.Classification(index=i, labels=labels, tokens=len(item.text) + len(item.text_pair)))
        tokens = sum(c.tokens for c in results)
        return pb.ClassifyResponse(model=request.model or DEFAULT_CLASSIFIER, classifications=results,
                                   usage=pb.Usage(prompt_tokens=tokens, total_tokens=tokens))

    def GetModel(self, request, context):
        with self.lock:
            self.get_model_calls += 1
        return pb.GetModelResponse(model=pb.Model(name=request.name, kind=pb.MODEL_KIND_CLASSIFY, labels=LABELS,
                                                  dimension=len(LABELS), activation="sigmoid"))

    def _word_id(self, word: str) -> int:
        with self.lock:
            return self.words.setdefault(word, FIRST_WORD_ID + len(self.words))

    def tokenized(self, text: str, add_special_tokens: bool = True) -> pb.TokenizedInput:
        """The peer's tokenizer: one token per word, its offsets in code points; [CLS] and [SEP] around them."""
        out = pb.TokenizedInput()
        if add_special_tokens:
            out.ids.append(CLS)
            out.tokens.append(SPECIAL[CLS])
            out.starts.append(0)
            out.ends.append(0)
            out.special.append(True)
        for word in re.finditer(r"\S+", text):
            out.ids.append(self._word_id(word.group()))
            out.tokens.append(word.group())
            out.starts.append(word.start())
            out.ends.append(word.end())
            out.special.append(False)
        if add_special_tokens:
            out.ids.append(SEP)
            out.tokens.append(SPECIAL[SEP])
            out.starts.append(0)
            out.ends.append(0)
            out.special.append(True)
        return out

    def Tokenize(self, request, context):
        self._received(request, context)
        add = request.add_special_tokens if request.HasField("add_special_tokens") else True
        inputs = []
        for i, text in enumerate(request.inputs):
            tokenized = self.tokenized(text, add)
            tokenized.index = i
            if not request.return_tokens:
                del tokenized.tokens[:], tokenized.special[:]
            if not request.return_offsets:
                del tokenized.starts[:], tokenized.ends[:]
            inputs.append(tokenized)
        count = sum(len(t.ids) for t in inputs)
        return pb.TokenizeResponse(model=request.model or DEFAULT_MODEL, inputs=inputs,
                                   max_sequence_length=MAX_SEQUENCE_LENGTH,
                                   usage=pb.Usage(prompt_tokens=count, total_tokens=count))

    def Detokenize(self, request, context):
        self._received(request, context)
        with self.lock:
            words = {i: w for w, i in self.words.items()}
        texts = [" ".join(SPECIAL[i] if i in SPECIAL else words.get(i, "[UNK]") for i in sequence.ids
                          if not (request.skip_special_tokens and i in SPECIAL)) for sequence in request.inputs]
        return pb.DetokenizeResponse(model=request.model or DEFAULT_MODEL, texts=texts)
