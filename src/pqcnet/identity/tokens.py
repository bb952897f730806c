"""One-time enrollment tokens: how a new node proves it was invited (seed 001 §4).

An operator creates a token (``pqcnet ca token create``) bound to a SPIFFE ID
pattern and a role, with a short TTL. The CA keeps only the token's SHA-256 in
``tokens.db`` next to its state, so a copy of the CA directory does not leak
usable tokens. A joining node presents the secret once to ``POST /v1/enroll``;
:meth:`TokenStore.redeem` marks it used in the same transaction that checks it, so a
second use — a replay — is refused (``used``) and counted by the service. The one
exception is the same node retrying with the same SPIFFE ID and key before the token
expires (:meth:`TokenStore.is_retry`): a CA that crashed after spending the token must
not strand a node whose answer was lost.

The token *bundle* (:func:`write_bundle`) is what travels to the node, by network
or on a USB stick for an air-gapped site (seed 001 §4.2): the secret, the CA trust
bundle the node pins, the CA service URL and the pattern/role it may ask for.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pqcnet.identity.certs import MAX_PEM_BYTES, load_certs, utcnow
from pqcnet.identity.errors import IdentityError
from pqcnet.identity.keystore import atomic_write, read_bounded
from pqcnet.identity.spiffe import SpiffeId, SpiffeLayout, spiffe_matches, validate_pattern

TOKEN_DB = "tokens.db"
#: The JSON store of earlier versions (imported on first open).
TOKEN_FILE = "tokens.json"
_LOCK_FILE = ".tokens.lock"
TOKEN_PREFIX = "pqcnet-et1."
#: Seconds a store operation waits for another process's write transaction.
BUSY_TIMEOUT_S = 30.0
#: Token secret entropy (bytes).
TOKEN_BYTES = 32
#: Longest TTL a token may have: tokens are for joining now, not for later.
MAX_TOKEN_TTL = dt.timedelta(days=7)
#: Tokens kept in the store; used and expired ones are pruned first.
MAX_TOKENS = 100_000
#: Bound on a legacy ``tokens.json`` read for import.
MAX_TOKEN_FILE_BYTES = 64 * 1024 * 1024
#: How long a used/expired token's hash is kept (a later replay is still named "used").
KEEP_SPENT = dt.timedelta(days=1)
#: What a token can be (``pqcnet ca token list``, the ``pqcnet_ca_tokens`` gauge).
TOKEN_STATES = ("live", "used", "expired")
BUNDLE_KIND = "pqcnet-enrollment-token"
BUNDLE_VERSION = 1
#: The CA service's own SPIFFE ID path (``spiffe://<td>/pqcnet/ca/ca-service``); nodes
#: pin ``spiffe://<td>/pqcnet/ca/*``.
CA_SERVICE_TENANT = "pqcnet"
CA_SERVICE_ROLE = "ca"


def ca_service_id(trust_domain: str) -> SpiffeId:
    """The SPIFFE ID the CA service presents."""
    return SpiffeId(trust_domain, CA_SERVICE_TENANT, CA_SERVICE_ROLE, "ca-service")


def ca_service_pattern(trust_domain: str) -> str:
    """What a node pins when talking to the CA service."""
    return f"spiffe://{trust_domain}/{CA_SERVICE_TENANT}/{CA_SERVICE_ROLE}/*"


class TokenError(IdentityError):
    """A token was refused. ``code``: ``malformed``, ``unknown``, ``used``, ``expired``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """What the CA remembers about a token (never the secret)."""

    #: SHA-256 of the secret, hex
    token_hash: str
    #: SPIFFE ID pattern the redeeming node's CSR must match
    pattern: str
    #: role the certificate will carry (must equal the ID's role segment)
    role: str
    created_at: dt.datetime
    expires_at: dt.datetime
    used_at: dt.datetime | None = None
    #: the SPIFFE ID the token was spent on
    used_by: str = ""
    #: SHA-256 (hex) of the public key it was spent on: that node may ask again (below)
    used_key: str = ""

    def state(self, now: dt.datetime) -> str:
        """One of :data:`TOKEN_STATES`: ``used``, ``expired`` (never used) or ``live``
        (may still be redeemed)."""
        return "used" if self.used_at else "expired" if now >= self.expires_at else "live"

    def to_json(self) -> dict[str, Any]:
        return {"token_hash": self.token_hash, "pattern": self.pattern, "role": self.role,
                "created_at": self.created_at.isoformat(),
                "expires_at": self.expires_at.isoformat(),
                "used_at": self.used_at.isoformat() if self.used_at else None,
                "used_by": self.used_by, "used_key": self.used_key}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TokenRecord:
        return cls(
            token_hash=str(d["token_hash"]), pattern=str(d["pattern"]), role=str(d["role"]),
            created_at=dt.datetime.fromisoformat(d["created_at"]),
            expires_at=dt.datetime.fromisoformat(d["expires_at"]),
            used_at=dt.datetime.fromisoformat(d["used_at"]) if d.get("used_at") else None,
            used_by=str(d.get("used_by", "")), used_key=str(d.get("used_key", "")),
        )


