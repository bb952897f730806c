"""The sentry config file's schema: what keys exist, their types and bounds.

These pydantic models describe the YAML exactly as written (paths are strings, key
files are names); :mod:`pqcnet.sentry.config` validates a file against
:class:`SentryFile` and then builds the runtime objects the core uses (loaded issuer
keys, ACL, sanitizer policies). Rules JSON Schema cannot state — a route names a
defined backend, a key file can be read — are checked there, with the same
one-line ``file: key.path: problem`` errors.

:class:`BackendConfig` and :class:`Bounds` are used as they are by the core (nothing
in them needs converting).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, model_validator

from pqcnet._util.schema import (
    HOSTPORT_PATTERN,
    HTTP_URL_PATTERN,
    Count,
    HexBytes,
    HostPort,
    Port,
    Positive,
    Schema,
)
from pqcnet.identity.policy import RuleSpec, SpiffeLayoutSpec

BackendKind = Literal["http", "grpc", "tcp"]
BACKEND_KINDS: tuple[BackendKind, ...] = ("http", "grpc", "tcp")


class BackendConfig(Schema):
    """One upstream the sentry forwards to."""

    name: str = Field(min_length=1)
    """Name routes and tcp requests refer to."""
    kind: BackendKind
    """http (JSON-RPC / REST over HTTP/1.1), grpc, or tcp."""
    target: str
    """http: base URL ``http://127.0.0.1:8080``; grpc/tcp: ``host:port``."""
    tenants: tuple[str, ...] = Field(strict=False)
    """Tenants whose requests may reach this backend (namespace isolation)."""
    timeout: Positive = 10.0
    """Seconds per request (connect + response head)."""
    max_connections: Count = 100
    """Pooled connections kept to this backend."""
    tls_ca: str = ""
    """https backends: PEM CA bundle to trust (relative to the config file; empty: the
    system trust store)."""
    tls_cert: str = ""
    """https backends: client certificate (PEM) for backends that require one."""
    tls_key: str = ""
    """https backends: the client certificate's private key (PEM)."""

    model_config = ConfigDict(json_schema_extra={
        "if": {"properties": {"kind": {"const": "http"}}},
        "then": {"properties": {"target": {"pattern": HTTP_URL_PATTERN}}},
        "else": {"properties": {"target": {"pattern": HOSTPORT_PATTERN}}},
    })


class Bounds(Schema):
    """Named bounds of the sentry's request handling."""

    max_request_body: Count = 4 * 1024 * 1024
    """Largest request body read into memory, bytes (the sanitizer needs whole JSON)."""
    request_read_timeout: Positive = 10.0
    """Seconds for a client to deliver head + body on a stream (slowloris bound)."""
    response_write_timeout: float = Field(default=30.0, gt=0, le=3600)
    """Seconds one write of a response may wait for the client to read (QSTP flow
    control) before the stream is reset: a client that stops reading a large response
    gives back its concurrency-gate slot and backend connection. Per write, so a slow
    client that keeps reading gets everything. Also bounds each write of a streaming
    gRPC call's messages and of a TCP pipe's bytes to the client."""
    tcp_idle_timeout: float = Field(default=600.0, gt=0, le=86_400)
    """Seconds a raw TCP pipe or a WebSocket may move no byte in either direction before
    the sentry closes it (both sides) and frees its gate slot; like nginx's stream
    ``proxy_timeout``. A backend that stops reading stalls the pipe, so it ends too."""
    grpc_stream_idle_timeout: float = Field(default=600.0, gt=0, le=86_400)
    """Seconds a streaming gRPC call may move no message in either direction before
    the sentry cancels the backend call, ends the client's with UNAVAILABLE and frees
    its gate slot — like Envoy's ``stream_idle_timeout``. A watch-style stream that may
    stay silent longer needs this raised (or a heartbeat message)."""
    max_tunnels: Count = 1024
    """QSTP tunnels served at once; one more is refused when it connects. Each open
    tunnel costs a socket and about 74 KiB (``pqcnet bench memory``)."""
    tunnel_buffer_bytes: int = Field(default=8 * 1024 * 1024, ge=65_536, le=2**31 - 1)
    """Most bytes one tunnel may make the sentry buffer: the QSTP connection window it
    grants (a stream's window is the smaller of this and 4 MiB). What a slow consumer
    can pile up is ``max_tunnels`` times this (defaults: 1024 x 8 MiB = 8 GiB worst case);
    ``tunnel_buffer_total_bytes`` caps their sum."""
    tunnel_buffer_total_bytes: int = Field(default=1024**3, ge=0, le=2**40)
    """Most bytes all tunnels together may make the sentry buffer beyond 64 KiB each: a
    tunnel takes its window beyond 64 KiB from this budget when it opens and gives it
    back when it closes; one that opens while it is spent starts with 64 KiB and grows
    as it frees. Under ``--workers N`` each worker gets ``1/N`` of it (the kernel
    spreads tunnels evenly), so it bounds the host."""


