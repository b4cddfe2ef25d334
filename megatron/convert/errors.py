"""The one exception type of the converters."""

from __future__ import annotations


class ConversionError(ValueError):
    """A checkpoint or model folder that cannot be converted; the message says what to check."""
