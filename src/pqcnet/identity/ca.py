"""The mesh CA: issues short-lived ML-DSA-65 certificates carrying SPIFFE IDs.

Short TTLs (default 12 h) are the primary revocation mechanism: a stolen key is
useful only until its certificate expires. The CRL covers the window before
that. Every issuance path (:meth:`MeshCA.issue`, :meth:`MeshCA.sign_csr`,
:meth:`MeshCA.renew`) goes through :meth:`IssuancePolicy.check`, so the CLI, the
tests and a future online CA cannot disagree on what may be signed.

The CA's own state (revocations, CRL number, policy) is a small JSON file next to its
encrypted key, rewritten atomically when it changes; the issued log is a journal beside
it, appended per issuance (:mod:`pqcnet.identity.ca_log`).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from pqcnet.crypto.errors import CryptoError
from pqcnet.crypto.pqc import MLDSAPublic, SigningKey, algorithm_of
from pqcnet.identity.ca_live import LiveIndex
from pqcnet.identity.ca_log import (
    IssuedJournal,
    IssuedRecord,
    LogWrite,
    parse_issued,
    read_log,
    write_log,
)
from pqcnet.identity.certs import (
    CLOCK_SKEW,
    MAX_PEM_BYTES,
    build_ca_certificate,
    build_leaf_certificate,
    certs_pem,
    is_signed_by,
    load_certs,
    utcnow,
)
from pqcnet.identity.errors import IdentityError, PolicyViolation
from pqcnet.identity.keystore import (
    KeyStore,
    atomic_write,
    read_bounded,
    read_private_key,
    write_private_key,
)
from pqcnet.identity.node import NodeIdentity
from pqcnet.identity.spiffe import SpiffeId, SpiffeLayout, apply_layouts

DEFAULT_TTL = dt.timedelta(hours=12)
DEFAULT_MAX_TTL = dt.timedelta(hours=24)
DEFAULT_CA_VALIDITY = dt.timedelta(days=365)
#: A CRL's nextUpdate: nodes should fetch a fresh one at least this often.
DEFAULT_CRL_VALIDITY = dt.timedelta(hours=1)
CA_KEY_FILE = "ca-key.pem"
CA_CERT_FILE = "ca-cert.pem"
CA_STATE_FILE = "ca-state.json"
#: Bound on the CA state file (revocations + issued log).
MAX_STATE_BYTES = 32 * 1024 * 1024
#: Bound on the issued-certificate log kept for ``revoke --spiffe-id``; expired
#: entries are pruned first.
MAX_ISSUED_LOG = 100_000


@dataclass(frozen=True)
class IssuancePolicy:
    """What the CA will sign. Empty tuples mean "any"."""

    allowed_roles: tuple[str, ...] = ()
    allowed_tenants: tuple[str, ...] = ()
    max_ttl: dt.timedelta = DEFAULT_MAX_TTL
    default_ttl: dt.timedelta = DEFAULT_TTL
    allowed_algorithms: tuple[str, ...] = ("ML-DSA-65", "ML-DSA-87")
    #: where tenant and role sit in SPIFFE IDs of other shapes (``spiffe_layouts``, as
    #: the sentry and relayer configure them); with any set, a requested ID must be
    #: ``tenant/role/node`` or fit one of them
    spiffe_layouts: tuple[SpiffeLayout, ...] = ()

    def __post_init__(self) -> None:
        if self.max_ttl <= dt.timedelta(0) or self.default_ttl <= dt.timedelta(0):
            raise IdentityError("TTLs must be positive")
        if self.default_ttl > self.max_ttl:
            raise IdentityError("default TTL exceeds the TTL cap")

    def resolve(self, spiffe_id: SpiffeId) -> SpiffeId:
        """``spiffe_id`` with tenant and role read through :attr:`spiffe_layouts`.

        An ID of another shape than ``tenant/role/node`` that fits none of the configured
        layouts raises :class:`PolicyViolation` (its tenant and role would be unknown to
        every policy that reads them); with no layouts configured it is returned as is.
        """
        if not spiffe_id.path or not self.spiffe_layouts:
            return spiffe_id
        for layout in self.spiffe_layouts:
            got = layout.extract(spiffe_id)
            if got is not None:
                return got
        raise PolicyViolation(
            f"{spiffe_id} fits none of the CA's SPIFFE layouts "
            f"({', '.join(la.uri for la in self.spiffe_layouts)}) nor "
            "spiffe://<trust-domain>/<tenant>/<role>/<node>")

    def tenant_of(self, spiffe_id: SpiffeId) -> str:
        """The tenant of an ID this CA issued (empty when no layout fits it any more)."""
        return apply_layouts(spiffe_id, self.spiffe_layouts).tenant

    def check(self, trust_domain: str, spiffe_id: SpiffeId, ttl: dt.timedelta, alg: str) -> None:
        """Raise :class:`PolicyViolation` naming the first rule ``spiffe_id``/``ttl`` break."""
        if spiffe_id.trust_domain != trust_domain:
            raise PolicyViolation(
                f"trust domain {spiffe_id.trust_domain!r} is not this CA's ({trust_domain!r})"
            )
        spiffe_id = self.resolve(spiffe_id)
        if self.allowed_roles and spiffe_id.role not in self.allowed_roles:
            raise PolicyViolation(
                f"role {spiffe_id.role!r} not allowed (allowed: {', '.join(self.allowed_roles)})"
            )
        if self.allowed_tenants and spiffe_id.tenant not in self.allowed_tenants:
            raise PolicyViolation(f"tenant {spiffe_id.tenant!r} not allowed")
        if ttl <= dt.timedelta(0):
            raise PolicyViolation("TTL must be positive")
        if ttl > self.max_ttl:
            raise PolicyViolation(f"TTL {ttl} exceeds the cap {self.max_ttl}")
        if alg not in self.allowed_algorithms:
            raise PolicyViolation(
                f"key algorithm {alg} not allowed (allowed: {', '.join(self.allowed_algorithms)})"
            )

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["max_ttl"] = self.max_ttl.total_seconds()
        d["default_ttl"] = self.default_ttl.total_seconds()
        d["spiffe_layouts"] = [{"template": la.uri, "role": la.role, "tenant": la.tenant}
                               for la in self.spiffe_layouts]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> IssuancePolicy:
        return cls(
            allowed_roles=tuple(d.get("allowed_roles", ())),
            allowed_tenants=tuple(d.get("allowed_tenants", ())),
            max_ttl=dt.timedelta(seconds=float(d.get("max_ttl", DEFAULT_MAX_TTL.total_seconds()))),
            default_ttl=dt.timedelta(
                seconds=float(d.get("default_ttl", DEFAULT_TTL.total_seconds()))
            ),
            allowed_algorithms=tuple(d.get("allowed_algorithms", ("ML-DSA-65", "ML-DSA-87"))),
            spiffe_layouts=tuple(
                SpiffeLayout.of(str(x["template"]), role=str(x.get("role", "")),
                                tenant=str(x.get("tenant", "")))
                for x in d.get("spiffe_layouts", ())),
        )


def stored_policy(directory: Path) -> IssuancePolicy:
    """The issuance policy kept in a CA directory's state file (needs no CA key: what
    ``pqcnet ca token create`` checks a token's binding against)."""
    raw = read_bounded(Path(directory) / CA_STATE_FILE, MAX_STATE_BYTES, "CA state")
    try:
        return IssuancePolicy.from_json(json.loads(raw).get("policy", {}))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise IdentityError(f"corrupt CA state {Path(directory) / CA_STATE_FILE}: {exc}"
                            ) from None