class RouteSpec(Schema):
    """First route whose ``prefix`` starts the request path (or gRPC method) wins."""

    prefix: str
    """Path or gRPC method prefix."""
    backend: str
    """Name of an http or grpc backend."""


class PlanSpec(Schema):
    """A token bucket: sustained rate and burst."""

    rate: Positive
    """Requests per second, per client (tenant, subject)."""
    burst: float = Field(ge=1)
    """Bucket size (requests)."""
    tenant_rate: Positive | None = None
    """Requests per second of the whole tenant, all subjects and tunnels together
    (default: ``rate`` — minting subjects does not multiply it)."""
    tenant_burst: float | None = Field(default=None, ge=1)
    """Tenant-wide bucket size (default: ``burst``)."""
    tunnel_rate: Positive | None = None
    """Requests per second one tunnel identity (sidecar) may send for the tenant
    (default: the tenant's)."""
    tunnel_burst: float | None = Field(default=None, ge=1)
    """Per-tunnel bucket size (default: the tenant's)."""
    max_in_flight: Count | None = None
    """RPCs (streams and TCP pipes included) this tenant may have in flight at once;
    in ``limits.default``: every tenant whose own plan sets none (default:
    ``limits.tenant_share`` of ``limits.max_in_flight``)."""
    pipe_rate: Positive | None = None
    """Bytes per second all this tenant's pipes (TCP pipes, WebSockets) may move,
    both directions together, over every worker; a pipe above it is slowed (read
    less often), never cut (default: no limit)."""
    pipe_burst: float | None = Field(default=None, ge=65536)
    """Bytes the tenant's pipes may move at once after a quiet spell (default: one
    second of ``pipe_rate``, at least 64 KiB)."""


class LimitsSpec(Schema):
    """Concurrency gate and per-client rate limits."""

    max_in_flight: Count
    """Global concurrency gate (never queues)."""
    tenant_share: float = Field(default=0.5, gt=0, le=1)
    """Most of ``max_in_flight`` one tenant may hold at once, rounded up (a plan's own
    ``max_in_flight`` overrides it): one tenant's long-lived gRPC streams and TCP pipes
    cannot take the whole gate from the others. 1: no per-tenant cap. One cap over
    the workers of ``--workers N`` (shared memory), like the gate."""
    default: PlanSpec
    """Per client (tenant, subject) plan when the tenant has none."""
    tenants: dict[str, PlanSpec] = Field(default_factory=dict)
    """Per-tenant plans."""


