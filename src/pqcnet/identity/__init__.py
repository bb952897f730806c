"""Mesh identity: SPIFFE IDs, the ML-DSA mesh CA, node identities, CRLs, key store.

Every QSTP peer authenticates with an X.509 certificate signed by its trust
domain's :class:`MeshCA` using ML-DSA-65, naming the node by a SPIFFE ID in the
URI SAN. :mod:`pqcnet.qstp.tls` turns a :class:`NodeIdentity` into TLS contexts.
"""

from __future__ import annotations

import datetime as dt

from pqcnet.identity.ca import (
    DEFAULT_CRL_VALIDITY,
    DEFAULT_MAX_TTL,
    DEFAULT_TTL,
    IssuancePolicy,
    MeshCA,
    Revocation,
    parse_reason,
)
from pqcnet.identity.certs import spiffe_id_of
from pqcnet.identity.crl import RevocationList, load_crl
from pqcnet.identity.csr import build_csr
from pqcnet.identity.node import NodeIdentity
from pqcnet.identity.spiffe import SpiffeId, spiffe_matches, validate_pattern

__all__ = [
    "DEFAULT_CRL_VALIDITY",
    "DEFAULT_MAX_TTL",
    "DEFAULT_TTL",
    "IssuancePolicy",
    "MeshCA",
    "NodeIdentity",
    "Revocation",
    "RevocationList",
    "SpiffeId",
    "build_csr",
    "dev_identities",
    "load_crl",
    "parse_reason",
    "spiffe_id_of",
    "spiffe_matches",
    "validate_pattern",
]


def dev_identities(
    trust_domain: str, *spiffe_ids: str, ttl: dt.timedelta = DEFAULT_TTL
) -> tuple[MeshCA, list[NodeIdentity]]:
    """An in-memory real CA and one identity per SPIFFE ID (tests, demo, benchmarks).

    Nothing is faked: keys are fresh ML-DSA-65, certificates and CRL are signed.
    Each identity carries the CRL as of its issuance.
    """
    ca = MeshCA.create(trust_domain)
    nodes = [ca.issue(sid, ttl) for sid in spiffe_ids]
    return ca, nodes
