"""Our one extension to Triton's config: a top-level ``optimize { ... }`` block (``optimize:`` mapping in
YAML/JSON). Triton's ModelConfig message has no such field, so the block is cut out of the text before
protobuf parses the rest, and read into a plain dict for ``optimizers.OptimizeOptions``."""

from __future__ import annotations

import math
import re
from typing import Any

from google.protobuf import text_format

from server.errors import LoadFailed

BLOCK = "optimize"
MAX_DEPTH = 8
"""Nesting of the block (its real fields nest two deep); deeper is refused before recursion runs out."""
INTEGER = re.compile(r"-?[0-9]{1,19}")
DECIMAL = re.compile(r"-?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][+-]?[0-9]+)?")


def check_block(block: dict[str, Any]) -> None:
    """Check an ``optimize`` block as a load will use it, before anything is published: finite numbers
    only (YAML's ``.nan``, JSON's ``Infinity`` and ``1e999`` compare false against every bound), no
    deeper nesting than MAX_DEPTH, then the optimizer's own field and range checks."""
    _check_values(block, "optimize", 0)
    from optimizers import OptimizeOptions, OptionsError  # the optimizer's schema; imported when needed

    try:
        options = OptimizeOptions.from_config_dict(block)
    except OptionsError as exc:
        raise LoadFailed(str(exc)) from None
    _check_values(options.model_dump(), "optimize", 0)  # the strings "nan"/"inf" become floats there


def _check_values(value: Any, where: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise LoadFailed(f"{where}: nested more than {MAX_DEPTH} deep")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_values(item, f"{where}.{key}", depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_values(item, where, depth + 1)
    elif isinstance(value, float) and not math.isfinite(value):
        raise LoadFailed(f"{where}: {value} is not a finite number")


def split_pbtxt(text: str) -> tuple[str, dict[str, Any] | None]:
    """Return the config text without its top-level ``optimize`` block, and that block as a dict."""
    span = _find_block(text)
    if span is None:
        return text, None
    start, body_start, end = span
    return text[:start] + text[end + 1 :], _parse_block(text[body_start:end])


def _find_block(text: str) -> tuple[int, int, int] | None:
    """(start of the name, start of the body, index of the closing brace) of ``optimize { ... }`` at depth 0,
    skipping strings and comments."""
    depth, index, length = 0, 0, len(text)
    while index < length:
        char = text[index]
        if char in "\"'":
            index = _string_end(text, index)
        elif char == "#":
            newline = text.find("\n", index)
            index = length if newline < 0 else newline
        elif char in "{[<":
            depth += 1
        elif char in "}]>":
            depth -= 1
        elif depth == 0 and text.startswith(BLOCK, index) and _is_word_start(text, index):
            after = index + len(BLOCK)
            rest = text[after:].lstrip(" \t\r\n:")
            if rest.startswith("{"):
                body = length - len(rest) + 1
                return index, body, _matching_brace(text, body)
        index += 1
    return None


def _is_word_start(text: str, index: int) -> bool:
    before = text[index - 1] if index else " "
    after = text[index + len(BLOCK)] if index + len(BLOCK) < len(text) else " "
    return not (before.isalnum() or before == "_") and not (after.isalnum() or after == "_")


def _string_end(text: str, start: int) -> int:
    quote, index = text[start], start + 1
    while index < len(text) and text[index] != quote:
        index += 2 if text[index] == "\\" else 1
    return index


def _matching_brace(text: str, body: int) -> int:
    depth, index = 1, body
    while index < len(text):
        char = text[index]
        if char in "\"'":
            index = _string_end(text, index)
        elif char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return index
        index += 1
    raise LoadFailed("config.pbtxt: the optimize { ... } block is not closed")


def _parse_block(body: str) -> dict[str, Any]:
    """Read ``key: value`` / ``key { ... }`` pairs into a dict (strings, numbers, bools, names, lists)."""
    tokenizer = text_format.Tokenizer(body.splitlines())
    tokens: list[str] = []
    while not tokenizer.AtEnd():
        tokens.append(tokenizer.token)
        tokenizer.NextToken()
    value, index = _fields(tokens, 0)
    if index != len(tokens):
        raise LoadFailed(f"config.pbtxt: optimize block: unexpected {tokens[index]!r}")
    return value


def _fields(tokens: list[str], index: int, depth: int = 0) -> tuple[dict[str, Any], int]:
    if depth > MAX_DEPTH:
        raise LoadFailed(f"config.pbtxt: optimize block: nested more than {MAX_DEPTH} deep")
    fields: dict[str, Any] = {}
    while index < len(tokens) and tokens[index] != "}":
        key = tokens[index]
        index += 1
        if index < len(tokens) and tokens[index] == ":":
            index += 1
        if index >= len(tokens):
            raise LoadFailed(f"config.pbtxt: optimize.{key}: missing value")
        if tokens[index] == "{":
            fields[key], index = _fields(tokens, index + 1, depth + 1)
            index += 1  # the closing brace
        else:
            fields[key] = _scalar(tokens[index])
            index += 1
        if index < len(tokens) and tokens[index] in (",", ";"):
            index += 1
    return fields, index


def _scalar(token: str) -> Any:
    """A quoted string, true/false, a number in ASCII digits (``int()``/``float()`` alone would also take
    ``1_000``, non-ASCII digits, ``nan`` and ``inf``), else the bare word (an enum-like name)."""
    if token[:1] in "\"'":
        return token[1:-1]
    if token in ("true", "false"):
        return token == "true"
    if INTEGER.fullmatch(token):
        return int(token)
    if DECIMAL.fullmatch(token):
        number = float(token)
        if not math.isfinite(number):
            raise LoadFailed(f"config.pbtxt: optimize block: {token!r} is not a finite number")
        return number
    return token
