"""Our one extension to Triton's config: a top-level ``optimize { ... }`` block (``optimize:`` mapping in
YAML/JSON). Triton's ModelConfig message has no such field, so the block is cut out of the text before
protobuf parses the rest, and read into a plain dict for ``optimizers.OptimizeOptions``."""

from __future__ import annotations

from typing import Any

from google.protobuf import text_format

from server.errors import LoadFailed

BLOCK = "optimize"


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


def _fields(tokens: list[str], index: int) -> tuple[dict[str, Any], int]:
    fields: dict[str, Any] = {}
    while index < len(tokens) and tokens[index] != "}":
        key = tokens[index]
        index += 1
        if index < len(tokens) and tokens[index] == ":":
            index += 1
        if index >= len(tokens):
            raise LoadFailed(f"config.pbtxt: optimize.{key}: missing value")
        if tokens[index] == "{":
            fields[key], index = _fields(tokens, index + 1)
            index += 1  # the closing brace
        else:
            fields[key] = _scalar(tokens[index])
            index += 1
        if index < len(tokens) and tokens[index] in (",", ";"):
            index += 1
    return fields, index


def _scalar(token: str) -> Any:
    if token[:1] in "\"'":
        return token[1:-1]
    if token in ("true", "false"):
        return token == "true"
    for kind in (int, float):
        try:
            return kind(token)
        except ValueError:
            pass
    return token
