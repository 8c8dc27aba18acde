"""The list fields of TEI's and vLLM's classify and tokenizer requests that bounded_lists does not cover: TEI's
`/predict` inputs (texts and [text, text_pair] pairs) and token id sequences to decode. As there, each is told apart
by its JSON type, its length bounded before its items are looked at, and its first problem alone reported with its
path."""

from __future__ import annotations

from gateway.bounded_lists import problem, token_ids

PREDICT_INPUTS = "expected a string, a pair [text, text_pair] or an array of [text] and [text, text_pair] arrays"


def _at_most(count: int, path: str, most: int, what: str) -> None:
    if count > most:
        raise problem(path, f"{count} {what}; at most {most} per request")


def _sequence(item: object, path: str) -> list[str]:
    """One TEI sequence: [text] or [text, text_pair]."""
    if type(item) is not list or not 1 <= len(item) <= 2:
        raise problem(path, "expected [text] or [text, text_pair]")
    for i, text in enumerate(item):
        if type(text) is not str:
            raise problem(f"{path}[{i}]", "expected a string")
    return item


def predict_inputs(value: object, max_inputs: int) -> str | list:
    """TEI's `inputs` as its server reads them: a string, one [text] or [text, text_pair] (a list whose first item
    is a string), or a batch of those arrays (a list whose first item is an array)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not value:
        raise problem("inputs", PREDICT_INPUTS)
    if isinstance(value[0], str):
        return _sequence(value, "inputs")
    if isinstance(value[0], list):
        _at_most(len(value), "inputs", max_inputs, "inputs")
        for i, item in enumerate(value):
            _sequence(item, f"inputs[{i}]")
        return value
    raise problem("inputs[0]", "expected a string or an array of strings")


def is_one_input(value: str | list) -> bool:
    """Whether validated predict inputs are one input (answered with its labels) rather than a batch (a list of
    those)."""
    return isinstance(value, str) or isinstance(value[0], str)


def id_sequence(value: object, path: str, max_ids: int) -> list[int]:
    """vLLM's `tokens`: one array of token ids, non-negative int32s, at most `max_ids`."""
    if not isinstance(value, list):
        raise problem(path, "expected an array of token ids")
    _at_most(len(value), path, max_ids, "token ids")
    return token_ids(value, path, max_ids)


def id_sequences(value: object, path: str, max_inputs: int, max_ids: int) -> list:
    """TEI's `ids`: one array of token ids, or an array of them (at most `max_inputs`), told apart by the first item;
    at most `max_ids` ids in all. An empty array is one empty sequence, as TEI reads it."""
    if not isinstance(value, list):
        raise problem(path, "expected an array of token ids or an array of arrays of token ids")
    if not value or type(value[0]) is int:
        return id_sequence(value, path, max_ids)
    if not isinstance(value[0], list):
        raise problem(f"{path}[0]", "expected a token id or an array of token ids")
    _at_most(len(value), path, max_inputs, "inputs")
    wrong = next((i for i, item in enumerate(value) if not isinstance(item, list)), None)
    if wrong is not None:
        raise problem(f"{path}[{wrong}]", f"expected an array of token ids, as {path}[0] is")
    _at_most(sum(map(len, value)), path, max_ids, "token ids")
    for i, item in enumerate(value):
        token_ids(item, f"{path}[{i}]", max_ids)
    return value


def is_one_sequence(value: list) -> bool:
    """Whether validated `ids` are one sequence rather than a batch of them."""
    return not value or not isinstance(value[0], list)
