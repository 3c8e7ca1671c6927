"""Exceptions that mean "lowbit is not set up right here" (imports nothing, so it always loads)."""

from __future__ import annotations


class SetupError(RuntimeError):
    """The installation or environment cannot run lowbit; the message says what to do."""