@dataclass(frozen=True, slots=True)
class Revocation:
    """One CRL entry."""

    serial: int
    revoked_at: dt.datetime
    reason: x509.ReasonFlags
    #: when the revoked certificate expires anyway (then the entry can be dropped)
    cert_not_after: dt.datetime | None = None


def parse_reason(reason: str | x509.ReasonFlags) -> x509.ReasonFlags:
    """``key_compromise`` / ``keyCompromise`` / a ReasonFlags -> ReasonFlags."""
    if isinstance(reason, x509.ReasonFlags):
        return reason
    for flag in x509.ReasonFlags:
        if reason in (flag.name, flag.value):
            return flag
    names = ", ".join(f.name for f in x509.ReasonFlags)
    raise IdentityError(f"unknown revocation reason {reason!r}; one of: {names}")


@dataclass(frozen=True, slots=True)
class StateWrite:
    """One save of a CA's state: the state file's bytes (None: unchanged) and the
    issued log's write (None: nothing new)."""

    state: bytes | None
    log: LogWrite | None


def write_state(directory: Path, change: StateWrite) -> None:
    """Apply ``change`` to ``directory`` durably: the issued log first, so a state file
    never names a change whose certificates are missing from the log."""
    if change.log is not None:
        write_log(directory, change.log)
    if change.state is not None:
        atomic_write(Path(directory) / CA_STATE_FILE, change.state, mode=0o600)


