"""Request bodies parsed as JSON, their values counted before the parse.

Each JSON value becomes a Python object of 30 to 100 bytes however few bytes it took in the body (`[],` is three
bytes and a 56-byte list, `0.1,` four bytes and a 24-byte float and its 8-byte slot), so a body well within the byte
bound could parse into gigabytes. The values are counted first, in C over the bytes (a few ms per MB), and a body that
holds more than the bound is refused unparsed.
"""

from __future__ import annotations

import gc
import re

from pydantic_core import from_json

from gateway import errors

# Every JSON value but the body's own follows one of these: an array's or object's opening, a comma, a key's colon.
_BEFORE_A_VALUE = (b"[", b"{", b",", b":")
# A string once its escaped backslashes and quotes are gone (_unescaped): no quote inside.
_STRING = re.compile(rb'"[^"]*"')


def _marks(raw: bytes | bytearray) -> int:
    return 1 + sum(raw.count(mark) for mark in _BEFORE_A_VALUE)


def _unescaped(raw: bytes | bytearray) -> bytes | bytearray:
    """`raw` without its escaped backslashes and quotes: every quote left opens or closes a string. Pairs of
    backslashes go first, left to right, as a JSON reader pairs them."""
    if b"\\" not in raw:
        return raw
    return raw.replace(b"\\\\", b"").replace(b'\\"', b"")


def values_over(raw: bytes | bytearray, bound: int) -> int | None:
    """A count over `bound` of the values parsing `raw` would make, or None when they are at most `bound`. Exact
    for JSON but that an empty array or object counts one more; the strings alone when they are over the bound.

    The quick count takes every comma, colon and bracket, those inside strings too; only when it is over the bound
    are the strings counted (each is a value) and then taken out, so long texts full of commas are not refused.
    """
    quick = _marks(raw)
    if quick <= bound:
        return None
    unescaped = _unescaped(raw)
    strings = unescaped.count(b'"') // 2
    if strings > bound:
        return strings
    exact = _marks(_STRING.sub(b'""', unescaped))
    return exact if exact > bound else None


def load(raw: bytes | bytearray, max_values: int) -> object:
    """The body's JSON as Python objects, once it is known to hold at most `max_values` values; OpenAI's 400
    otherwise, or when it is no JSON."""
    counted = values_over(raw, max_values)
    if counted is not None:
        raise errors.too_many_values(counted, max_values)
    try:
        return _parsed(raw)
    except ValueError as exc:
        raise errors.invalid_request(f"Invalid JSON: {exc}") from None


def _parsed(raw: bytes | bytearray) -> object:
    """pydantic's own parser (the JSON the schemas always took), the cycle collector paused: parsed JSON holds no
    cycles, and the passes that every 700 new lists or dicts set off cost more than the parse (262,144 empty arrays:
    179 ms in the gateway with them, ~15 without)."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        return from_json(raw)
    finally:
        if collecting:
            gc.enable()
