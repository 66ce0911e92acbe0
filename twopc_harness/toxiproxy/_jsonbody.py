"""Request-body decoding with the rules of Go's encoding/json, which the real server uses:
only the first JSON value counts, keys match fields case-insensitively, unknown keys and
nulls are skipped, and a value of the wrong type is an error."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import NoReturn

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# Field kinds, named by the Go type that the real server decodes into.
STRING, BOOL, FLOAT32, INT64, OBJECT = "string", "bool", "float32", "int64", "object"


class DecodeError(Exception):
    """Message text as Go's decoder would word it."""


def _reject_constant(name: str) -> NoReturn:
    raise DecodeError(f"invalid character '{name[0]}' looking for beginning of value")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def parse(body: bytes) -> object:
    text = body.decode("utf-8", errors="replace").lstrip(" \t\r\n")
    if not text:
        raise DecodeError("EOF")
    try:
        value, _ = _DECODER.raw_decode(text)
    except json.JSONDecodeError as exc:
        truncated = exc.pos >= len(text.rstrip(" \t\r\n")) or exc.msg.startswith("Unterminated")
        if truncated:
            raise DecodeError("unexpected EOF") from None
        raise DecodeError(
            f"invalid character '{text[exc.pos]}' looking for beginning of value"
        ) from None
    return value


def json_kind(value: object) -> str:
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "bool"
    return "number"


def _fits(value: object, kind: str) -> bool:
    if kind == STRING:
        return isinstance(value, str)
    if kind == BOOL:
        return isinstance(value, bool)
    if kind == FLOAT32:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == INT64:
        return type(value) is int and INT64_MIN <= value <= INT64_MAX
    return isinstance(value, dict)


def fields(value: object, struct: str, spec: Mapping[str, str]) -> dict[str, object]:
    """The fields of spec (name -> kind) present in a JSON object decoded into Go type `struct`."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise DecodeError(
            f"json: cannot unmarshal {json_kind(value)} into Go value of type {struct}"
        )
    by_folded = {name.lower(): name for name in spec}
    found: dict[str, object] = {}
    for key, item in value.items():
        name = by_folded.get(key.lower())
        if name is None or item is None:
            continue
        kind = spec[name]
        if not _fits(item, kind):
            shown = json_kind(item)
            if shown == "number" and kind == INT64:
                shown = f"number {item}"
            go_type = "map[string]interface {}" if kind == OBJECT else kind
            field = f"{struct}.{name}"
            raise DecodeError(
                f"json: cannot unmarshal {shown} into Go struct field {field} of type {go_type}"
            )
        found[name] = item
    return found