@dataclass
class MeshCA:
    """A trust domain's certificate authority (keys in memory; see :meth:`save`)."""

    trust_domain: str
    key: SigningKey
    certificate: x509.Certificate
    policy: IssuancePolicy = field(default_factory=IssuancePolicy)
    revocations: dict[int, Revocation] = field(default_factory=dict)
    issued: dict[int, IssuedRecord] = field(default_factory=dict)
    crl_number: int = 0
    #: additional anchors published in the trust bundle (e.g. the previous CA during rotation)
    extra_anchors: list[x509.Certificate] = field(default_factory=list)
    #: which issued-log entries are on disk (the journal appended per issuance)
    _journal: IssuedJournal = field(default_factory=IssuedJournal, repr=False,
                                    compare=False)
    #: the state file's bytes as last written (None: not written by this object)
    _state_saved: bytes | None = field(default=None, repr=False, compare=False)
    #: live certificates by tenant (:mod:`pqcnet.identity.ca_live`), built on first use
    #: for the policy it was built with (layouts decide tenants) and kept as the log,
    #: the revocations and time change
    _live: LiveIndex | None = field(default=None, repr=False, compare=False)
    _live_policy: IssuancePolicy | None = field(default=None, repr=False, compare=False)
    #: the issued log's and the revocations' sizes the index accounts for (anything
    #: else changed them behind its back: rebuilt / re-read)
    _live_issued: int = field(default=0, repr=False, compare=False)
    _live_revoked: int = field(default=0, repr=False, compare=False)

    # ------------------------------------------------------------------ creation

    @classmethod
    def create(
        cls,
        trust_domain: str,
        *,
        key: SigningKey | None = None,
        validity: dt.timedelta = DEFAULT_CA_VALIDITY,
        policy: IssuancePolicy | None = None,
        now: dt.datetime | None = None,
    ) -> MeshCA:
        """A fresh CA with a new ML-DSA-65 key (or ``key``) for ``trust_domain``."""
        SpiffeId(trust_domain, "x", "x", "x")  # validates the trust domain
        now = now or utcnow()
        key = key or SigningKey.generate("ML-DSA-65")
        cert = build_ca_certificate(
            key, trust_domain, not_before=now - CLOCK_SKEW, not_after=now + validity
        )
        return cls(trust_domain, key, cert, policy or IssuancePolicy())

    # ------------------------------------------------------------------ issuance

    def issue(
        self,
        spiffe_id: str | SpiffeId,
        ttl: dt.timedelta | None = None,
        key: SigningKey | None = None,
        *,
        now: dt.datetime | None = None,
    ) -> NodeIdentity:
        """Issue a leaf for ``spiffe_id`` (new ML-DSA-65 key unless ``key``); policy-checked."""
        sid = spiffe_id if isinstance(spiffe_id, SpiffeId) else SpiffeId.parse(spiffe_id)
        key = key or SigningKey.generate("ML-DSA-65")
        cert = self._sign(sid, key.public_key.cryptography_key, ttl, now)
        return NodeIdentity.from_pem(
            key, certs_pem([cert]), self.trust_bundle_pem(), self.crl_pem(now=now)
        )

    def sign_csr(
        self,
        csr_pem: bytes,
        policy: IssuancePolicy | None = None,
        *,
        ttl: dt.timedelta | None = None,
        now: dt.datetime | None = None,
        signature_checked: bool = False,
    ) -> bytes:
        """Check a CSR (signature, single SPIFFE SAN, ML-DSA key, policy) and sign it.

        ``signature_checked``: the caller has just verified the signature of these same
        bytes (the CA service does, to answer 400 before anything else); the ML-DSA
        verification is then not paid twice per enrollment."""
        if len(csr_pem) > MAX_PEM_BYTES:
            raise IdentityError("CSR too large")
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise IdentityError(f"cannot parse CSR: {exc}") from None
        try:
            valid = signature_checked or csr.is_signature_valid
        except (InvalidSignature, ValueError, TypeError):
            valid = False
        if not valid:
            raise PolicyViolation("CSR signature does not verify (proof of possession failed)")
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            raise PolicyViolation("CSR carries no subjectAltName with a SPIFFE ID") from None
        if san.get_values_for_type(x509.DNSName) or san.get_values_for_type(x509.IPAddress):
            raise PolicyViolation("CSR may only carry a SPIFFE URI SAN")
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        if len(uris) != 1:
            raise PolicyViolation(f"CSR must carry exactly one URI SAN, has {len(uris)}")
        sid = SpiffeId.parse(uris[0])
        cert = self._sign(sid, csr.public_key(), ttl, now, policy)  # type: ignore[arg-type]
        return certs_pem([cert])

    def renew(
        self,
        identity: NodeIdentity,
        ttl: dt.timedelta | None = None,
        *,
        rotate_key: bool = True,
        now: dt.datetime | None = None,
    ) -> NodeIdentity:
        """A fresh certificate for the same SPIFFE ID. The old one stays valid until it
        expires (the overlap), unless the caller revokes it as ``superseded``."""
        if identity.serial in self.revocations:
            raise PolicyViolation(f"{identity.spiffe_id} is revoked; it cannot be renewed")
        if not any(is_signed_by(identity.certificate, c) for c in self.anchors()):
            raise PolicyViolation("identity was not issued by this CA")
        key = SigningKey.generate(identity.key.algorithm) if rotate_key else identity.key
        return self.issue(identity.spiffe_id, ttl, key, now=now)

    def _sign(
        self,
        sid: SpiffeId,
        public_key: MLDSAPublic,
        ttl: dt.timedelta | None,
        now: dt.datetime | None,
        policy: IssuancePolicy | None = None,
    ) -> x509.Certificate:
        policy = policy or self.policy
        ttl = ttl if ttl is not None else policy.default_ttl
        try:
            alg = algorithm_of(public_key)
        except CryptoError:
            raise PolicyViolation(
                f"key type {type(public_key).__name__} not allowed; pqcnet requires ML-DSA"
            ) from None
        policy.check(self.trust_domain, sid, ttl, alg)
        # the CA's own cap is absolute, even for a laxer per-call policy
        if ttl > self.policy.max_ttl and policy is not self.policy:
            raise PolicyViolation(f"TTL {ttl} exceeds the CA cap {self.policy.max_ttl}")
        now = now or utcnow()
        not_after = min(now + ttl, self.certificate.not_valid_after_utc)
        cert = build_leaf_certificate(
            self.key, self.certificate, public_key, sid,
            not_before=now - CLOCK_SKEW, not_after=not_after,
        )
        self._record(IssuedRecord(cert.serial_number, str(sid), not_after), now)
        return cert

    def _record(self, rec: IssuedRecord, now: dt.datetime) -> None:
        if len(self.issued) >= MAX_ISSUED_LOG:
            kept = {s: r for s, r in self.issued.items() if r.not_after > now}
            while len(kept) >= MAX_ISSUED_LOG:
                kept.pop(next(iter(kept)))
            for serial in self.issued.keys() - kept.keys():
                self._journal.dropped(serial)
                self._unlive(serial, left_log=True)
            self.issued = kept
        self.issued[rec.serial] = rec
        self._journal.issued(rec.serial)
        if self._live is not None:
            self._live.add(rec)
            self._live_issued += 1

    def forget(self, serial: int) -> None:
        """Drop ``serial`` from the issued log (a certificate signed but never handed
        out, e.g. its enrollment lost a race for the token)."""
        if self.issued.pop(serial, None) is not None:
            self._journal.dropped(serial)
            self._unlive(serial, left_log=True)

    def _unlive(self, serial: int, *, left_log: bool) -> None:
        if self._live is not None:
            self._live.remove(serial)
            self._live_issued -= left_log

    def live_holders(self, tenant: str, now: dt.datetime | None = None) -> Mapping[str, int]:
        """``tenant``'s SPIFFE IDs holding an unexpired, unrevoked certificate of this CA
        (read only). Costs what changed since the last question, not the fleet."""
        live = self._live_index(now or utcnow())
        return live.holders(tenant)

    def live_ids(self, tenant: str, now: dt.datetime | None = None) -> set[str]:
        """:meth:`live_holders` as a set."""
        return set(self.live_holders(tenant, now))

    def live_count(self, now: dt.datetime | None = None) -> int:
        """Distinct SPIFFE IDs holding a live certificate (an ID has one tenant)."""
        return self._live_index(now or utcnow()).count()

    def _live_index(self, now: dt.datetime) -> LiveIndex:
        live = self._live
        if (live is None or self._live_policy is not self.policy
                or self._live_issued != len(self.issued)):
            live = self._live = LiveIndex(self._tenant_of)
            for rec in self.issued.values():
                if rec.serial not in self.revocations:
                    live.add(rec)
            self._live_policy, self._live_issued = self.policy, len(self.issued)
            self._live_revoked = len(self.revocations)
        elif self._live_revoked != len(self.revocations):  # set without revoke()
            for serial in self.revocations:
                live.remove(serial)
            self._live_revoked = len(self.revocations)
        live.expire(now)
        return live

    def _tenant_of(self, spiffe_id: str) -> str | None:
        try:
            return self.policy.tenant_of(SpiffeId.parse(spiffe_id))
        except IdentityError:  # an ID this policy cannot read any more: no tenant's node
            return None

    # ------------------------------------------------------------------ revocation

    def revoke(
        self,
        target: int | x509.Certificate | NodeIdentity,
        reason: str | x509.ReasonFlags = x509.ReasonFlags.unspecified,
        *,
        now: dt.datetime | None = None,
    ) -> Revocation:
        """Add a certificate (by serial, certificate or identity) to the next CRL."""
        if isinstance(target, NodeIdentity):
            target = target.certificate
        if isinstance(target, x509.Certificate):
            if not is_signed_by(target, self.certificate):
                raise IdentityError("certificate was not issued by this CA")
            serial = target.serial_number
            not_after: dt.datetime | None = target.not_valid_after_utc
        else:
            if not isinstance(target, int) or target <= 0:
                raise IdentityError("serial must be a positive integer")
            rec = self.issued.get(target)
            serial, not_after = target, (rec.not_after if rec else None)
        entry = Revocation(serial, now or utcnow(), parse_reason(reason), not_after)
        if serial not in self.revocations:
            self.revocations[serial] = entry
            self._unlive(serial, left_log=False)
            self._live_revoked += self._live is not None
        return self.revocations[serial]

    def revoke_spiffe_id(
        self, spiffe_id: str | SpiffeId, reason: str | x509.ReasonFlags = "unspecified",
        *, now: dt.datetime | None = None,
    ) -> list[Revocation]:
        """Revoke every unexpired certificate this CA issued for ``spiffe_id``."""
        sid = str(spiffe_id if isinstance(spiffe_id, SpiffeId) else SpiffeId.parse(spiffe_id))
        now = now or utcnow()
        serials = [
            r.serial for r in self.issued.values() if r.spiffe_id == sid and r.not_after > now
        ]
        if not serials:
            raise IdentityError(f"no unexpired certificate issued for {sid}")
        return [self.revoke(s, reason, now=now) for s in serials]

    def crl_pem(
        self, *, now: dt.datetime | None = None, validity: dt.timedelta = DEFAULT_CRL_VALIDITY
    ) -> bytes:
        """A freshly signed CRL (new CRL number) listing unexpired revocations."""
        now = now or utcnow()
        self.crl_number += 1
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.certificate.subject)
            .last_update(now - CLOCK_SKEW)
            .next_update(now + validity)
            .add_extension(x509.CRLNumber(self.crl_number), critical=False)
        )
        ski = self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        for rev in self.revocations.values():
            if rev.cert_not_after is not None and rev.cert_not_after < now - CLOCK_SKEW:
                continue  # expired anyway: keeps the CRL short
            entry = (
                x509.RevokedCertificateBuilder()
                .serial_number(rev.serial)
                .revocation_date(rev.revoked_at)
                .add_extension(x509.CRLReason(rev.reason), critical=False)
                .build()
            )
            builder = builder.add_revoked_certificate(entry)
        crl = builder.sign(self.key.cryptography_key, None)
        return crl.public_bytes(serialization.Encoding.PEM)

    # ------------------------------------------------------------------ trust

    def anchors(self) -> list[x509.Certificate]:
        """This CA's certificate plus any extra anchors."""
        return [self.certificate, *self.extra_anchors]

    def trust_bundle_pem(self) -> bytes:
        """PEM of every certificate a node of this trust domain should trust."""
        return certs_pem(self.anchors())

    # ------------------------------------------------------------------ persistence

    def save(
        self, directory: Path, passphrase: bytes | None = None, *,
        key_store: KeyStore | None = None,
    ) -> None:
        """Write the encrypted key (0600), certificate and state to ``directory``.

        With ``key_store`` the key lives there and is *not* written here: store it
        once when the CA is created (``key_store.store(ca.key)``); later saves only
        rewrite certificate and state (a Shamir store must not re-split per save)."""
        directory = Path(directory)
        if key_store is None:
            write_private_key(directory / CA_KEY_FILE, self.key, passphrase)
        atomic_write(directory / CA_CERT_FILE, self.trust_bundle_pem())
        self.save_state(directory)

    def save_state(self, directory: Path) -> None:
        """Make the state and the issued log durable in ``directory`` (the key and
        certificate stay): what a running CA service does after each change."""
        change = self.pending_state()
        write_state(directory, change)
        self.state_written(change)

    def pending_state(self) -> StateWrite:
        """What :meth:`save_state` would write, taken now (on the thread that changes
        the CA); :func:`write_state` can then run elsewhere."""
        state = self.state_json()
        return StateWrite(None if state == self._state_saved else state,
                          self._journal.pending(self.issued))

    def state_written(self, change: StateWrite) -> None:
        """``change`` is durable."""
        if change.state is not None:
            self._state_saved = change.state
        if change.log is not None:
            self._journal.written(change.log)

    def state_json(self) -> bytes:
        """The state file's bytes (policy, CRL number, revocations; the issued log is
        its own file)."""
        state = {
            "trust_domain": self.trust_domain,
            "crl_number": self.crl_number,
            "policy": self.policy.to_json(),
            "revocations": [
                {
                    "serial": format(r.serial, "x"),
                    "revoked_at": r.revoked_at.isoformat(),
                    "reason": r.reason.name,
                    "cert_not_after": r.cert_not_after.isoformat() if r.cert_not_after else None,
                }
                for r in self.revocations.values()
            ],
        }
        return json.dumps(state, indent=1).encode()

    @classmethod
    def load(
        cls, directory: Path, passphrase: bytes | None = None, *,
        key_store: KeyStore | None = None,
    ) -> MeshCA:
        """Inverse of :meth:`save`; the key from ``key_store`` when given."""
        directory = Path(directory)
        if key_store is not None:
            key = key_store.load()
        else:
            key = read_private_key(directory / CA_KEY_FILE, passphrase)
        certs = load_certs(
            read_bounded(directory / CA_CERT_FILE, MAX_PEM_BYTES, "CA certificate"),
            "CA certificate",
        )
        if not certs:
            raise IdentityError(f"{directory / CA_CERT_FILE} holds no certificate")
        if certs[0].public_key() != key.public_key.cryptography_key:
            raise IdentityError("CA key does not match the CA certificate")
        raw = read_bounded(directory / CA_STATE_FILE, MAX_STATE_BYTES, "CA state")
        try:
            state = json.loads(raw)
            ca = cls(
                trust_domain=str(state["trust_domain"]),
                key=key,
                certificate=certs[0],
                policy=IssuancePolicy.from_json(state.get("policy", {})),
                crl_number=int(state.get("crl_number", 0)),
                extra_anchors=certs[1:],
            )
            for r in state.get("revocations", []):
                serial = int(r["serial"], 16)
                ca.revocations[serial] = Revocation(
                    serial,
                    dt.datetime.fromisoformat(r["revoked_at"]),
                    parse_reason(r["reason"]),
                    dt.datetime.fromisoformat(r["cert_not_after"]) if r.get("cert_not_after")
                    else None,
                )
            legacy = [parse_issued(r) for r in state.get("issued", [])]
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise IdentityError(f"corrupt CA state {directory / CA_STATE_FILE}: {exc}") from None
        # an earlier version's log (in the state file) first; the journal's lines after
        ca.issued = {r.serial: r for r in legacy}
        journal = read_log(directory, MAX_STATE_BYTES, ca.issued)
        ca._journal = journal if journal is not None and not legacy else IssuedJournal()
        ca._state_saved = None if legacy else raw
        return ca

    def __repr__(self) -> str:
        return f"MeshCA({self.trust_domain}, revoked={len(self.revocations)})"
