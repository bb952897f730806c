"""TLS 1.3 policy for QSTP: pyOpenSSL contexts, peer verification, channel binding.

This module decides *what* a QSTP handshake may negotiate and *whom* it accepts;
:mod:`pqcnet.qstp.connection` / :mod:`pqcnet.qstp.aio` drive the bytes. Every context is
TLS 1.3 only, ALPN ``qstp/1``, mutual ML-DSA certificate auth, with key-exchange
groups fixed by a :class:`TlsPolicy`:

``hybrid`` (default)   X25519MLKEM768
``strict``             MLKEM1024, SecP384r1MLKEM1024
``classical-allowed``  X25519MLKEM768 first, then X25519 / P-256 / P-384 — a
                       classical handshake is logged and counted in
                       ``pqcnet_qstp_classical_handshakes_total``.

Peer checks run *inside* the handshake (the verify callback), so a refused peer
never completes it. Each check runs once, where it is cheapest: OpenSSL checks the
chain signatures to our trust bundle, the validity window and (when we hold one)
the signature-checked CRL; the callback adds only what OpenSSL cannot know — the
leaf's SPIFFE ID (trust domain, allowed patterns), the policy's :class:`PeerGate`
(peers disabled at run time, e.g. slashed by governance) and ``require_crl``. A
failing check raises :class:`HandshakeRefused` out of ``do_handshake()`` with a
reason a human can act on, and OpenSSL sends the peer a fatal alert.
:func:`verify_peer` runs after the handshake and returns :class:`PeerInfo`: on a
full handshake it takes OpenSSL's verdict (no ML-DSA signature is checked twice)
and re-applies the cheap policy checks; on a resumed session, where no certificate
is exchanged, it is the only check — validity window, SPIFFE policy, gate and the
*current* CRL, plus the issuer signature against today's anchors, remembered per
(certificate, trust bundle) so a stream of resumptions pays for it once.

Driving a handshake (memory BIO)::

    conn = new_connection(build_context(identity, policy, server=False), server=False)
    try:
        conn.do_handshake()            # loop with bio_read/bio_write on WantReadError
    except SSL.WantReadError: ...
    except (SSL.Error, HandshakeError) as exc:
        raise handshake_error(exc) from None
    peer = verify_peer(conn, identity, policy)

In TLS 1.3 the *client* finishes before the server has checked the client's
certificate; a server-side refusal reaches the client as an alert on its first
read, which :func:`handshake_error` turns into ``HandshakeRefused("peer-refused")``.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import logging
import warnings
import weakref
from dataclasses import dataclass
from typing import Final, Literal, get_args

from cryptography import x509
from OpenSSL import SSL, crypto
from prometheus_client import Counter

from pqcnet.identity.certs import is_signed_by, load_certs, spiffe_id_of, utcnow
from pqcnet.identity.crl import RevocationList, load_crl
from pqcnet.identity.errors import IdentityError
from pqcnet.identity.node import NodeIdentity
from pqcnet.identity.spiffe import (
    SpiffeId,
    SpiffeLayout,
    apply_layouts,
    spiffe_matches,
    validate_pattern,
)
from pqcnet.qstp import _ossl
from pqcnet.qstp.errors import HandshakeError

log = logging.getLogger(__name__)

GroupPolicy = Literal["hybrid", "strict", "classical-allowed"]

#: OpenSSL group names offered/accepted per policy, in preference order.
GROUPS: Final[dict[str, tuple[str, ...]]] = {
    "hybrid": ("X25519MLKEM768",),
    "strict": ("MLKEM1024", "SecP384r1MLKEM1024"),
    "classical-allowed": ("X25519MLKEM768", "X25519", "secp256r1", "secp384r1"),
}
#: Groups whose shared secret includes ML-KEM (post-quantum).
PQ_GROUPS: Final = frozenset(
    {"X25519MLKEM768", "SecP256r1MLKEM768", "SecP384r1MLKEM1024",
     "MLKEM512", "MLKEM768", "MLKEM1024"}
)
TLS13_CIPHER_SUITES: Final = frozenset(
    {"TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256", "TLS_AES_128_GCM_SHA256"}
)
ALPN_QSTP: Final = b"qstp/1"
CHANNEL_BINDING_LABEL: Final = b"EXPORTER-pqcnet-channel-binding"
#: RFC 8446 caps exporter output at 255 * hash length; we cap well below.
MAX_EXPORT_LENGTH: Final = 1024

CLASSICAL_HANDSHAKES = Counter(
    "pqcnet_qstp_classical_handshakes",
    "TLS handshakes that negotiated a classical-only group (allowed by policy)",
    ["group", "side"],
)

#: which connections new_connection() made as servers (labels the classical counter)
_SERVER_CONNECTIONS: weakref.WeakSet[SSL.Connection] = weakref.WeakSet()


class HandshakeRefused(HandshakeError):
    """The handshake was refused; ``reason`` is a short stable code for metrics/tests.

    Codes: ``unknown-ca``, ``expired``, ``not-yet-valid``, ``revoked``,
    ``bad-certificate``, ``spiffe-not-allowed``, ``denied`` (the :class:`PeerGate`
    refuses it), ``no-peer-certificate``,
    ``no-shared-group``, ``classical-group``, ``alpn``, ``protocol-version``,
    ``certificate-refused`` (the peer refused our certificate with a
    ``bad_certificate`` alert: e.g. our SPIFFE ID is not allowed there, we are
    denied, or our certificate is not valid yet), ``peer-refused`` (the peer sent
    another fatal alert), ``closed``, ``tls``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{message} [{reason}]")
        self.reason = reason


