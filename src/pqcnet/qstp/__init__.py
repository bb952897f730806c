"""QSTP — the pqcnet tunnel core: TLS 1.3 with ML-KEM key exchange and ML-DSA mutual
auth (via the OpenSSL bundled in `cryptography`), plus a sans-IO frame layer.

The asyncio API (documented in :mod:`pqcnet.qstp.aio`) is re-exported here and loaded on
first use, so ``import qstp.errors`` stays cheap and free of import cycles::

    from pqcnet import qstp
    tunnel = await qstp.connect(host, port, identity, policy)
    server = await qstp.serve(handler, host, port, identity, policy)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pqcnet.qstp.aio import Server, Stream, Tunnel, connect, serve

__all__ = ["Server", "Stream", "Tunnel", "connect", "serve"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from pqcnet.qstp import aio

        return getattr(aio, name)
    raise AttributeError(f"module 'qstp' has no attribute {name!r}")
