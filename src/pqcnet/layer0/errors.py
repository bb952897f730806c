"""Layer-0 errors::

    PqcnetError
    └── Layer0Error
        ├── EnvelopeInvalid      commitment or signature does not check out
        ├── ProofInvalid         a Merkle inclusion proof does not reach the root
        └── SequenceError        a channel's sequence would not strictly increase
"""

from __future__ import annotations

from pqcnet.errors import PqcnetError


class Layer0Error(PqcnetError):
    """Root of Layer-0 anchoring errors."""


class EnvelopeInvalid(Layer0Error):
    """An envelope's payload commitment or signature is wrong."""


class ProofInvalid(Layer0Error):
    """An inclusion proof is malformed or does not verify against the root."""


class SequenceError(Layer0Error):
    """Envelope sequences on a channel must strictly increase."""