def hash_token(secret: str) -> str:
    """The stored form of a token secret; a malformed secret is a ``malformed`` error."""
    if not isinstance(secret, str) or not secret.startswith(TOKEN_PREFIX):
        raise TokenError("malformed", f"token must start with {TOKEN_PREFIX!r}")
    body = secret[len(TOKEN_PREFIX):]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (ValueError, TypeError):
        raise TokenError("malformed", "token is not base64url") from None
    if len(raw) != TOKEN_BYTES:
        raise TokenError("malformed", f"token must carry {TOKEN_BYTES} random bytes")
    return hashlib.sha256(raw).hexdigest()


def check_binding(pattern: str, role: str, layouts: Sequence[SpiffeLayout] = ()) -> None:
    """A token binding is a valid pattern whose role segment can match ``role`` — or,
    for IDs of another shape, one that fits one of the CA's ``layouts`` with ``role``."""
    validate_pattern(pattern)
    segs = pattern[len("spiffe://"):].split("/")
    if not role or "/" in role:
        raise IdentityError("token role must be one path segment")
    if len(segs) != 4 and any(la.admits_pattern(pattern, role) for la in layouts):
        return
    if len(segs) != 4:
        shapes = "".join(f" or {la.uri}" for la in layouts)
        raise IdentityError("token pattern must be spiffe://<td>/<tenant>/<role>/<node-id glob>"
                            f"{shapes} (role {role!r})")
    probe = SpiffeId(segs[0], "t", role, "n")
    if not spiffe_matches(f"spiffe://{segs[0]}/*/{segs[2]}/*", probe):
        raise IdentityError(f"pattern {pattern!r} cannot name role {role!r}")


