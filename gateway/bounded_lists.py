"""The list fields of the REST requests (embeddings' `input`, rerank's `documents`, sparse `input`), checked by the
JSON type they arrive as, their length bounded before their items are looked at, and the first problem reported alone.

pydantic's unions try every member on every item and collect one error per item per member: a list of 900,000 floats
made 900,001 errors, seconds of the event loop and a gigabyte. Here the first item decides which form a list is, and
a check stops at the first item that does not fit, naming it: `input[3]: expected a string, as input[0] is`.
"""

from __future__ import annotations

from pydantic_core import PydanticCustomError

INT32_MAX = 2**31 - 1  # token ids are int32 on the wire


def problem(path: str, message: str) -> PydanticCustomError:
    """The one error of a list field, with the path of what is wrong in it."""
    return PydanticCustomError("invalid_list", f"{path}: {message}")


def _is_int(value: object) -> bool:
    return type(value) is int  # JSON's true and false arrive as bool, an int to isinstance


def _first_not(items: list, kind: type) -> int | None:
    """The index of the first item not of `kind`; the types over the list are gathered in C first, as a list that
    fits is the common case."""
    if set(map(type, items)) <= {kind}:
        return None
    return next(i for i, item in enumerate(items) if type(item) is not kind)


def _bounded(items: list, path: str, most: int, what: str, per: str) -> None:
    if len(items) > most:
        raise problem(path, f"{len(items)} {what}; at most {most} per {per}")


def token_ids(items: list, path: str, max_token_ids: int) -> list[int]:
    """One input given as token ids: non-negative int32s, at most `max_token_ids`."""
    _bounded(items, path, max_token_ids, "token ids", "input")
    wrong = _first_not(items, int)
    if wrong is not None:
        raise problem(f"{path}[{wrong}]", "expected a token id (an integer)")
    if items and (min(items) < 0 or max(items) > INT32_MAX):
        wrong = next(i for i, t in enumerate(items) if not 0 <= t <= INT32_MAX)
        raise problem(f"{path}[{wrong}]", "token ids must be non-negative 32-bit integers")
    return items


def embedding_input(value: object, max_inputs: int, max_token_ids: int) -> str | list:
    """OpenAI's `input`: a string, an array of strings, an array of token ids (one input) or an array of arrays of
    token ids, told apart by the first item. An empty array passes: the service refuses it with its own reason."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise problem("input", "expected a string, an array of strings, an array of token ids or an array of arrays "
                               "of token ids")
    if not value:
        return value
    first = value[0]
    if _is_int(first):
        return token_ids(value, "input", max_token_ids)
    if isinstance(first, str):
        _bounded(value, "input", max_inputs, "inputs", "request")
        wrong = _first_not(value, str)
        if wrong is not None:
            raise problem(f"input[{wrong}]", "expected a string, as input[0] is")
        return value
    if isinstance(first, list):
        _bounded(value, "input", max_inputs, "inputs", "request")
        for i, item in enumerate(value):
            if not isinstance(item, list):
                raise problem(f"input[{i}]", "expected an array of token ids, as input[0] is")
            token_ids(item, f"input[{i}]", max_token_ids)
        return value
    raise problem("input[0]", "expected a string or token ids")


def texts(value: object, path: str, max_inputs: int) -> str | list[str]:
    """A string or an array of strings (the sparse route's `input`)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise problem(path, "expected a string or an array of strings")
    _bounded(value, path, max_inputs, "inputs", "request")
    wrong = _first_not(value, str)
    if wrong is not None:
        raise problem(f"{path}[{wrong}]", "expected a string")
    return value


def documents(value: object, max_documents: int) -> list[str]:
    """Rerank's `documents`: strings, or objects with a string `text` as Cohere's v1 and Jina's APIs send them
    (their other keys ignored); their texts. An empty array passes: the service refuses it with its own reason."""
    if not isinstance(value, list):
        raise problem("documents", 'expected an array of strings or of objects with a string "text"')
    _bounded(value, "documents", max_documents, "documents", "request")
    out = []
    for i, document in enumerate(value):
        if type(document) is str:
            out.append(document)
        elif type(document) is dict and type(document.get("text")) is str:
            out.append(document["text"])
        else:
            raise problem(f"documents[{i}]", 'expected a string or an object with a string "text"')
    return out
