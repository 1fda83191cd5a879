"""JSON in and out for everything a client can send or receive.

`json.loads` accepts more than is safe to hand to the rest of the server:
nesting deep enough to raise RecursionError, integers long enough to raise
ValueError (Python refuses to convert more than 4,300 digits), NaN and
Infinity (not JSON at all, and they come back out as invalid JSON), and
escaped lone surrogates ("\\ud800") that parse fine but raise
UnicodeEncodeError the moment the string is sent, logged or stored. `loads`
turns every one of those into a JSONLimitError with a stable `code`, so a
protocol adapter can map it to one error message instead of a crash.

`dumps` is the other direction: `allow_nan=False` and `ensure_ascii=False`,
so what the server sends is always valid JSON that encodes as UTF-8.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_BYTES = 64 * 1024
MAX_DEPTH = 32
MAX_INT_DIGITS = 100
"""Longer integers are no id, count or rate anyone sends; past 4,300 digits
Python's own int() raises ValueError, and long ones are slow to convert."""

_SURROGATE = re.compile("[\ud800-\udfff]")


class JSONLimitError(ValueError):
    """Input `loads` refuses; `code` is one of json.too_large, json.too_deep,
    json.bad_number, json.bad_constant, json.bad_string, json.invalid."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# ------------------------------------------------------------------ loads
def loads(data: str | bytes, *, max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """Parse one JSON document from a client, or raise JSONLimitError.

    The value returned holds only dicts, lists, str (valid Unicode), finite
    floats, ints of at most MAX_INT_DIGITS digits, bool and None, nested at
    most `max_depth` containers deep, so `dumps` can always send it back.
    """
    text = _as_text(data, max_bytes)
    try:
        value = json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_refuse_constant)
    except json.JSONDecodeError as e:
        raise JSONLimitError("json.invalid", f"not valid JSON: {e.msg} (at character {e.pos})") from None
    except RecursionError:  # the C scanner recurses once per level: ~990 levels exhaust the stack
        raise JSONLimitError("json.too_deep", f"JSON nested deeper than {max_depth} levels") from None
    _check_tree(value, max_depth)
    return value


def _as_text(data: str | bytes, max_bytes: int) -> str:
    """Size check first (before any parsing work), then strict UTF-8: json.loads
    would otherwise guess UTF-16/32 for bytes and accept what no client means."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
        if len(raw) > max_bytes:
            raise JSONLimitError("json.too_large", f"JSON of {len(raw)} bytes; the limit is {max_bytes}")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise JSONLimitError("json.invalid", f"JSON is not valid UTF-8 (byte {e.start})") from None
    if not isinstance(data, str):
        raise TypeError(f"safe_json.loads takes str or bytes, not {type(data).__name__}")
    size = len(data) if data.isascii() or len(data) > max_bytes else len(data.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise JSONLimitError("json.too_large", f"JSON of at least {size} bytes; the limit is {max_bytes}")
    return data


def _parse_int(digits: str) -> int:
    """Refuse long integers before int() spends time on (or refuses) them."""
    if len(digits) - digits.startswith("-") > MAX_INT_DIGITS:
        raise JSONLimitError("json.bad_number", f"integer of {len(digits)} digits; the limit is {MAX_INT_DIGITS}")
    return int(digits)


def _parse_float(text: str) -> float:
    """1e999 parses as inf, which no JSON encoder may send back."""
    value = float(text)
    if not math.isfinite(value):
        raise JSONLimitError("json.bad_number", f"number {text[:32]} is out of range")
    return value


def _refuse_constant(name: str) -> Any:
    """NaN, Infinity and -Infinity are JavaScript, not JSON (RFC 8259 §6)."""
    raise JSONLimitError("json.bad_constant", f"{name} is not a JSON value")


def _check_tree(value: Any, max_depth: int) -> None:
    """Depth and string checks in one iterative walk: a recursive one would
    hit the very RecursionError this module exists to avoid."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            _check_string(node)
        elif isinstance(node, (dict, list)):
            if depth >= max_depth:
                raise JSONLimitError("json.too_deep", f"JSON nested deeper than {max_depth} levels")
            if isinstance(node, dict):
                for key, item in node.items():
                    _check_string(key)
                    stack.append((item, depth + 1))
            else:
                stack.extend((item, depth + 1) for item in node)


def _check_string(text: str) -> None:
    """A lone surrogate is legal JSON syntax but not Unicode: it would raise
    UnicodeEncodeError later, wherever the string is first encoded."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise JSONLimitError("json.bad_string", f"string holds a lone surrogate at index {e.start}") from None


# ------------------------------------------------------------------ dumps
def dumps(obj: Any, *, compact: bool = False) -> str:
    """Serialise for the wire: never NaN/Infinity (invalid JSON that clients
    choke on), never a lone surrogate (UnicodeEncodeError in the socket).

    Such values can only come from inside the server (a metric divided by
    zero, text cut in the middle of a pair); rather than killing the socket
    over one field, they are sent as null and U+FFFD.
    """
    separators = (",", ":") if compact else None
    try:
        text = json.dumps(obj, allow_nan=False, ensure_ascii=False, separators=separators)
        if not text.isascii():
            text.encode("utf-8")
        return text
    except (ValueError, UnicodeEncodeError):
        return json.dumps(_sanitise(obj), allow_nan=False, ensure_ascii=False, separators=separators)


def _sanitise(obj: Any) -> Any:
    """A copy with non-finite floats as None and lone surrogates replaced."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, str):
        return obj if obj.isascii() else _SURROGATE.sub("\ufffd", obj)
    if isinstance(obj, dict):
        return {_sanitise(k): _sanitise(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_sanitise(v) for v in obj]
    return obj
