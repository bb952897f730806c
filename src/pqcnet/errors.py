"""The root of every pqcnet exception.

Every package roots its own error tree in :class:`PqcnetError`, so a caller (the CLI,
a service loop) can catch one class and turn it into a clear one-line message instead
of a traceback::

    PqcnetError
    ├── crypto.errors.CryptoError        a primitive refused its input
    ├── identity.errors.IdentityError    certificates, CA, CSRs, CRLs, key stores
    ├── qstp.errors.*                    handshake, frame protocol, closed tunnels
    ├── qsdag / layer0 / mesh / relayer / sentry / runtime errors

This module imports nothing from pqcnet: it sits at the bottom of the layer order.
"""

from __future__ import annotations

__all__ = ["PqcnetError"]


class PqcnetError(Exception):
    """Root of all pqcnet errors."""
