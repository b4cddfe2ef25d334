"""The project's exception for files that cannot be read, written or converted as a BLOOM checkpoint."""

from __future__ import annotations


class ConversionError(ValueError):
    """A checkpoint, layer file or model folder that cannot be read or converted; the message says
    what to check."""


class UntrustedCheckpointError(ConversionError):
    """A checkpoint file whose pickle names a type outside the allow-list of
    megatron/checkpoint/pickle_scan.py: loading it could run arbitrary code, so it is refused."""
