"""The control plane's error tree, rooted in :class:`pqcnet.errors.PqcnetError`.

Receive-side failures are *drops*: each carries a short ``reason`` that becomes the
label of the drop counter, so every discarded message is counted by cause::

    MeshError
    ├── EnvelopeRejected            a received control message was dropped (``reason``)
    │   ├── MalformedMessage        cannot be decoded (reason "malformed")
    │   ├── UnknownSender           no key for the sender (reason "unknown_sender")
    │   ├── RevokedSender           sender revoked or slashed (reason "revoked")
    │   ├── BadSignature            signature missing or invalid (reason "bad_signature")
    │   ├── ReplayedMessage         counter outside/seen in the window (reason "replay")
    │   ├── StaleMessage            timestamp skew / expired (reason "stale")
    │   ├── NotForUs                sealed to another recipient (reason "not_for_us")
    │   └── CrlRejected             a gossiped CRL is not the CA's, or not newer (``reason``)
    ├── WakuError                   the Waku REST endpoint failed (``retriable``)
    │   └── WakuUnavailable         connection refused / timeout / 5xx (retriable)
    ├── TransportClosed             the transport or subscription was closed
    ├── BundleStoreError            the DTN store could not read/write
    ├── DirectiveError              a governance directive was refused (``reason``)
    │   ├── UnderThreshold          fewer valid governance signatures than the threshold
    │   ├── DirectiveExpired        outside its validity window, or a lifetime too long
    │   ├── DirectiveReplayed       already applied here (also across restarts)
    │   └── NotAnchored             this node cannot anchor it (no ledger, ledger refused)
    ├── LedgerRejected              the QS-DAG refused to anchor something
    └── ConfigError                 a mesh configuration value is out of range
"""

from __future__ import annotations

from pqcnet.errors import PqcnetError


class MeshError(PqcnetError):
    """Root of control-plane errors."""


class EnvelopeRejected(MeshError):
    """A received control message was dropped; ``reason`` labels the drop counter."""

    reason = "rejected"


class MalformedMessage(EnvelopeRejected):
    """The bytes do not decode as a control message."""

    reason = "malformed"


class UnknownSender(EnvelopeRejected):
    """No verification key is known for the sender (or for that key version)."""

    reason = "unknown_sender"


class RevokedSender(EnvelopeRejected):
    """The sender's key is revoked or the node has been slashed."""

    reason = "revoked"


class BadSignature(EnvelopeRejected):
    """The signature is missing or does not verify."""

    reason = "bad_signature"


class ReplayedMessage(EnvelopeRejected):
    """The counter was already seen, or is older than the replay window."""

    reason = "replay"


class DuplicateMessage(EnvelopeRejected):
    """A gossip message id already seen (normal in gossip; counted separately)."""

    reason = "duplicate"


class StaleMessage(EnvelopeRejected):
    """Timestamp too far from our clock, or past its expiry."""

    reason = "stale"


class NotForUs(EnvelopeRejected):
    """Sealed to a recipient key we do not hold."""

    reason = "not_for_us"


class WakuError(MeshError):
    """A Waku REST call failed. ``retriable`` says whether trying again may help."""

    retriable = False

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class WakuUnavailable(WakuError):
    """The node did not answer (refused, timeout, 5xx): retry later."""

    retriable = True


class TransportClosed(MeshError):
    """The transport or subscription is closed."""


class BundleStoreError(MeshError):
    """The DTN bundle store failed to read or write."""


class CrlRejected(EnvelopeRejected):
    """A gossiped CRL was refused: not signed by a CA of our trust bundle
    (``crl_untrusted``), older than the one we hold (``crl_stale``), or the very one we
    hold (``crl_duplicate``). Never applied, never forwarded."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class DirectiveError(MeshError):
    """A governance directive was refused; ``reason`` labels the rejection counter
    (``invalid`` unless the subclass or the raiser names a more precise one, e.g.
    ``no_policy``)."""

    reason = "invalid"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class UnderThreshold(DirectiveError):
    """Fewer distinct valid governance signatures than the policy's threshold."""

    reason = "under_threshold"

    def __init__(self, message: str, *, valid: int = 0) -> None:
        super().__init__(message)
        #: how many distinct governance keys did sign validly
        self.valid = valid


class DirectiveExpired(DirectiveError):
    """Past ``expires_ms``, issued in the future, or valid for longer than allowed."""

    reason = "expired"


class DirectiveReplayed(DirectiveError):
    """A directive id this node has already applied (the replay window is anchored in
    the node's QS-DAG, so it holds across restarts)."""

    reason = "replay"


class NotAnchored(DirectiveError):
    """The directive could not be anchored in this node's QS-DAG, so it is not applied
    (``no_ledger``: the node has none; ``anchor_queue_full``: too many waiting)."""

    reason = "unanchored"


class LedgerRejected(MeshError):
    """The QS-DAG refused to anchor a directive, key version or vertex."""


class ConfigError(MeshError):
    """A mesh configuration value is missing or out of range."""
