"""Orphan pool bounds: junk from unknown authors cannot crowd out legit vertices."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pqcnet.crypto.pqc import SigningKey
from pqcnet.qsdag import (
    BadSignature,
    KeyRecord,
    Ledger,
    OrphanPoolFull,
    Route,
    VertexKind,
    VertexParked,
    sign_vertex,
)
from pqcnet.qsdag.payloads import encode_payload
from pqcnet.qsdag.vertex import Vertex
from tests.qsdag.conftest import ALICE, BOB, GOV, make_ledger

pytestmark = pytest.mark.timeout(120)

JUNK_KEY = SigningKey.from_seed(b"j" * 32)


def junk(i: int, author: str | None = None, key: SigningKey = JUNK_KEY) -> Vertex:
    """A well-formed vertex from an unregistered author, on parents nobody has."""
    return sign_vertex(key, kind=VertexKind.ROUTE, author=author or f"mallory-{i}",
                       counter=5, timestamp_ms=1, key_version=1, parents=[os.urandom(32)],
                       payload=encode_payload(Route(f"t{i}", "m")))


def replica(src: Ledger, path: Path, **kw: int) -> Ledger:
    """A ledger holding only ``src``'s genesis and first key registrations."""
    dst = Ledger.open(path, **kw)  # type: ignore[arg-type]
    dst.import_(src.get(vid) for vid in src.ids()[:3])
    return dst


def detached(ledger: Ledger, author: str, signer: SigningKey, n: int) -> list[Vertex]:
    """n vertices by ``author`` on a chain whose root the target ledger never sees."""
    ledger.append(VertexKind.ROUTE, Route("root", author), author, signer)
    return [ledger.get(ledger.append(VertexKind.ROUTE, Route(str(i), author), author,
                                     signer).id) for i in range(n)]


def test_unknown_author_junk_is_confined_to_its_sub_pool(tmp_path: Path) -> None:
    src = make_ledger(tmp_path / "src")
    dst = replica(src, tmp_path / "dst", max_orphans=8, max_unverified_orphans=3)
    for i in range(3):
        with pytest.raises(VertexParked):
            dst.verify_and_anchor(junk(i))
    for i in range(3, 10):
        with pytest.raises(OrphanPoolFull):
            dst.verify_and_anchor(junk(i))
    assert dst.orphan_count == 3
    # a known author's out-of-order vertices still park (signature checked) ...
    legit = detached(src, "alice", ALICE, 3)
    report = dst.import_(legit)
    assert report.parked == [v.id for v in legit] and not report.rejected
    # ... and are anchored once their ancestry arrives
    report = dst.import_(src.export(src.tips(), known_tips=dst.tips()))
    assert {v.id for v in legit} <= set(report.anchored)
    assert dst.orphan_count == 3 and dst.verify().ok
    src.close()
    dst.close()


def test_forged_vertex_under_a_known_name_is_rejected_not_parked(tmp_path: Path) -> None:
    dst = make_ledger(tmp_path / "dst")
    with pytest.raises(BadSignature):
        dst.verify_and_anchor(junk(0, author="alice"))
    assert dst.orphan_count == 0
    dst.close()


def test_per_author_quota(tmp_path: Path) -> None:
    src = make_ledger(tmp_path / "src")
    dst = replica(src, tmp_path / "dst", max_orphans=10, max_orphans_per_author=2)
    flood = detached(src, "alice", ALICE, 4)
    report = dst.import_(flood)
    assert report.parked == [flood[0].id, flood[1].id]
    assert [type(e) for _, e in report.rejected] == [OrphanPoolFull, OrphanPoolFull]
    assert all(e.retriable for _, e in report.rejected)
    bobs = detached(src, "bob", BOB, 2)
    assert dst.import_(bobs).parked == [v.id for v in bobs]
    src.close()
    dst.close()


def test_parked_registration_vouches_for_a_new_author_and_survives_reopen(
        tmp_path: Path) -> None:
    src = make_ledger(tmp_path / "src")
    carol = SigningKey.from_seed(b"c" * 32)
    src.append(VertexKind.ROUTE, Route("hidden", "alice"), "alice", ALICE)
    reg = src.get(src.register_author("carol", carol.public_key, registrar="gov",
                                      signer=GOV).id)
    cv = src.get(src.append(VertexKind.ROUTE, Route("c", "carol"), "carol", carol).id)
    dst_path = tmp_path / "dst"
    dst = replica(src, dst_path, max_orphans=4, max_unverified_orphans=1)
    with pytest.raises(VertexParked):
        dst.verify_and_anchor(junk(0))  # fills the unverified sub-pool
    with pytest.raises(VertexParked):
        dst.verify_and_anchor(reg)      # gov is known: verified orphan
    with pytest.raises(VertexParked):
        dst.verify_and_anchor(cv)       # carol's key is vouched for by the parked registration
    forged = sign_vertex(JUNK_KEY, kind=VertexKind.ROUTE, author="carol", counter=3,
                         timestamp_ms=1, key_version=1, parents=[os.urandom(32)],
                         payload=encode_payload(Route("x", "carol")))
    with pytest.raises(BadSignature):
        dst.verify_and_anchor(forged)
    dst.close()
    dst = Ledger.open(dst_path, max_orphans=4, max_unverified_orphans=1)
    assert dst.orphan_count == 3
    # classification survived reopen: the unverified sub-pool is still the full one
    with pytest.raises(OrphanPoolFull):
        dst.verify_and_anchor(junk(1))
    with pytest.raises(BadSignature):
        dst.verify_and_anchor(forged)
    report = dst.import_(src.export(src.tips(), known_tips=dst.tips()))
    assert {reg.id, cv.id} <= set(report.anchored)
    assert dst.orphan_count == 1 and dst.verify().ok
    assert dst.views.key_versions.current("carol") == 1
    src.close()
    dst.close()


def test_self_enrolment_does_not_vouch(tmp_path: Path) -> None:
    dst = Ledger.open(tmp_path / "dst", max_orphans=4, max_unverified_orphans=2)
    dst.init_genesis("n", "gov", GOV, open_enrolment=True)
    eve = SigningKey.from_seed(b"e" * 32)
    enrol = sign_vertex(eve, kind=VertexKind.KEY_VERSION, author="eve", counter=0,
                        timestamp_ms=1, key_version=1, parents=[os.urandom(32)],
                        payload=encode_payload(KeyRecord("eve", 1, eve.algorithm,
                                                         eve.public_key.raw)))
    with pytest.raises(VertexParked):
        dst.verify_and_anchor(enrol)
    with pytest.raises(VertexParked):
        dst.verify_and_anchor(junk(0, author="eve", key=eve))
    with pytest.raises(OrphanPoolFull):  # both counted as unverified
        dst.verify_and_anchor(junk(1, author="eve", key=eve))
    dst.close()
