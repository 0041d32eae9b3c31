"""One strict rule for numbers that arrive as text (URL parts, headers, parameters, file keys).

``str.isdigit()`` accepts ``²``, ``①`` and fullwidth digits, and ``int()`` then either raises (a 500 where a
400 belongs) or quietly reads them as numbers. Everything the server reads from a client goes through here:
plain ASCII digits only, no sign, no spaces, no underscores, and a bound checked before ``int()`` runs, so a
ten-thousand-digit string costs nothing.
"""

from __future__ import annotations

import re

from server.errors import InvalidInput

ASCII_UINT = re.compile(r"[0-9]{1,19}")
POSITIVE = re.compile(r"[1-9][0-9]{0,18}")
INT64_MAX = 2**63 - 1


def is_ascii_uint(text: str) -> bool:
    """Whether ``text`` is a non-negative integer in plain ASCII digits that fits in int64."""
    return ASCII_UINT.fullmatch(text) is not None and int(text) <= INT64_MAX


def parse_uint(text: str, what: str) -> int:
    """A non-negative ASCII integer (``0``..int64 max); InvalidInput naming ``what`` otherwise."""
    if not is_ascii_uint(text):
        raise InvalidInput(f"{what}: {text[:40]!r} must be a non-negative integer in ASCII digits")
    return int(text)


def parse_positive(text: str, what: str) -> int:
    """A positive ASCII integer without leading zeros (a model version, a file key's version)."""
    if POSITIVE.fullmatch(text) is None or int(text) > INT64_MAX:
        raise InvalidInput(f"{what}: {text[:40]!r} must be a positive integer in ASCII digits")
    return int(text)
