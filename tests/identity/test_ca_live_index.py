"""The CA's per-tenant index of live nodes (``MeshCA.live_ids`` / ``live_count``): what
``max_nodes_per_tenant`` and the ``pqcnet_ca_enrolled_nodes`` gauge count. Checked
against a brute-force scan of the issued log while time passes (certificates expire),
certificates are revoked, forgotten, pruned, the CA is reloaded and its layouts change."""

from __future__ import annotations

import dataclasses
import datetime as dt
import random
from pathlib import Path

import pytest
from cryptography import x509

from pqcnet.identity import MeshCA, SpiffeId
from pqcnet.identity import ca as ca_mod
from pqcnet.identity.ca import Revocation
from pqcnet.identity.certs import utcnow
from pqcnet.identity.spiffe import SpiffeLayout

TD = "idx.test"


def _scan(ca: MeshCA, tenant: str, now: dt.datetime) -> set[str]:
    """The definition, by brute force over the whole issued log."""
    return {r.spiffe_id for r in ca.issued.values()
            if r.not_after > now and r.serial not in ca.revocations
            and ca.policy.tenant_of(SpiffeId.parse(r.spiffe_id)) == tenant}


def _agree(ca: MeshCA, now: dt.datetime, tenants: tuple[str, ...] = ("acme", "other")) -> None:
    for t in tenants:
        assert ca.live_ids(t, now) == _scan(ca, t, now), t
    assert ca.live_count(now) == len({r.spiffe_id for r in ca.issued.values()
                                      if r.not_after > now and r.serial not in ca.revocations})


def test_index_follows_expiry_revocation_forget_and_reload(tmp_path: Path) -> None:
    ca = MeshCA.create(TD)
    t0 = utcnow()
    short = [ca.issue(f"spiffe://{TD}/acme/relayer/s{i}", dt.timedelta(hours=1), now=t0)
             for i in range(3)]
    long = [ca.issue(f"spiffe://{TD}/acme/relayer/l{i}", dt.timedelta(hours=10), now=t0)
            for i in range(3)]
    ca.issue(f"spiffe://{TD}/other/sentry/o1", dt.timedelta(hours=10), now=t0)
    _agree(ca, t0)
    assert len(ca.live_ids("acme", t0)) == 6
    # time passes: the 1 h certificates expire, their nodes stop counting
    later = t0 + dt.timedelta(hours=2)
    assert ca.live_ids("acme", later) == {str(i.spiffe_id) for i in long}
    _agree(ca, later)
    # a renewal of an expired node (new serial, same ID) counts it again, once
    ca.issue(short[0].spiffe_id, dt.timedelta(hours=10), now=later)
    assert str(short[0].spiffe_id) in ca.live_ids("acme", later)
    _agree(ca, later)
    # revocation frees the slot at once; forgetting an unused serial too
    ca.revoke(long[0], now=later)
    forgotten = ca.issue(f"spiffe://{TD}/acme/relayer/lost", dt.timedelta(hours=10), now=later)
    ca.forget(forgotten.serial)
    assert str(long[0].spiffe_id) not in ca.live_ids("acme", later)
    assert str(forgotten.spiffe_id) not in ca.live_ids("acme", later)
    _agree(ca, later)
    # the index is rebuilt from the saved state by a reloaded CA
    ca.save(tmp_path, b"pw")
    again = MeshCA.load(tmp_path, b"pw")
    _agree(again, later)
    assert again.live_ids("acme", later) == ca.live_ids("acme", later)


def test_index_rebuilt_when_layouts_change() -> None:
    """Tenants come from the policy's SPIFFE layouts: a new policy re-reads every ID."""
    ca = MeshCA.create(TD)
    now = utcnow()
    ca.policy = dataclasses.replace(ca.policy, spiffe_layouts=(
        SpiffeLayout.of(f"spiffe://{TD}/ns/{{tenant}}/sa/{{node}}", role="workload"),))
    ca.issue(f"spiffe://{TD}/ns/acme/sa/a", dt.timedelta(hours=1), now=now)
    ca.issue(f"spiffe://{TD}/acme/relayer/b", dt.timedelta(hours=1), now=now)
    assert ca.live_ids("acme", now) == {f"spiffe://{TD}/ns/acme/sa/a",
                                        f"spiffe://{TD}/acme/relayer/b"}
    ca.policy = dataclasses.replace(ca.policy, spiffe_layouts=())
    _agree(ca, now, ("acme", "ns", ""))
    assert ca.live_ids("acme", now) == {f"spiffe://{TD}/acme/relayer/b"}


def test_index_agrees_with_the_scan_through_a_random_history(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Issuances (with renewals of the same IDs), revocations by ``revoke`` and written
    straight into ``revocations`` (as a load does), forgets, prunes at the bound and
    time passing, 600 steps in a seeded random order: after every step the kept index
    answers what the brute-force scan of the issued log says."""
    monkeypatch.setattr(ca_mod, "MAX_ISSUED_LOG", 40)
    rng = random.Random(15)
    ca = MeshCA.create(TD)
    now = utcnow()
    for step in range(600):
        op = rng.random()
        tenant = rng.choice(("acme", "other"))
        if op < 0.55:
            ca.issue(f"spiffe://{TD}/{tenant}/relayer/n{rng.randrange(30)}",
                     dt.timedelta(minutes=rng.randrange(1, 90)), now=now)
        elif op < 0.65 and ca.issued:
            ca.revoke(rng.choice(list(ca.issued)), now=now)
        elif op < 0.70 and ca.issued:
            serial = rng.choice(list(ca.issued))
            ca.revocations[serial] = Revocation(serial, now, x509.ReasonFlags.unspecified,
                                                None)
        elif op < 0.80 and ca.issued:
            ca.forget(rng.choice(list(ca.issued)))
        else:
            now += dt.timedelta(minutes=rng.randrange(1, 20))
        _agree(ca, now)
        assert len(ca.issued) <= 40, step