class TokenStore:
    """The CA directory's token store, ``tokens.db`` (SQLite): create, check, redeem.

    Why SQLite and not a JSON file rewritten per change (as before): spending one token
    rewrote and fsynced every token, so enrolling a fleet cost O(tokens) per node —
    ``bench enroll`` gave 123-154 enrollments/s with 200 tokens, 67-81 with 1,000. A
    redeem is now one row updated in one transaction (``BEGIN IMMEDIATE``: it decides
    under SQLite's write lock, so a second use is refused even from another process),
    durable at commit (WAL, ``synchronous=FULL``). ``pqcnet ca token create`` and a
    running ``pqcnet ca serve`` share the file; readers never wait for a writer (WAL),
    so :meth:`check` on the service's event loop does not wait for another
    enrollment's commit. The file and its ``-wal``/``-shm`` companions are 0600.

    A ``tokens.json`` of an earlier version is imported on first open (under the
    directory's ``.tokens.lock``) and renamed ``tokens.json.imported``.
    """

    def __init__(self, ca_dir: Path) -> None:
        self.path = Path(ca_dir) / TOKEN_DB
        self._legacy = Path(ca_dir) / TOKEN_FILE
        self._lock_path = Path(ca_dir) / _LOCK_FILE
        #: one connection per thread (sqlite3's rule); the service checks on its loop
        #: and redeems in worker threads
        self._local = threading.local()
        self._ready = False

    # ----------------------------------------------------------------- connection

    def _con(self) -> sqlite3.Connection:
        con: sqlite3.Connection | None = getattr(self._local, "con", None)
        if con is None:
            if not self._ready:
                self._open()
            con = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            con.execute("PRAGMA synchronous=FULL")
            self._local.con = con
        return con

    def _open(self) -> None:
        """Create the database (0600) with its schema, importing a legacy JSON store;
        once per process and directory, under the directory's lock."""
        self._lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
                with contextlib.closing(sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S,
                                                        isolation_level=None)) as con:
                    con.execute("PRAGMA journal_mode=WAL")
                    con.executescript(_SCHEMA)
                    if self._legacy.exists():
                        self._import(con)
            except sqlite3.DatabaseError as exc:
                raise IdentityError(f"corrupt token store {self.path}: {exc}") from None
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        self._ready = True

    def _import(self, con: sqlite3.Connection) -> None:
        raw = read_bounded(self._legacy, MAX_TOKEN_FILE_BYTES, "token store")
        try:
            old = [TokenRecord.from_json(d) for d in json.loads(raw)["tokens"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise IdentityError(f"corrupt token store {self._legacy}: {exc}") from None
        with _transaction(con):
            con.executemany(_IMPORT, [_row(r) for r in old])
        os.replace(self._legacy, self._legacy.with_name(TOKEN_FILE + ".imported"))

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (SQLite's write lock from its start); a database error
        is an :class:`IdentityError`."""
        try:
            con = self._con()
            with _transaction(con):
                yield con
        except sqlite3.DatabaseError as exc:
            raise IdentityError(f"token store {self.path}: {exc}") from None

    def _get(self, digest: str) -> TokenRecord | None:
        try:
            row = self._con().execute(_BY_HASH, (digest,)).fetchone()
        except sqlite3.DatabaseError as exc:
            raise IdentityError(f"token store {self.path}: {exc}") from None
        return _record(row) if row is not None else None

    def records(self) -> list[TokenRecord]:
        """Every record, by hash (what an operator or a test reads back)."""
        try:
            rows = self._con().execute(_ALL).fetchall()
        except sqlite3.DatabaseError as exc:
            raise IdentityError(f"token store {self.path}: {exc}") from None
        return [_record(r) for r in rows]

    def counts(self, now: dt.datetime | None = None) -> dict[str, int]:
        """Tokens per :data:`TOKEN_STATES` entry, counted by SQLite (one pass over the
        table, at most :data:`MAX_TOKENS` rows; no record is built)."""
        at = _us(now or utcnow())
        try:
            row = self._con().execute(
                "SELECT count(used_us), count(*) - count(used_us) - "
                "coalesce(sum(used_us IS NULL AND expires_us <= ?), 0), "
                "coalesce(sum(used_us IS NULL AND expires_us <= ?), 0) FROM tokens",
                (at, at)).fetchone()
        except sqlite3.DatabaseError as exc:
            raise IdentityError(f"token store {self.path}: {exc}") from None
        used, live, expired = (int(v) for v in row)
        return {"live": live, "used": used, "expired": expired}

    # ----------------------------------------------------------------- operations

    def create(self, pattern: str, role: str, ttl: dt.timedelta, *,
               now: dt.datetime | None = None,
               layouts: Sequence[SpiffeLayout] = ()) -> tuple[str, TokenRecord]:
        """A new token secret (returned once, never stored) and its record; ``layouts``
        are the CA policy's SPIFFE layouts (patterns of other shapes must fit one)."""
        check_binding(pattern, role, layouts)
        if not dt.timedelta(0) < ttl <= MAX_TOKEN_TTL:
            raise IdentityError(f"token TTL must be positive and at most {MAX_TOKEN_TTL}")
        now = now or utcnow()
        secret = TOKEN_PREFIX + base64.urlsafe_b64encode(
            secrets.token_bytes(TOKEN_BYTES)).decode().rstrip("=")
        rec = TokenRecord(hash_token(secret), pattern, role, now, now + ttl)
        with self._write() as con:
            con.execute("DELETE FROM tokens WHERE coalesce(used_us, expires_us) < ?",
                        (_us(now - KEEP_SPENT),))
            (live,) = con.execute("SELECT count(*) FROM tokens").fetchone()
            if live >= MAX_TOKENS:
                raise IdentityError(f"{MAX_TOKENS} live tokens already; let some expire")
            con.execute(_INSERT, _row(rec))
        return secret, rec

    def revoke(self, hash_prefix: str) -> TokenRecord:
        """Withdraw the unused token whose hash starts with ``hash_prefix`` (at least
        8 hex digits, as ``pqcnet ca token list`` shows them): a later redeem is
        ``unknown``. A spent token, an unknown or an ambiguous prefix is an error."""
        prefix = hash_prefix.lower()
        if len(prefix) < 8 or any(c not in "0123456789abcdef" for c in prefix):
            raise IdentityError("a token is named by at least 8 hex digits of its hash")
        with self._write() as con:
            rows = con.execute(_SELECT + " WHERE substr(token_hash, 1, ?) = ? LIMIT 2",
                               (len(prefix), prefix)).fetchall()
            if not rows:
                raise IdentityError(f"no token with hash {prefix}…")
            if len(rows) > 1:
                raise IdentityError(f"more than one token with hash {prefix}…; give more "
                                    "digits")
            rec = _record(rows[0])
            if rec.used_at is not None:
                raise IdentityError(f"token {prefix}… was already used by {rec.used_by}; "
                                    "revoke its certificate instead")
            con.execute("DELETE FROM tokens WHERE token_hash = ?", (rec.token_hash,))
            return rec

    def check(self, secret: str, *, now: dt.datetime | None = None) -> TokenRecord:
        """The token's record if it may be redeemed now (nothing is written).

        Advisory — :meth:`redeem` decides in its transaction — and it never waits for
        a writer (WAL readers do not), so the CA service's event loop does not wait here
        for another enrollment's commit and fsync."""
        digest = hash_token(secret)
        return self._usable(self._get(digest), now or utcnow())

    def redeem(self, secret: str, spiffe_id: SpiffeId, *, key_digest: str = "",
               now: dt.datetime | None = None) -> TokenRecord:
        """Spend the token on ``spiffe_id`` (which must match its binding) and the key
        whose SHA-256 is ``key_digest``."""
        digest = hash_token(secret)
        now = now or utcnow()
        with self._write() as con:
            row = con.execute(_BY_HASH, (digest,)).fetchone()
            rec = self._usable(_record(row) if row is not None else None, now)
            check_token_binding(rec, spiffe_id)
            spent = TokenRecord(rec.token_hash, rec.pattern, rec.role, rec.created_at,
                                rec.expires_at, now, str(spiffe_id), key_digest)
            con.execute("UPDATE tokens SET used_us = ?, used_by = ?, used_key = ? "
                        "WHERE token_hash = ?", (_us(now), str(spiffe_id), key_digest,
                                                  digest))
            return spent

    def is_retry(self, secret: str, spiffe_id: SpiffeId, key_digest: str, *,
                 now: dt.datetime | None = None) -> bool:
        """Whether a spent token was spent on exactly ``spiffe_id`` and this key and has
        not expired: the same node asking again because the CA's answer never reached it
        (the CA crashed after spending the token, the connection was cut). The CSR's
        signature proves the caller holds that key, so a second certificate gives it
        nothing it does not have; any other ID or key stays a replay."""
        rec = self._get(hash_token(secret))
        return (rec is not None and rec.used_at is not None and bool(rec.used_key)
                and rec.used_by == str(spiffe_id)
                and hmac.compare_digest(rec.used_key, key_digest)
                and (now or utcnow()) < rec.expires_at)

    @staticmethod
    def _usable(rec: TokenRecord | None, now: dt.datetime) -> TokenRecord:
        if rec is None:
            raise TokenError("unknown", "token is not known to this CA")
        if rec.used_at is not None:
            raise TokenError("used", f"token was already used (by {rec.used_by} at "
                             f"{rec.used_at.isoformat()})")
        if now >= rec.expires_at:
            raise TokenError("expired", f"token expired at {rec.expires_at.isoformat()}")
        return rec


_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
  token_hash TEXT PRIMARY KEY, pattern TEXT NOT NULL, role TEXT NOT NULL,
  created_us INTEGER NOT NULL, expires_us INTEGER NOT NULL, used_us INTEGER,
  used_by TEXT NOT NULL DEFAULT '', used_key TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS tokens_end ON tokens (coalesce(used_us, expires_us));
"""
_SELECT = ("SELECT token_hash, pattern, role, created_us, expires_us, used_us, used_by, "
           "used_key FROM tokens")
_BY_HASH = _SELECT + " WHERE token_hash = ?"
_ALL = _SELECT + " ORDER BY token_hash"
_INSERT = "INSERT INTO tokens VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
_IMPORT = "INSERT OR IGNORE INTO tokens VALUES (?, ?, ?, ?, ?, ?, ?, ?)"


@contextlib.contextmanager
def _transaction(con: sqlite3.Connection) -> Iterator[None]:
    con.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def _us(t: dt.datetime) -> int:
    """Microseconds since the epoch (exact, and ordered as the times are)."""
    return (t - _EPOCH) // dt.timedelta(microseconds=1)


def _at(us: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(microseconds=us)


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _row(r: TokenRecord) -> tuple[Any, ...]:
    return (r.token_hash, r.pattern, r.role, _us(r.created_at), _us(r.expires_at),
            _us(r.used_at) if r.used_at is not None else None, r.used_by, r.used_key)


def _record(row: Sequence[Any]) -> TokenRecord:
    return TokenRecord(row[0], row[1], row[2], _at(row[3]), _at(row[4]),
                       _at(row[5]) if row[5] is not None else None, row[6], row[7])


def check_token_binding(rec: TokenRecord, spiffe_id: SpiffeId) -> None:
    """Raise :class:`TokenError` (``wrong_pattern``) unless ``spiffe_id`` fits the token
    (an ID of another shape: read through the CA's layouts first, for its role)."""
    if not spiffe_matches(rec.pattern, spiffe_id) or spiffe_id.role != rec.role:
        raise TokenError("wrong_pattern", f"{spiffe_id} is outside this token's binding "
                         f"({rec.pattern}, role {rec.role})")


# --------------------------------------------------------------------------- bundle file


@dataclass(frozen=True, slots=True)
class TokenBundle:
    """What a joining node is given (by network or on removable media)."""

    token: str
    pattern: str
    role: str
    expires_at: dt.datetime
    #: PEM of the CA certificate(s) the node pins
    ca_bundle_pem: bytes
    #: ``https://host:port`` of ``pqcnet ca serve`` (empty: give ``--ca`` on enroll)
    ca_url: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"v": BUNDLE_VERSION, "kind": BUNDLE_KIND, "token": self.token,
                "spiffe_pattern": self.pattern, "role": self.role,
                "expires_at": self.expires_at.isoformat(), "ca_url": self.ca_url,
                "ca_bundle": self.ca_bundle_pem.decode()}


def write_bundle(path: Path, bundle: TokenBundle) -> None:
    """Write the token bundle (0600: it holds a secret) atomically."""
    atomic_write(Path(path), json.dumps(bundle.to_json(), indent=1).encode(), mode=0o600)


def read_bundle(path: Path) -> TokenBundle:
    """Parse a token bundle file; anything off is an :class:`IdentityError`."""
    raw = read_bounded(Path(path), MAX_PEM_BYTES * 2, "token bundle")
    try:
        d = json.loads(raw)
        if d.get("kind") != BUNDLE_KIND or d.get("v") != BUNDLE_VERSION:
            raise IdentityError(f"{path} is not a pqcnet enrollment token bundle")
        bundle = TokenBundle(str(d["token"]), str(d["spiffe_pattern"]), str(d["role"]),
                             dt.datetime.fromisoformat(d["expires_at"]),
                             str(d["ca_bundle"]).encode(), str(d.get("ca_url", "")))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise IdentityError(f"corrupt token bundle {path}: {exc}") from None
    if not load_certs(bundle.ca_bundle_pem, "CA bundle in the token file"):
        raise IdentityError(f"{path} carries no CA certificate")
    return bundle


__all__ = [
    "CA_SERVICE_ROLE",
    "CA_SERVICE_TENANT",
    "TOKEN_DB",
    "TOKEN_FILE",
    "TokenBundle",
    "TokenError",
    "TokenRecord",
    "TokenStore",
    "ca_service_id",
    "ca_service_pattern",
    "check_binding",
    "check_token_binding",
    "hash_token",
    "read_bundle",
    "write_bundle",
]
