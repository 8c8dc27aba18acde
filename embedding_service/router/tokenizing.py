"""Tokenize and Detokenize: a model's own tokenizer (its replica's, as tokenizers' JSON in ModelInfo) run in the
router, which holds it already to cut calls into shards; no replica is asked.

Ids are the tokenizer's with its single-text template's special tokens (as the model adds them) unless the caller
leaves them out, untruncated. Decoding is the tokenizer's, then transformers' clean-up of spaces before
punctuation where the model's tokenizer config asks for it (clean_up_tokenization_spaces), so a text decodes
as the model's own transformers tokenizer decodes it.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer

from embedding_client.v1 import embedding_pb2 as pb
from embedding_service.config import Limits
from embedding_service.router.validation import text_within_limits
from embedding_service.wire.reasons import Reason, ServiceError

# transformers' PreTrainedTokenizerBase.clean_up_tokenization, in its order.
_CLEAN_UPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
              (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class ModelTokenizer:
    def __init__(self, tokenizer: Tokenizer, decode_cleanup: bool) -> None:
        """`tokenizer`: the model's, without padding or truncation (the catalog's TokenLengths copy, shared);
        `decode_cleanup`: ModelInfo.decode_cleanup."""
        self._tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.cleanup = decode_cleanup

    def tokenize(self, texts: Sequence[str], special: bool, tokens: bool, offsets: bool) -> list[pb.TokenizedInput]:
        out = []
        for index, e in enumerate(self._tokenizer.encode_batch(list(texts), add_special_tokens=special)):
            item = pb.TokenizedInput(index=index, ids=e.ids)
            if tokens:
                item.tokens.extend(e.tokens)
                item.special.extend(bool(s) for s in e.special_tokens_mask)
            if offsets:
                item.starts.extend(start for start, _ in e.offsets)
                item.ends.extend(end for _, end in e.offsets)
            out.append(item)
        return out

    def detokenize(self, sequences: Sequence[Sequence[int]], skip_special: bool) -> list[str]:
        texts = self._tokenizer.decode_batch([list(s) for s in sequences], skip_special_tokens=skip_special)
        return [self._cleaned(t) for t in texts] if self.cleanup else texts

    @staticmethod
    def _cleaned(text: str) -> str:
        for before, after in _CLEAN_UPS:
            text = text.replace(before, after)
        return text


def tokenize_inputs(request: pb.TokenizeRequest, limits: Limits) -> list[str]:
    """The texts of a Tokenize (their count checked with the envelope), each within the limits."""
    return [text_within_limits(t, i, "input", limits, "inputs") for i, t in enumerate(request.inputs)]


def detokenize_inputs(request: pb.DetokenizeRequest, limits: Limits, vocab_size: int, model: str) -> list[list[int]]:
    """The id sequences of a Detokenize (their count checked with the envelope), within the ids one call may carry
    and the model's vocabulary."""
    total = sum(len(s.ids) for s in request.inputs)
    if total > limits.max_token_ids_per_detokenize:
        raise ServiceError(Reason.INPUT_TOO_LARGE, f"{total} token ids in one call; the limit is "
                           f"{limits.max_token_ids_per_detokenize}", count=total,
                           limit=limits.max_token_ids_per_detokenize, field="inputs")
    sequences = []
    for index, s in enumerate(request.inputs):
        ids = list(s.ids)
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ServiceError(Reason.TOKEN_ID_OUT_OF_RANGE, f"input {index} has token id {bad} outside "
                               f"[0, {vocab_size}) of model {model!r}", index=index, token_id=bad,
                               vocab_size=vocab_size)
        sequences.append(ids)
    return sequences