class AclSpec(Schema):
    """Who may call what: per-tenant ``rules`` (first match wins), or the older global
    ``allow_from`` + ``allow_methods`` (one allow rule for every tenant). No rule
    denies everything (fail closed)."""

    rules: dict[str, list[RuleSpec]] | None = None
    """Rule lists per tenant (``*``: every tenant): ``{action: allow|deny, from: [SPIFFE
    patterns], methods: [method-key globs]}``; the first matching rule decides."""
    allow_from: list[str] | None = None
    """Older form: SPIFFE ID patterns allowed to call (per-segment globs, literal trust
    domain)."""
    allow_methods: list[str] | None = None
    """Older form: ``METHOD /path`` globs, gRPC ``/pkg.Service/*``, ``TCP <backend>``."""

    @model_validator(mode="after")
    def _one_form(self) -> AclSpec:
        legacy = self.allow_from is not None or self.allow_methods is not None
        if legacy and self.rules is not None:
            raise ValueError(
                "rules: give either rules or the older allow_from/allow_methods, not both; "
                "to migrate, move them into one rule: rules: {'*': [{action: allow, from: "
                "<allow_from>, methods: <allow_methods>}]}")
        if legacy and (self.allow_from is None or self.allow_methods is None):
            raise ValueError("allow_methods: the older form needs both allow_from and "
                             "allow_methods (or write rules)")
        if not legacy and self.rules is None:
            raise ValueError("rules: required (per-tenant rule lists), or the older "
                             "allow_from + allow_methods")
        return self


class ReplaceAction(Schema):
    """Replace the value by a fixed string."""

    replace: str


#: strip | hash | {replace: value}
Action = Literal["strip", "hash"] | ReplaceAction


class SanitizerSpec(Schema):
    """One tenant's identity sanitizer: rules and the HMAC key of ``hash``."""

    key_hex: HexBytes | None = None
    """HMAC key, hex (at least 16 bytes)."""
    key_file: str | None = None
    """File holding the HMAC key (used when key_hex is absent)."""
    headers: dict[str, Action] = Field(default_factory=dict)
    """Header / gRPC metadata name (case-insensitive) -> action."""
    json_fields: dict[str, Action] = Field(default_factory=dict)
    """Dotted JSON body path -> action."""

    model_config = ConfigDict(json_schema_extra={
        "anyOf": [{"required": ["key_hex"]}, {"required": ["key_file"]}]})


class SentryFile(Schema):
    """A sentry config file (``pqcnet sentry run --config``)."""

    listen: HostPort
    """QSTP listen address."""
    identity_dir: str = ""
    """Node identity directory (``pqcnet ca issue ... --out``); required to run."""
    ledger: str = ""
    """QS-DAG directory: anchors sanitizer policies and attestations (empty: none)."""
    ledger_dev_genesis: bool = True
    """Create a dev genesis with this node as authority when the ledger has none."""
    attestation_interval: Positive = 60.0
    """Seconds between attestation events (with a ledger)."""
    metrics_port: Port = 0
    """Operations HTTP: Prometheus /metrics, /healthz, /readyz (0: off)."""
    metrics_host: str = "127.0.0.1"
    """Address of the operations HTTP port (``0.0.0.0`` in a container)."""
    spiffe_layouts: list[SpiffeLayoutSpec] = Field(default_factory=list)
    """How tenant/role/node are read from peers' SPIFFE IDs of other shapes than
    ``tenant/role/node`` (first fitting template; unread IDs have no tenant)."""
    issuers: dict[str, Annotated[list[str], Field(min_length=1)]]
    """Per tenant: ML-DSA public key files trusted to sign session assertions."""
    limits: LimitsSpec
    acl: AclSpec
    sanitizer: dict[str, SanitizerSpec] = Field(default_factory=dict)
    """Per tenant identity sanitizer."""
    backends: list[BackendConfig]
    """Upstreams."""
    routes: list[RouteSpec] = Field(default_factory=list)
    """First matching prefix wins, per kind."""
    bounds: Bounds = Field(default_factory=Bounds)
    assertion_cache_size: Count = 100_000
    """Verified session assertions remembered."""
    clock_skew: float = Field(default=30.0, ge=0)
    """Seconds of clock difference tolerated on assertion times."""


__all__ = [
    "BACKEND_KINDS", "AclSpec", "Action", "BackendConfig", "BackendKind", "Bounds",
    "LimitsSpec", "PlanSpec", "ReplaceAction", "RouteSpec", "SanitizerSpec", "SentryFile",
]
