"""The sentry's error tree: every rejection a client can see has its own class.

Each class carries the ``outcome`` label used in metrics and in the response head
(``RpcResponseHead.error``), plus the HTTP status and gRPC code a sidecar maps it to,
so one exception is enough to count, log and answer a refusal consistently::

    PqcnetError
    └── SentryError
        ├── SentryConfigError            bad YAML / values, refused at load
        ├── WireError                    malformed request/response head block
        │   └── RequestTooLarge          a named bound was exceeded
        ├── Unauthenticated              no usable session assertion
        │   ├── MalformedAssertion       not decodable (base64url / protobuf / fields)
        │   ├── UnknownIssuer            issuer key not configured for the tenant
        │   ├── BadSignature             ML-DSA verification failed
        │   ├── AssertionExpired         outside [issued_at, expires_at]
        │   ├── WrongTenant              assertion tenant != tunnel peer tenant
        │   └── ChannelBindingMismatch   bound to another tunnel (replay)
        ├── ClientTooSlow                a response write waited too long for the client
        ├── PipeIdle                     a TCP pipe moved nothing for its idle timeout
        ├── StreamIdle                   a streaming gRPC call moved no message for its
        │                                idle timeout
        ├── Denied                       ACL / tenant namespace refused
        ├── RateLimited                  token bucket empty or concurrency gate full
        └── BackendError                 the backend failed or timed out (retriable)
"""

from __future__ import annotations

from pqcnet.errors import PqcnetError


class SentryError(PqcnetError):
    """Root of sentry errors. ``outcome`` is the metrics / wire label."""

    outcome = "error"
    http_status = 500
    grpc_code = 13  # INTERNAL
    retriable = False


class SentryConfigError(SentryError):
    """A sentry or sidecar configuration is invalid."""

    outcome = "config_error"


class WireError(SentryError):
    """A head block on a sentry stream could not be decoded."""

    outcome = "bad_request"
    http_status = 400
    grpc_code = 3  # INVALID_ARGUMENT


class RequestTooLarge(WireError):
    """A request exceeded a configured bound (head size, header count, body)."""

    outcome = "too_large"
    http_status = 413
    grpc_code = 8  # RESOURCE_EXHAUSTED


class ClientTooSlow(SentryError):
    """The client did not read the response for ``bounds.response_write_timeout``
    seconds; its stream was reset (nothing can be sent on it any more)."""

    outcome = "error"


class PipeIdle(SentryError):
    """A raw TCP pipe or a WebSocket moved no byte either way for
    ``bounds.tcp_idle_timeout`` seconds; its stream was reset and the backend
    connection closed."""

    outcome = "error"


class StreamIdle(SentryError):
    """A streaming gRPC call moved no message either way for
    ``bounds.grpc_stream_idle_timeout`` seconds; the backend call was cancelled and the
    client got this code (UNAVAILABLE: nothing was wrong with its request)."""

    outcome = "error"
    grpc_code = 14  # UNAVAILABLE


class Unauthenticated(SentryError):
    """The request carried no valid session assertion."""

    outcome = "unauthenticated"
    http_status = 401
    grpc_code = 16  # UNAUTHENTICATED


class MalformedAssertion(Unauthenticated):
    """The assertion is not valid base64url / protobuf, or misses required fields."""


class UnknownIssuer(Unauthenticated):
    """The assertion's issuer key is not trusted for its tenant."""


class BadSignature(Unauthenticated):
    """The assertion's ML-DSA signature does not verify."""


class AssertionExpired(Unauthenticated):
    """The assertion is not valid at this time."""


class WrongTenant(Unauthenticated):
    """The assertion's tenant differs from the tenant of the tunnel's peer identity."""


class ChannelBindingMismatch(Unauthenticated):
    """The assertion is bound to a different QSTP tunnel (replayed)."""


class Denied(SentryError):
    """The ACL or tenant namespace policy refused the request."""

    outcome = "denied"
    http_status = 403
    grpc_code = 7  # PERMISSION_DENIED


class RateLimited(SentryError):
    """A limit was hit; ``retry_after`` seconds is when a retry can succeed."""

    outcome = "rate_limited"
    http_status = 429
    grpc_code = 8  # RESOURCE_EXHAUSTED
    retriable = True

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ConcurrencyLimited(RateLimited):
    """The sentry-wide concurrency gate is full (not the client's own bucket)."""


class TenantConcurrencyLimited(ConcurrencyLimited):
    """The tenant already holds its share of the concurrency gate
    (``limits.tenant_share`` or its plan's ``max_in_flight``)."""


class BackendError(SentryError):
    """The backend could not be reached, failed, or timed out."""

    outcome = "backend_error"
    http_status = 502
    grpc_code = 14  # UNAVAILABLE
    retriable = True


class PeerMismatch(BackendError):
    """The sidecar reached a node whose SPIFFE ID is not the sentry it pins
    (``--expect-peer``): e.g. a relayer's address given as the sentry's."""

    outcome = "wrong_peer"
    retriable = False


#: outcome label -> class, so a sidecar can rebuild the typed error from a head block.
BY_OUTCOME: dict[str, type[SentryError]] = {
    cls.outcome: cls
    for cls in (
        SentryError,
        WireError,
        RequestTooLarge,
        Unauthenticated,
        Denied,
        BackendError,
    )
}
