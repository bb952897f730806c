"""IdentitySanitizer: strip, keyed-hash or replace identity data before it leaves the sentry.

A tenant's policy names header / gRPC-metadata keys (case-insensitive) and JSON body
fields (dotted paths; a list on the way applies the rest of the path to each element,
so JSON-RPC batches work) and, for each, one action:

* ``strip``   — remove it;
* ``hash``    — replace the value by ``hmac256:<hex>``, HMAC-SHA256 under the tenant's
  secret key. Keyed, so a backend (or a thief of its logs) cannot reverse it by
  hashing a dictionary of IPs or wallet addresses, yet equal inputs still correlate;
* ``replace`` — replace the value by a fixed string.

Fail closed: when a policy has JSON rules, a non-empty HTTP body that is not JSON is
refused rather than forwarded unsanitized.

:attr:`SanitizerPolicy.digest` is SHA-256 over a canonical JSON form of the rules plus
the SHA-256 of the key (never the key itself); the sentry anchors it in the QS-DAG at
load so auditors can prove which policy was in force.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pqcnet.sentry.errors import SentryConfigError, WireError
from pqcnet.sentry.memo import Memo

ActionKind = Literal["strip", "hash", "replace"]
HASH_PREFIX = "hmac256:"
#: Longest value (characters) whose keyed hash is memoised.
HASH_MEMO_MAX_VALUE = 256
#: Bound on JSON nesting we walk (a hostile body cannot make us recurse deeply).
MAX_JSON_DEPTH = 64


@dataclass(frozen=True, slots=True)
class Action:
    """What to do with one header or field."""

    kind: ActionKind
    #: replacement value for ``replace``
    value: str = ""

    @classmethod
    def parse(cls, spec: object) -> Action:
        """``"strip"`` / ``"hash"`` / ``{"replace": "..."}``."""
        if spec == "strip":
            return cls("strip")
        if spec == "hash":
            return cls("hash")
        if isinstance(spec, Mapping) and set(spec) == {"replace"}:
            return cls("replace", str(spec["replace"]))
        raise SentryConfigError(
            f"sanitizer action must be 'strip', 'hash' or {{replace: value}}, got {spec!r}"
        )

    def to_json(self) -> object:
        """Canonical form used in the policy digest."""
        return {"replace": self.value} if self.kind == "replace" else self.kind


@dataclass(frozen=True, slots=True)
class SanitizerPolicy:
    """One tenant's rules and HMAC key."""

    key: bytes
    headers: Mapping[str, Action] = field(default_factory=dict)
    json_fields: Mapping[str, Action] = field(default_factory=dict)
    #: value -> keyed hash: the same identities recur on every request of a client,
    #: and an HMAC per header per RPC showed up in profiles (bounded, see sentry.memo)
    _hashes: Memo[str, str] = field(default_factory=lambda: Memo(max_item=HASH_MEMO_MAX_VALUE),
                                    compare=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.key) < 16:
            raise SentryConfigError("sanitizer hash key must be at least 16 bytes")
        object.__setattr__(self, "headers", {k.lower(): v for k, v in self.headers.items()})

    @property
    def digest(self) -> bytes:
        """SHA-256 identifying this policy (rules + key fingerprint)."""
        canon = {
            "headers": {k: a.to_json() for k, a in sorted(self.headers.items())},
            "json_fields": {k: a.to_json() for k, a in sorted(self.json_fields.items())},
            "key_sha256": hashlib.sha256(self.key).hexdigest(),
        }
        return hashlib.sha256(json.dumps(canon, sort_keys=True).encode()).digest()

    def keyed_hash(self, value: str) -> str:
        """The ``hash`` action's output for ``value``."""
        got = self._hashes.get(value)
        if got is not None:
            return got
        mac = hmac.new(self.key, value.encode("utf-8", "surrogatepass"), hashlib.sha256)
        out = HASH_PREFIX + mac.hexdigest()
        return self._hashes.put(value, out) if len(value) <= HASH_MEMO_MAX_VALUE else out

    def _apply(self, action: Action, value: str) -> str:
        return self.keyed_hash(value) if action.kind == "hash" else action.value

    def sanitize_headers(self, headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        """Apply header rules; order of surviving headers is preserved."""
        out: list[tuple[str, str]] = []
        for name, value in headers:
            action = self.headers.get(name.lower())
            if action is None:
                out.append((name, value))
            elif action.kind != "strip":
                out.append((name, self._apply(action, value)))
        return out

    def sanitize_body(self, body: bytes) -> bytes:
        """Apply JSON field rules to an HTTP body (unchanged when there are none)."""
        if not self.json_fields or not body:
            return body
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):
            raise WireError("body is not JSON; the tenant's sanitizer policy needs JSON") from None
        for path, action in self.json_fields.items():
            self._walk(doc, path.split("."), action, 0)
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()

    def _walk(self, node: Any, parts: list[str], action: Action, depth: int) -> None:
        if depth > MAX_JSON_DEPTH:
            raise WireError(f"JSON body nested deeper than {MAX_JSON_DEPTH}")
        if isinstance(node, list):
            for item in node:
                self._walk(item, parts, action, depth + 1)
            return
        if not isinstance(node, dict) or parts[0] not in node:
            return
        if len(parts) > 1:
            self._walk(node[parts[0]], parts[1:], action, depth + 1)
        elif action.kind == "strip":
            del node[parts[0]]
        else:
            old = node[parts[0]]
            text = old if isinstance(old, str) else json.dumps(old, sort_keys=True)
            node[parts[0]] = self._apply(action, text)


def parse_policy(key: bytes, spec: Mapping[str, Any]) -> SanitizerPolicy:
    """Build from the YAML mapping ``{headers: {...}, json_fields: {...}}``."""
    unknown = set(spec) - {"headers", "json_fields", "key_file", "key_hex"}
    if unknown:
        raise SentryConfigError(f"unknown sanitizer keys: {sorted(unknown)}")
    return SanitizerPolicy(
        key=key,
        headers={str(k): Action.parse(v) for k, v in (spec.get("headers") or {}).items()},
        json_fields={str(k): Action.parse(v) for k, v in (spec.get("json_fields") or {}).items()},
    )


class IdentitySanitizer:
    """Per-tenant policies; a tenant without a policy passes through unchanged."""

    def __init__(self, policies: Mapping[str, SanitizerPolicy]) -> None:
        self.policies = dict(policies)

    def for_tenant(self, tenant: str) -> SanitizerPolicy | None:
        """The tenant's policy, if any."""
        return self.policies.get(tenant)

    def digests(self) -> dict[str, bytes]:
        """tenant -> policy digest (what gets anchored)."""
        return {t: p.digest for t, p in self.policies.items()}
