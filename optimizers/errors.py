"""Errors the optimizer raises to its caller. Everything else (a pass that crashes, a candidate that fails the
accuracy guard) is recorded in the report instead, so a bad candidate never stops a model from loading."""

from __future__ import annotations


class OptimizeError(Exception):
    """The pipeline cannot run as asked: a wrong option, an unusable samples file, a missing target device.
    The message says what is wrong and which field to fix."""


class OptionsError(OptimizeError, ValueError):
    """An ``optimize`` block (or CLI flag) that does not validate; the message names the field."""
