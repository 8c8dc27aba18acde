"""Tokenize and Detokenize calls of the asyncio client (AsyncEmbedClient inherits them): any served model's
tokenizer, texts to token ids and back. Long lists are cut into calls within the service's published limits
(max_inputs_per_request and max_request_bytes; for Detokenize also max_token_ids_per_detokenize, all of a call's
ids together), each call with the client's retries, targets and deadline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from embedding_client.planning import plan_calls
from embedding_client.v1 import embedding_pb2 as pb


@dataclass(frozen=True)
class Tokenized:
    ids: list[int]  # untruncated: the model takes at most TokenizeResult.max_sequence_length
    tokens: list[str] | None = None  # with return_tokens: each token's string ...
    special: list[bool] | None = None  # ... and whether it is a special token
    offsets: list[tuple[int, int]] | None = None  # with return_offsets: [start, end) in code points; (0, 0) special


@dataclass(frozen=True)
class TokenizeResult:
    model: str
    inputs: list[Tokenized]  # one per text, in input order
    max_sequence_length: int  # the most tokens the model takes per input, special tokens included
    tokens: int  # every id returned


@dataclass(frozen=True)
class DetokenizeResult:
    model: str
    texts: list[str]  # one per id list, in input order


def _tokenized(t: pb.TokenizedInput, return_tokens: bool, return_offsets: bool) -> Tokenized:
    return Tokenized(list(t.ids), list(t.tokens) if return_tokens else None,
                     list(t.special) if return_tokens else None,
                     list(zip(t.starts, t.ends)) if return_offsets else None)


class TokenizeCalls:
    """Needs the client's limits_within(), call() and deadline()."""

    async def tokenize(self, texts: Sequence[str], *, model: str = "", add_special_tokens: bool = True,
                       return_tokens: bool = False, return_offsets: bool = False,
                       timeout_s: float | None = None) -> TokenizeResult:
        """Token ids of each text by the model's tokenizer (default: the service's default model), in order."""
        texts = list(texts)
        deadline = self.deadline(timeout_s)
        fields = {"model": model, "add_special_tokens": add_special_tokens, "return_tokens": return_tokens,
                  "return_offsets": return_offsets}
        placed: list[Tokenized | None] = [None] * len(texts)
        name, max_length, tokens = "", 0, 0
        if texts:
            limits = await self.limits_within(deadline)
            for start, end in plan_calls([len(t.encode()) for t in texts], limits.max_inputs_per_request,
                                         limits.max_request_bytes):
                reply = await self.call("Tokenize", pb.TokenizeRequest(inputs=texts[start:end], **fields),
                                        deadline=deadline)
                for t in reply.inputs:
                    placed[start + t.index] = _tokenized(t, return_tokens, return_offsets)
                name, max_length = reply.model, reply.max_sequence_length
                tokens += reply.usage.total_tokens
        return TokenizeResult(name, placed, max_length, tokens)

    async def detokenize(self, ids_lists: Sequence[Sequence[int]], *, model: str = "",
                         skip_special_tokens: bool = False, timeout_s: float | None = None) -> DetokenizeResult:
        """Each list of token ids decoded by the model's tokenizer, in order. A list is never split between calls
        (decoding is not additive across pieces: word pieces and spacing), so one longer than the service's
        max_token_ids_per_detokenize goes alone and the service refuses it."""
        inputs = [pb.TokenIds(ids=[int(i) for i in ids]) for ids in ids_lists]
        deadline = self.deadline(timeout_s)
        texts: list[str] = []
        name = ""
        if inputs:
            limits = await self.limits_within(deadline)
            for start, end in plan_calls([i.ByteSize() for i in inputs], limits.max_inputs_per_request,
                                         limits.max_request_bytes, counts=[len(i.ids) for i in inputs],
                                         max_count=limits.max_token_ids_per_detokenize):
                request = pb.DetokenizeRequest(model=model, inputs=inputs[start:end],
                                               skip_special_tokens=skip_special_tokens)
                reply = await self.call("Detokenize", request, deadline=deadline)
                texts.extend(reply.texts)
                name = reply.model
        return DetokenizeResult(name, texts)
