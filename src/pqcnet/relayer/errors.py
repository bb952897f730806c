"""The relayer's error tree, rooted in :class:`pqcnet.errors.PqcnetError`.

Every error that can reach a publisher carries a wire ``code`` (sent back in an
``IngressReply`` error) and says whether retrying later can succeed, so the
publisher SDK can tell "fix your frame" from "come back in a second"::

    RelayerError
    ├── ConfigError              invalid relayer configuration
    │   └── SingleProcessBackend  --workers N with a backend one process must own (embedded)
    ├── FrameRejected            a publisher's frame is malformed (code per reason)
    │   ├── FieldMissing         a required field is absent or empty
    │   ├── FieldTooLarge        a field exceeds its named bound
    │   ├── SeqNotMonotonic      seq went backwards on a tunnel without the retry flag
    │   ├── LateFrame            seq is below where the topic's delivery moved past (gap)
    │   └── NotAuthorized        the peer's identity has no grant for this customer/channel
    ├── BusError                 a bus backend failed (``retriable`` says if worth retrying)
    │   └── BusUnavailable       the backend cannot be reached / timed out (retriable)
    ├── OverflowFull             the local overflow queue reached its bound (retriable)
    ├── QuotaExceeded            the customer's frames/s or bytes/s quota is used up (retriable)
    ├── ProofError               a volume proof or inclusion proof does not verify
    │   ├── ReceiptInvalid       a customer receipt, its proofs or its anchors do not verify
    │   ├── CounterInvalid       a signed ack counter or over-claim evidence does not verify
    │   └── ReceiptRefused       no receipt for that caller/customer/epoch
    └── GovernanceError          the governance gRPC call failed
"""

from __future__ import annotations

from pqcnet.errors import PqcnetError


class RelayerError(PqcnetError):
    """Root of relayer errors. ``code`` is the wire code; ``retriable`` the hint."""

    code: int = 1  # INTERNAL
    retriable: bool = False


class ConfigError(RelayerError):
    """The relayer configuration is invalid (message names the key)."""

    code = 2


class SingleProcessBackend(ConfigError):
    """``relayer run --workers N`` (N > 1) with the embedded backend: its RocksDB log is
    opened by one process only; several workers need backend redis or kafka."""


class FrameRejected(RelayerError):
    """A publisher frame was refused; nothing of it was published."""

    code = 10


class FieldMissing(FrameRejected):
    """A required frame field is absent or empty."""

    code = 11


class FieldTooLarge(FrameRejected):
    """A frame field exceeds its configured bound."""

    code = 12


class SeqNotMonotonic(FrameRejected):
    """A topic's seq went backwards on one tunnel and the frame was not marked a retry."""

    code = 13


class LateFrame(FrameRejected):
    """The frame's seq is below the topic's delivery point: its gap was already skipped
    (or the seq was delivered and this is not a retry). Refused before any ack; the
    message names the seq delivery resumed at. Publish it again under a new seq."""

    code = 15


class NotAuthorized(FrameRejected):
    """The peer's SPIFFE identity may not publish to / subscribe from this customer's
    channel (see :mod:`pqcnet.relayer.authz`); nothing was published or delivered."""

    code = 16


class BusError(RelayerError):
    """A bus backend operation failed."""

    code = 20

    def __init__(self, message: str, *, retriable: bool = False) -> None:
        super().__init__(message)
        self.retriable = retriable


class BusUnavailable(BusError):
    """The backend is down or slower than the configured timeout."""

    code = 21

    def __init__(self, message: str) -> None:
        super().__init__(message, retriable=True)


class OverflowFull(RelayerError):
    """The local overflow queue is at its bound; the frame was not accepted."""

    code = 30
    retriable = True


class QuotaExceeded(RelayerError):
    """A customer's per-relayer quota (frames/s or bytes/s) is used up; retry after
    ``retry_after`` seconds."""

    code = 33
    retriable = True

    def __init__(self, message: str, *, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ProofError(RelayerError):
    """A volume proof, signature or Merkle inclusion proof failed to verify."""

    code = 40


class ReceiptInvalid(ProofError):
    """A volume receipt, one of its proofs, its anchor vertex or its Layer-0 envelope
    does not verify (the message names which)."""

    code = 41


class CounterInvalid(ProofError):
    """A client-signed ack counter, or evidence built on one, does not verify."""

    code = 42


class ReceiptRefused(ProofError):
    """No receipt: the epoch is not proven (yet, or any more), or the caller's SPIFFE
    tenant is not the customer it asks about."""

    code = 43


class GovernanceError(RelayerError):
    """A governance (gRPC) request failed."""

    code = 50
