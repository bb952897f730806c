"""Real crypto for simulated nodes: seeded keys and the switchable verify-once cache.

**Keys** are derived from the run's seed (``SigningKey.from_seed``,
``RecipientKey.from_bytes``), so node key ids are the same on every run. ML-DSA
*signatures* stay randomized (FIPS 204 hedged signing); the simulator keeps their bytes
out of every ordering and every summary value.

**Verify-once.** When 1000 simulated receivers verify the same signed envelope, the
same ML-DSA verification (~0.16 ms) runs 1000 times in one process. Inside
:func:`verify_once` every ``VerifyKey.verify`` (envelopes, directives, ledger
vertices, volume proofs alike — they all go through it) is answered from a cache keyed
by ``sha256(context ‖ message ‖ signature)`` and the key id; the first verification of a
(digest, key) pair runs for real and its outcome — success or ``SignatureInvalid`` — is
remembered. Switch it off (``verify_cache: false``) to pay every verification.

The cache patches the ``VerifyKey.verify`` *class attribute* for the duration of the
``with`` block and restores it on exit. That is a test-style hook into another package,
kept in this one function: the seam the simulator would rather have is a pluggable
verification hook in ``pqcnet.crypto`` (recorded in ``simulations/README.md``).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

from pqcnet.crypto.errors import SignatureInvalid
from pqcnet.crypto.pqc import RecipientKey, SigningKey, VerifyKey

#: Verification outcomes remembered at most (LRU); ~100 bytes each.
MAX_VERIFY_CACHE = 1_000_000


@dataclass(slots=True)
class VerifyStats:
    """What the cache saved (or, switched off, what was paid)."""

    real: int = 0
    cached: int = 0
    failures: int = 0


def signing_key(seed: int, name: str) -> SigningKey:
    """The ML-DSA-65 key of ``name`` in the run seeded with ``seed``."""
    return SigningKey.from_seed(hashlib.sha256(f"pqcnet-sim/{seed}/sig/{name}".encode()).digest())


def recipient_key(seed: int, name: str) -> RecipientKey:
    """The X25519 + ML-KEM-768 seal key of ``name`` in the run seeded with ``seed``."""
    x25519 = hashlib.sha256(f"pqcnet-sim/{seed}/x25519/{name}".encode()).digest()
    mlkem = hashlib.sha512(f"pqcnet-sim/{seed}/mlkem/{name}".encode()).digest()
    return RecipientKey.from_bytes(x25519 + mlkem)


@contextlib.contextmanager
def verify_once(enabled: bool, stats: VerifyStats | None = None,
                capacity: int = MAX_VERIFY_CACHE) -> Iterator[VerifyStats]:
    """Count (and, if ``enabled``, cache) every ML-DSA verification inside the block."""
    out = stats if stats is not None else VerifyStats()
    real_verify = VerifyKey.verify
    cache: OrderedDict[bytes, bool] = OrderedDict()

    def counting(self: VerifyKey, signature: bytes, message: bytes, *,
                 context: bytes = b"") -> None:
        out.real += 1
        try:
            real_verify(self, signature, message, context=context)
        except SignatureInvalid:
            out.failures += 1
            raise

    def cached(self: VerifyKey, signature: bytes, message: bytes, *,
               context: bytes = b"") -> None:
        h = hashlib.sha256(self.key_id)
        h.update(len(context).to_bytes(2, "big") + context)
        h.update(len(message).to_bytes(4, "big") + message)
        h.update(signature)
        key = h.digest()
        ok = cache.get(key)
        if ok is None:
            out.real += 1
            try:
                real_verify(self, signature, message, context=context)
                ok = True
            except SignatureInvalid:
                ok = False
            cache[key] = ok
            if len(cache) > capacity:
                cache.popitem(last=False)
        else:
            out.cached += 1
        if not ok:
            out.failures += 1
            raise SignatureInvalid(f"{self.algorithm} signature does not verify")

    VerifyKey.verify = cached if enabled else counting  # type: ignore[method-assign]
    try:
        yield out
    finally:
        VerifyKey.verify = real_verify  # type: ignore[method-assign]