# ---------------------------------------------------------------------------- policy


class PeerGate:
    """Peers refused at run time, consulted on every handshake (and resumption).

    Certificates and the CRL change on the CA's schedule; a governance decision
    (slashing) must take effect at once and on nodes that never see the CA. A gate
    is a mutable set of denied node ids and exact SPIFFE IDs shared by reference:
    put the same gate in the :class:`TlsPolicy` of every endpoint of a node and a
    :meth:`deny` refuses that peer's next handshake everywhere. Closing the peer's
    *existing* tunnels is the caller's job (the gate has no view of them).
    """

    __slots__ = ("_denied", "max_entries")

    #: Bound on denied entries (slashing is rare; this bounds a runaway caller).
    MAX_ENTRIES: Final = 100_000

    def __init__(self, denied: tuple[str, ...] = (), *, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._denied: dict[str, str] = {}
        for who in denied:
            self.deny(who)

    def deny(self, who: str, reason: str = "denied") -> None:
        """Refuse ``who`` (a node id, or a full ``spiffe://`` ID) from now on."""
        if not who:
            raise HandshakeError("PeerGate.deny needs a node id or SPIFFE ID")
        if who not in self._denied and len(self._denied) >= self.max_entries:
            raise HandshakeError(f"PeerGate holds {self.max_entries} entries already")
        self._denied[who] = reason

    def allow(self, who: str) -> None:
        """Lift a denial (e.g. after the node re-attested)."""
        self._denied.pop(who, None)

    def reason_for(self, peer: SpiffeId) -> str | None:
        """Why ``peer`` is denied, or ``None`` if it may connect."""
        return self._denied.get(str(peer), self._denied.get(peer.node_id))

    def __len__(self) -> int:
        return len(self._denied)


@dataclass(frozen=True)
class TlsPolicy:
    """What a QSTP endpoint negotiates and whom it accepts."""

    #: key-exchange group policy (see module docstring)
    groups: GroupPolicy = "hybrid"
    #: exact SPIFFE IDs or per-segment globs; empty = any ID in our trust domain
    allowed_peers: tuple[str, ...] = ()
    #: TLS 1.3 suites in preference order
    cipher_suites: tuple[str, ...] = ("TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256")
    alpn: bytes = ALPN_QSTP
    #: server: issue TLS 1.3 session tickets so a reconnect skips certificate signing
    session_tickets: bool = True
    #: how long a session may be resumed (seconds); also capped by the peer cert's life
    session_lifetime: int = 3600
    #: refuse peers when we hold no CRL (fail closed) instead of relying on short TTLs
    require_crl: bool = False
    #: maximum certificate chain depth (leaf + intermediates + root)
    verify_depth: int = 3
    #: run-time denials (shared, mutable); ``None`` = nobody denied beyond the CRL
    gate: PeerGate | None = None
    #: how tenant/role/node are read from peers' SPIFFE IDs of other shapes than
    #: ``tenant/role/node`` (first fitting layout; see :class:`SpiffeLayout`)
    spiffe_layouts: tuple[SpiffeLayout, ...] = ()

    def __post_init__(self) -> None:
        if self.groups not in get_args(GroupPolicy):
            raise HandshakeError(
                f"unknown group policy {self.groups!r}; one of {', '.join(get_args(GroupPolicy))}"
            )
        if isinstance(self.allowed_peers, str):
            raise HandshakeError("allowed_peers must be a tuple of patterns, not a string")
        try:
            for pattern in self.allowed_peers:
                validate_pattern(pattern)
        except IdentityError as exc:
            raise HandshakeError(str(exc)) from None
        if not self.cipher_suites:
            raise HandshakeError("at least one TLS 1.3 cipher suite is required")
        unknown = [c for c in self.cipher_suites if c not in TLS13_CIPHER_SUITES]
        if unknown:
            raise HandshakeError(f"unknown TLS 1.3 cipher suite(s): {', '.join(unknown)}")
        if not 1 <= len(self.alpn) <= 255:
            raise HandshakeError("ALPN protocol id must be 1..255 bytes")
        if self.session_lifetime <= 0 or self.verify_depth < 1:
            raise HandshakeError("session_lifetime and verify_depth must be positive")

    @property
    def group_list(self) -> tuple[str, ...]:
        """OpenSSL group names for this policy."""
        return GROUPS[self.groups]

    def peer_allowed(self, peer: SpiffeId, own_trust_domain: str) -> bool:
        """Whether ``peer`` passes ``allowed_peers`` (or, when empty, is in our domain)."""
        if not self.allowed_peers:
            return peer.trust_domain == own_trust_domain
        return any(spiffe_matches(p, peer) for p in self.allowed_peers)


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """What a verified handshake tells us about the peer and the channel."""

    #: the peer's SPIFFE ID (from its certificate's URI SAN)
    spiffe_id: SpiffeId
    #: always ``"TLSv1.3"``
    tls_version: str
    #: negotiated key-exchange group, e.g. ``"X25519MLKEM768"``
    group: str
    #: negotiated cipher suite, e.g. ``"TLS_AES_256_GCM_SHA384"``
    cipher: str
    #: negotiated ALPN protocol, ``"qstp/1"``
    alpn: str
    #: end of the peer certificate's validity (UTC)
    cert_not_after: dt.datetime
    #: the handshake resumed an earlier session (no certificate signatures)
    resumed: bool
    #: peer certificate serial (what a CRL would name)
    cert_serial: int = 0

    @property
    def post_quantum(self) -> bool:
        """Whether the key exchange included ML-KEM."""
        return self.group in PQ_GROUPS


# ---------------------------------------------------------------------------- contexts


@functools.lru_cache(maxsize=16)
def _crl_for(crl_pem: bytes, trust_bundle_pem: bytes) -> RevocationList:
    return load_crl(crl_pem, trust_bundle_pem)


def _current_crl(identity: NodeIdentity) -> RevocationList | None:
    if identity.crl_pem is None:
        return None
    try:
        return _crl_for(identity.crl_pem, identity.trust_bundle_pem)
    except IdentityError as exc:
        raise HandshakeError(f"our CRL is unusable: {exc}") from None


_NO_CRL = 3  # X509_V_ERR_UNABLE_TO_GET_CRL
#: OpenSSL's SSL_MODE_* bits (stable ABI values; pyOpenSSL names neither)
_SSL_MODE_ENABLE_PARTIAL_WRITE = 0x1
_SSL_MODE_NO_AUTO_CHAIN = 0x8
_SSL_MODE_RELEASE_BUFFERS = 0x10
#: TLS 1.3 session tickets a server sends per handshake (OpenSSL's default: 2).
TICKETS_PER_HANDSHAKE: Final = 1
#: (peer certificate, trust bundle) pairs whose issuer signature a resumed session
#: has already checked; bounds memory, one entry per distinct peer certificate
_ANCHOR_CACHE_SIZE = 1024
#: X509 errors the CRL check may raise that our policy tolerates (see callback)
_CRL_SOFT_ERRORS = frozenset({_NO_CRL, 11, 12})  # + CRL_NOT_YET_VALID, CRL_HAS_EXPIRED


def _x509_error(errno: int) -> HandshakeRefused:
    text = _ossl.verify_error_string(errno)
    reason = {
        9: "not-yet-valid",  # X509_V_ERR_CERT_NOT_YET_VALID
        10: "expired",  # X509_V_ERR_CERT_HAS_EXPIRED
        23: "revoked",  # X509_V_ERR_CERT_REVOKED
        2: "unknown-ca",  # UNABLE_TO_GET_ISSUER_CERT
        18: "unknown-ca",  # DEPTH_ZERO_SELF_SIGNED_CERT
        19: "unknown-ca",  # SELF_SIGNED_CERT_IN_CHAIN
        20: "unknown-ca",  # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
        21: "unknown-ca",  # UNABLE_TO_VERIFY_LEAF_SIGNATURE
    }.get(errno, "bad-certificate")
    return HandshakeRefused(reason, f"peer certificate rejected: {text}")


def check_peer_certificate(
    cert: x509.Certificate,
    identity: NodeIdentity,
    policy: TlsPolicy,
    *,
    now: dt.datetime | None = None,
    crl: RevocationList | None = None,
) -> SpiffeId:
    """All pqcnet checks on a peer leaf, standalone (no TLS connection needed).

    Validity window, issued by one of our anchors (ML-DSA signature checked), exactly
    one SPIFFE ID that the policy allows, not denied, not revoked. Raises
    :class:`HandshakeRefused`. Handshakes use the cheaper split below: OpenSSL has
    already checked the signature and window, so only :func:`_check_policy` runs.
    """
    now = now or utcnow()
    _check_window(cert, now)
    if not _issued_by_anchor(cert, identity):
        raise HandshakeRefused("unknown-ca", "peer certificate not issued by a trusted mesh CA")
    return _check_policy(cert, identity, policy, now=now, crl=crl)


def _check_window(cert: x509.Certificate, now: dt.datetime) -> None:
    if now < cert.not_valid_before_utc:
        raise HandshakeRefused(
            "not-yet-valid",
            f"peer certificate not valid before {cert.not_valid_before_utc.isoformat()}",
        )
    if now > cert.not_valid_after_utc:
        raise HandshakeRefused(
            "expired", f"peer certificate expired at {cert.not_valid_after_utc.isoformat()}"
        )


@functools.lru_cache(maxsize=_ANCHOR_CACHE_SIZE)
def _signed_by_bundle(cert: x509.Certificate, trust_bundle_pem: bytes,
                      anchors: tuple[x509.Certificate, ...]) -> bool:
    # keyed by the certificate (hash/eq by DER) and the bundle bytes; ``anchors``
    # is derived from the bundle, so it adds no key entropy
    return any(is_signed_by(cert, ca) for ca in anchors)


#: SPIFFE ID per peer certificate (parsing the SAN extension costs more than the rest
#: of the policy checks together); failures are not cached
_spiffe_id_of = functools.lru_cache(maxsize=_ANCHOR_CACHE_SIZE)(spiffe_id_of)


def _issued_by_anchor(cert: x509.Certificate, identity: NodeIdentity) -> bool:
    """ML-DSA issuer check against today's anchors, cached per (cert, bundle)."""
    return _signed_by_bundle(cert, identity.trust_bundle_pem, tuple(identity.trust_anchors))


def _check_policy(
    cert: x509.Certificate,
    identity: NodeIdentity,
    policy: TlsPolicy,
    *,
    now: dt.datetime | None = None,
    crl: RevocationList | None = None,
) -> SpiffeId:
    """The checks OpenSSL cannot do: SPIFFE ID policy, :class:`PeerGate`, our CRL rules."""
    try:
        peer = apply_layouts(_spiffe_id_of(cert), policy.spiffe_layouts)
    except IdentityError as exc:
        raise HandshakeRefused("bad-certificate", f"peer certificate: {exc}") from None
    if not policy.peer_allowed(peer, identity.spiffe_id.trust_domain):
        raise HandshakeRefused("spiffe-not-allowed", f"peer {peer} is not an allowed peer")
    denied = policy.gate.reason_for(peer) if policy.gate is not None else None
    if denied is not None:
        raise HandshakeRefused("denied", f"peer {peer} is denied: {denied}")
    crl = crl if crl is not None else _current_crl(identity)
    if crl is None:
        if policy.require_crl:
            raise HandshakeRefused("revoked", "no CRL available and the policy requires one")
        return peer
    if crl.is_stale(now or utcnow()):
        log.warning("CRL past nextUpdate; still applied, fetch a fresh one",
                    extra={"crl_number": crl.number, "next_update": str(crl.next_update)})
    if crl.issuer == cert.issuer and crl.is_revoked(cert.serial_number):
        raise HandshakeRefused(
            "revoked", f"peer certificate {peer} (serial {cert.serial_number:x}) is revoked"
        )
    return peer


def _verify_callback(identity: NodeIdentity, policy: TlsPolicy):  # type: ignore[no-untyped-def]
    crl = _current_crl(identity)

    def callback(
        conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int
    ) -> bool:
        if not ok:
            if errno in _CRL_SOFT_ERRORS and not (errno == _NO_CRL and policy.require_crl):
                # our CRL semantics, not OpenSSL's: a stale CRL still applies
                # (revocation is still checked after this), and an issuer without
                # a CRL (e.g. the previous CA during rotation) is not an error
                if errno != _NO_CRL:
                    log.warning("CRL outside its validity window; still applied",
                                extra={"x509_error": errno})
                return True
            raise _x509_error(errno)
        if depth == 0:
            # OpenSSL has checked signature, window and (if held) the CRL: policy only
            try:
                _check_policy(cert.to_cryptography(), identity, policy, crl=crl)
            except HandshakeRefused as exc:
                # the peer gets bad_certificate / certificate_revoked, not internal_error
                _ossl.set_verify_error(_ossl.X509_CERT_REVOKED if exc.reason == "revoked"
                                       else _ossl.X509_CERT_REJECTED)
                raise
        return True

    return callback


def _alpn_selector(alpn: bytes):  # type: ignore[no-untyped-def]
    def select(conn: SSL.Connection, offered: list[bytes]) -> bytes:
        if alpn in offered:
            return alpn
        shown = b", ".join(offered).decode(errors="replace") or "none"
        raise HandshakeRefused(
            "alpn", f"client offered ALPN [{shown}], this endpoint speaks {alpn.decode()}"
        )

    return select


def _use_mldsa_key(ctx: SSL.Context, identity: NodeIdentity) -> None:
    # pyOpenSSL cannot convert a `cryptography` ML-DSA key (PKey.from_cryptography_key
    # rejects it), so the key goes in as a PEM-loaded PKey; that path is deprecated
    # in pyOpenSSL but it is the only one that works for ML-DSA today.
    pkey = crypto.load_privatekey(crypto.FILETYPE_PEM, identity.key.to_pem())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.use_privatekey(pkey)


def _base_context(policy: TlsPolicy) -> SSL.Context:
    """TLS 1.3 only, our suites and groups, no compression/renegotiation, no auto chain."""
    _ossl.capabilities()
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
    # send only our certificate and explicit intermediates: the peer holds the
    # anchors, and an auto-built chain would add the root's ~5 KiB ML-DSA
    # certificate to every full handshake, each way
    ctx.set_mode(_SSL_MODE_NO_AUTO_CHAIN)
    ctx.set_mode(_SSL_MODE_RELEASE_BUFFERS)
    # pyOpenSSL enables partial writes, so one SSL_write stops after each 16 KiB
    # record and sendall() loops in Python; memory BIOs never block, so let one
    # SSL_write encrypt a whole flush (~8x fewer calls on the bulk path)
    ctx.clear_mode(_SSL_MODE_ENABLE_PARTIAL_WRITE)
    ctx.set_tls13_ciphersuites(":".join(policy.cipher_suites).encode())
    _ossl.set_groups(ctx, list(policy.group_list))
    return ctx


def build_context(identity: NodeIdentity, policy: TlsPolicy, *, server: bool,
                  client_cert: Literal["required", "optional"] = "required") -> SSL.Context:
    """A TLS 1.3-only pyOpenSSL context presenting ``identity`` under ``policy``.

    Contexts are cheap to share between connections; build a new one after
    renewal or a CRL update (the old one keeps serving existing connections).
    The first call in a process runs the OpenSSL self-check child
    (:func:`pqcnet.qstp._ossl.capabilities`), so it is decided before any tunnel exists.
    ``client_cert="optional"`` (servers only) asks for a client certificate and checks
    one when sent, but lets a client without one finish the handshake: the CA
    service's enroll endpoint, where a joining node has no certificate yet.
    """
    ctx = _base_context(policy)
    try:
        ctx.use_certificate(identity.certificate)
        for extra in identity.chain[1:]:
            ctx.add_extra_chain_cert(extra)
        _use_mldsa_key(ctx, identity)
        ctx.check_privatekey()
        store = ctx.get_cert_store()
        if store is None:  # pragma: no cover - OpenSSL always has one
            raise HandshakeError("OpenSSL context has no certificate store")
        for anchor in identity.trust_anchors:
            store.add_cert(crypto.X509.from_cryptography(anchor))
        crl = _current_crl(identity)
        if crl is not None:
            # OpenSSL checks the (already signature-checked) CRL itself, so a
            # revoked peer gets a precise "certificate revoked" alert
            store.add_crl(x509.load_pem_x509_crl(crl.pem))
            store.set_flags(crypto.X509StoreFlags.CRL_CHECK)
    except (SSL.Error, crypto.Error) as exc:
        raise HandshakeError(f"cannot load identity {identity.spiffe_id} into TLS: {exc}") from None
    if client_cert not in ("required", "optional") or (client_cert == "optional"
                                                        and not server):
        raise HandshakeError("client_cert='optional' is a server-side setting")
    mode = SSL.VERIFY_PEER
    if client_cert == "required":
        mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    ctx.set_verify(mode, _verify_callback(identity, policy))
    ctx.set_verify_depth(policy.verify_depth)
    remaining = int((identity.not_after - utcnow()).total_seconds())
    lifetime = min(policy.session_lifetime, max(1, remaining))
    ctx.set_timeout(lifetime)
    if server:
        ctx.set_alpn_select_callback(_alpn_selector(policy.alpn))
        # resumption with client auth needs a session id context; binding it to
        # the trust domain + policy keeps tickets from crossing policies
        sid_ctx = hashlib.sha256(
            f"qstp/{identity.spiffe_id.trust_domain}/{policy.groups}/{policy.allowed_peers}".encode()
        ).digest()[:32]
        ctx.set_session_id(sid_ctx)
        if policy.session_tickets:
            ctx.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
            # tickets are single-use and a client keeps only the newest: one is
            # enough (each carries the peer's ML-DSA certificate, ~6 KiB)
            _ossl.set_num_tickets(ctx, TICKETS_PER_HANDSHAKE)
        else:
            ctx.set_options(SSL.OP_NO_TICKET)
            ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    else:
        ctx.set_alpn_protos([policy.alpn])
        ctx.set_session_cache_mode(SSL.SESS_CACHE_CLIENT)
    return ctx


def build_anonymous_client_context(trust_bundle_pem: bytes, policy: TlsPolicy) -> SSL.Context:
    """A client context with no certificate of its own, pinning the server.

    For a node that is joining (``pqcnet node enroll``): it holds only the CA bundle
    it was provisioned with. The server's chain must verify to that bundle and its
    SPIFFE ID must match ``policy.allowed_peers`` (required: an anonymous client
    has no trust domain of its own to fall back on). Check the finished handshake
    with :func:`verify_server`.
    """
    if not policy.allowed_peers:
        raise HandshakeError("an anonymous client must pin the server's SPIFFE ID "
                             "(allowed_peers)")
    ctx = _base_context(policy)
    anchors = load_certs(trust_bundle_pem, "trust bundle")
    if not anchors:
        raise HandshakeError("trust bundle is empty")
    store = ctx.get_cert_store()
    if store is None:  # pragma: no cover - OpenSSL always has one
        raise HandshakeError("OpenSSL context has no certificate store")
    for anchor in anchors:
        store.add_cert(crypto.X509.from_cryptography(anchor))

    def callback(conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int,
                 ok: int) -> bool:
        if not ok:
            raise _x509_error(errno)
        if depth == 0:
            _pinned_server(cert.to_cryptography(), policy)
        return True

    ctx.set_verify(SSL.VERIFY_PEER, callback)
    ctx.set_verify_depth(policy.verify_depth)
    ctx.set_alpn_protos([policy.alpn])
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    return ctx


def _pinned_server(cert: x509.Certificate, policy: TlsPolicy) -> SpiffeId:
    try:
        peer = _spiffe_id_of(cert)
    except IdentityError as exc:
        raise HandshakeRefused("bad-certificate", f"server certificate: {exc}") from None
    if not any(spiffe_matches(p, peer) for p in policy.allowed_peers):
        raise HandshakeRefused("spiffe-not-allowed",
                               f"server {peer} is not the pinned {', '.join(policy.allowed_peers)}")
    return peer


def verify_server(conn: SSL.Connection, policy: TlsPolicy, *,
                  now: dt.datetime | None = None) -> PeerInfo:
    """:func:`verify_peer` for a client built by :func:`build_anonymous_client_context`."""
    version = conn.get_protocol_version_name()
    if version != "TLSv1.3":
        raise HandshakeRefused("protocol-version", f"negotiated {version}, need TLSv1.3")
    alpn = conn.get_alpn_proto_negotiated()
    if alpn != policy.alpn:
        raise HandshakeRefused("alpn", f"negotiated ALPN {alpn!r}, expected {policy.alpn!r}")
    group = conn.get_group_name() or ""
    if group not in PQ_GROUPS and policy.groups != "classical-allowed":
        raise HandshakeRefused("classical-group", f"negotiated classical group {group or 'none'}")
    cert = conn.get_peer_certificate(as_cryptography=True)
    if cert is None:
        raise HandshakeRefused("no-peer-certificate", "server presented no certificate")
    result = _ossl.verify_result(conn)
    if result != 0:
        raise _x509_error(result)
    _check_window(cert, now or utcnow())
    return PeerInfo(
        spiffe_id=_pinned_server(cert, policy), tls_version=version, group=group,
        cipher=conn.get_cipher_name() or "", alpn=alpn.decode(errors="replace"),
        cert_not_after=cert.not_valid_after_utc, resumed=False, cert_serial=cert.serial_number,
    )


def new_connection(
    ctx: SSL.Context,
    *,
    server: bool,
    session: SSL.Session | None = None,
    server_hostname: str | None = None,
) -> SSL.Connection:
    """A memory-BIO connection (no socket); ``session`` resumes an earlier one (client)."""
    conn = SSL.Connection(ctx, None)
    if server:
        _SERVER_CONNECTIONS.add(conn)
        if session is not None:
            raise HandshakeError("only a client can offer a session for resumption")
        conn.set_accept_state()
    else:
        if server_hostname:
            conn.set_tlsext_host_name(server_hostname.encode("idna"))
        if session is not None:
            conn.set_session(session)
        conn.set_connect_state()
    return conn


# ---------------------------------------------------------------------------- after handshake


def verify_peer(
    conn: SSL.Connection,
    identity: NodeIdentity,
    policy: TlsPolicy,
    *,
    now: dt.datetime | None = None,
) -> PeerInfo:
    """Check a finished handshake against ``policy`` and describe the peer.

    Call right after ``do_handshake()`` succeeds, before any application data is
    read or written. Raises :class:`HandshakeRefused`; the caller must then close.
    On a full handshake the chain (signatures, window, CRL) was verified by OpenSSL
    against the trust store of the *context* the connection was made from, and its
    verdict is taken as is; ``identity`` then supplies the trust domain, policy and
    CRL for the policy checks. On a resumed session everything is checked against
    ``identity`` (no certificate was exchanged).
    """
    version = conn.get_protocol_version_name()
    if version != "TLSv1.3":
        raise HandshakeRefused("protocol-version", f"negotiated {version}, QSTP needs TLSv1.3")
    alpn = conn.get_alpn_proto_negotiated()
    if alpn != policy.alpn:
        raise HandshakeRefused(
            "alpn", f"negotiated ALPN {alpn!r}, expected {policy.alpn.decode()!r}"
        )
    group = conn.get_group_name() or ""
    server = _is_server(conn)
    if group not in PQ_GROUPS:
        if policy.groups != "classical-allowed":
            raise HandshakeRefused(
                "classical-group", f"negotiated classical group {group or 'none'} under "
                f"policy {policy.groups}"
            )
        CLASSICAL_HANDSHAKES.labels(group=group, side="server" if server else "client").inc()
        log.warning("classical TLS group negotiated", extra={"group": group})
    peer_cert = conn.get_peer_certificate(as_cryptography=True)
    if peer_cert is None:
        raise HandshakeRefused("no-peer-certificate", "peer presented no certificate")
    resumed = _ossl.session_reused(conn)
    now = now or utcnow()
    if resumed:
        # no certificate was exchanged: check it against today's identity and CRL
        peer = check_peer_certificate(peer_cert, identity, policy, now=now)
    else:
        # OpenSSL verified the chain (signatures, window, CRL) in this handshake;
        # its verdict plus the cheap policy checks suffice — no second ML-DSA verify
        result = _ossl.verify_result(conn)
        if result != 0 and result not in _CRL_SOFT_ERRORS:
            raise _x509_error(result)
        _check_window(peer_cert, now)
        peer = _check_policy(peer_cert, identity, policy, now=now)
    return PeerInfo(
        spiffe_id=peer,
        tls_version=version,
        group=group,
        cipher=conn.get_cipher_name() or "",
        alpn=alpn.decode(errors="replace"),
        cert_not_after=peer_cert.not_valid_after_utc,
        resumed=resumed,
        cert_serial=peer_cert.serial_number,
    )


def _is_server(conn: SSL.Connection) -> bool:
    return conn in _SERVER_CONNECTIONS


def export_keying_material(
    conn: SSL.Connection, label: bytes, length: int = 32, context: bytes | None = None
) -> bytes:
    """RFC 8446 §7.5 exporter output; equal on both ends of one TLS connection."""
    if not 1 <= length <= MAX_EXPORT_LENGTH:
        raise HandshakeError(f"exporter length must be 1..{MAX_EXPORT_LENGTH}")
    try:
        return conn.export_keying_material(label, length, context)
    except SSL.Error as exc:
        raise HandshakeError(f"keying material export failed: {exc}") from None


def channel_binding(conn: SSL.Connection) -> bytes:
    """32 bytes unique to this TLS connection (binds app-layer signatures to it)."""
    return export_keying_material(conn, CHANNEL_BINDING_LABEL, 32)


def resumable_session(conn: SSL.Connection) -> SSL.Session | None:
    """The client's session to offer on the next connect (None before any ticket).

    TLS 1.3 tickets arrive *after* the handshake: read application data (or call
    ``recv`` once the server's flight has been fed in) before taking the session.
    """
    return conn.get_session()


# ---------------------------------------------------------------------------- failures

_ALERT_REASONS: Final = (
    ("certificate revoked", "revoked"),
    ("certificate expired", "expired"),
    ("unknown ca", "unknown-ca"),
    ("no application protocol", "alpn"),
    ("no suitable key share", "no-shared-group"),
    ("no shared group", "no-shared-group"),
    ("handshake failure", "peer-refused"),
    ("bad certificate", "certificate-refused"),
    ("peer did not return a certificate", "no-peer-certificate"),
    ("certificate required", "no-peer-certificate"),
    ("unsupported protocol", "protocol-version"),
    ("tlsv1 alert protocol version", "protocol-version"),
    ("wrong version number", "protocol-version"),
)


def _ssl_error_text(exc: SSL.Error) -> str:
    reasons = [str(r[2]) for r in (exc.args[0] if exc.args else []) if isinstance(r, tuple)]
    return "; ".join(reasons) or str(exc)


def ended_by_peer(exc: BaseException) -> bool:
    """Whether a TLS failure came from the peer — its close_notify, a fatal alert it
    sent, the connection dropping — rather than from a decision taken here (no shared
    group, a certificate our policy refuses, a record that fails authentication).
    OpenSSL names a *received* alert ``... alert ...``; alerts we send are not named."""
    if isinstance(exc, SSL.ZeroReturnError | SSL.SysCallError):
        return True
    if isinstance(exc, SSL.Error):
        return "alert" in _ssl_error_text(exc).lower()
    return False


def handshake_error(exc: BaseException) -> HandshakeError:
    """Turn whatever ``do_handshake()``/``recv()`` raised into one clear HandshakeError."""
    if isinstance(exc, HandshakeError):
        return exc
    if isinstance(exc, SSL.ZeroReturnError):
        return HandshakeRefused("closed", "peer closed the connection during the handshake")
    if isinstance(exc, SSL.SysCallError):
        return HandshakeRefused("closed", f"connection lost during the handshake: {exc}")
    if isinstance(exc, SSL.Error):
        text = _ssl_error_text(exc)
        low = text.lower()
        peer = ended_by_peer(exc)
        for needle, reason in _ALERT_REASONS:
            if needle in low:
                prefix = "peer refused the handshake" if peer else "handshake failed"
                return HandshakeRefused(reason, f"{prefix}: {text}")
        if peer:
            return HandshakeRefused("peer-refused", f"peer refused the handshake: {text}")
        return HandshakeRefused("tls", f"TLS handshake failed: {text}")
    return HandshakeRefused("tls", f"TLS handshake failed: {type(exc).__name__}: {exc}")


def describe_groups() -> dict[str, tuple[str, ...]]:
    """The group policy table (for ``--help`` and docs)."""
    return dict(GROUPS)


__all__ = [
    "ALPN_QSTP",
    "CHANNEL_BINDING_LABEL",
    "CLASSICAL_HANDSHAKES",
    "GROUPS",
    "PQ_GROUPS",
    "GroupPolicy",
    "HandshakeRefused",
    "PeerGate",
    "PeerInfo",
    "TlsPolicy",
    "build_anonymous_client_context",
    "build_context",
    "channel_binding",
    "check_peer_certificate",
    "export_keying_material",
    "handshake_error",
    "new_connection",
    "resumable_session",
    "verify_peer",
    "verify_server",
]
