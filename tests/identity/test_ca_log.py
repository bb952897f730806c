"""The CA's issued log is a journal: an issuance appends its line and leaves the rest
of the CA directory alone; the file survives a crash mid-append, an earlier version's
log is carried over, and entries that leave the log leave the file."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from cryptography import x509

from pqcnet.crypto.pqc import SigningKey
from pqcnet.identity import ca as ca_mod
from pqcnet.identity import ca_log
from pqcnet.identity.ca import CA_STATE_FILE, MeshCA
from pqcnet.identity.ca_log import CA_ISSUED_FILE, issued_line
from pqcnet.identity.certs import utcnow
from pqcnet.identity.csr import build_csr
from pqcnet.identity.errors import IdentityError

TD = "example.org"


def _lines(d: Path) -> list[dict[str, str]]:
    """The journal as JSON objects, read without pqcnet's reader."""
    return [json.loads(line) for line in (d / CA_ISSUED_FILE).read_text().splitlines()]


def _live(d: Path) -> list[int]:
    """The serials the journal leaves live, in order: entries, less their tombstones."""
    live: dict[int, None] = {}
    for line in _lines(d):
        if "forget" in line:
            live.pop(int(line["forget"], 16), None)
        else:
            live[int(line["serial"], 16)] = None
    return list(live)


def _issue(ca: MeshCA, i: int) -> int:
    return ca.issue(f"spiffe://{TD}/acme/relayer/n{i}", dt.timedelta(hours=1)).serial


def test_an_issuance_appends_one_line_and_rewrites_nothing(tmp_path: Path) -> None:
    """Before, every issuance rewrote ca-state.json whole (the issued log inside it)."""
    ca = MeshCA.create(TD)
    for i in range(50):
        _issue(ca, i)
    ca.save(tmp_path, None)
    before = (tmp_path / CA_ISSUED_FILE).read_bytes()
    state = (tmp_path / CA_STATE_FILE).stat()
    # as the CA service signs (``issue`` also mints a CRL: a state change of its own)
    csr = build_csr(SigningKey.generate(), f"spiffe://{TD}/acme/relayer/n50")
    serial = x509.load_pem_x509_certificate(ca.sign_csr(csr)).serial_number
    ca.save_state(tmp_path)
    after = (tmp_path / CA_ISSUED_FILE).read_bytes()
    assert after.startswith(before)
    assert after[len(before):].decode() == issued_line(ca.issued[serial]) + "\n"
    again = (tmp_path / CA_STATE_FILE).stat()
    assert (again.st_ino, again.st_mtime_ns) == (state.st_ino, state.st_mtime_ns)
    assert json.loads((tmp_path / CA_STATE_FILE).read_text()).keys() >= {"revocations"}
    assert "issued" not in json.loads((tmp_path / CA_STATE_FILE).read_text())
    assert _live(tmp_path) == list(ca.issued)
    assert MeshCA.load(tmp_path, None).issued == ca.issued
    assert (tmp_path / CA_ISSUED_FILE).stat().st_mode & 0o777 == 0o600


def test_a_line_torn_by_a_crash_is_dropped_and_the_file_repaired(tmp_path: Path) -> None:
    """A CA killed mid-append leaves a partial last line (its certificate was never
    answered: the service persists before it answers). Loading skips it, and the next
    save rewrites the file instead of appending after the fragment."""
    ca = MeshCA.create(TD)
    for i in range(3):
        _issue(ca, i)
    ca.save(tmp_path, None)
    with (tmp_path / CA_ISSUED_FILE).open("ab") as fh:
        fh.write(b'{"serial": "abc", "spiffe_id": "spiffe://exa')
    back = MeshCA.load(tmp_path, None)
    assert back.issued == ca.issued
    serial = _issue(back, 3)
    back.save_state(tmp_path)
    assert [int(d["serial"], 16) for d in _lines(tmp_path)] == [*ca.issued, serial]
    assert MeshCA.load(tmp_path, None).issued == back.issued


def test_a_corrupt_line_in_the_middle_is_a_clear_error(tmp_path: Path) -> None:
    ca = MeshCA.create(TD)
    for i in range(3):
        _issue(ca, i)
    ca.save(tmp_path, None)
    lines = (tmp_path / CA_ISSUED_FILE).read_text().splitlines()
    lines[1] = '{"serial": 12'
    (tmp_path / CA_ISSUED_FILE).write_text("\n".join(lines) + "\n")
    with pytest.raises(IdentityError, match=r"corrupt CA issued log .* line 2"):
        MeshCA.load(tmp_path, None)


def test_an_earlier_versions_log_inside_the_state_file_is_carried_over(
        tmp_path: Path) -> None:
    ca = MeshCA.create(TD)
    for i in range(4):
        _issue(ca, i)
    ca.save(tmp_path, None)
    # the layout of earlier versions: the issued log inside the state file, no journal
    state = json.loads((tmp_path / CA_STATE_FILE).read_text())
    state["issued"] = [json.loads(issued_line(r)) for r in ca.issued.values()]
    (tmp_path / CA_STATE_FILE).write_text(json.dumps(state, indent=1))
    (tmp_path / CA_ISSUED_FILE).unlink()
    back = MeshCA.load(tmp_path, None)
    assert back.issued == ca.issued
    serial = _issue(back, 4)
    back.save_state(tmp_path)
    assert "issued" not in json.loads((tmp_path / CA_STATE_FILE).read_text())
    assert [int(d["serial"], 16) for d in _lines(tmp_path)] == [*ca.issued, serial]
    assert MeshCA.load(tmp_path, None).issued == back.issued


def test_entries_that_leave_the_log_leave_the_file(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Pruned at the bound (expired first, then the oldest) and forgotten entries get a
    tombstone appended (the file is still only extended); one forgotten before it was
    saved never reaches it."""
    monkeypatch.setattr(ca_mod, "MAX_ISSUED_LOG", 5)
    ca = MeshCA.create(TD)
    now = utcnow()
    expired = ca.issue(f"spiffe://{TD}/acme/relayer/old", dt.timedelta(minutes=1),
                       now=now - dt.timedelta(hours=1)).serial
    kept = [_issue(ca, i) for i in range(4)]
    ca.save(tmp_path, None)
    before = (tmp_path / CA_ISSUED_FILE).read_bytes()
    newest = _issue(ca, 4)  # at the bound: the expired entry goes
    ca.save_state(tmp_path)
    assert expired not in ca.issued
    assert _live(tmp_path) == [*kept, newest]
    lost = _issue(ca, 5)  # no expired entry left: the oldest goes
    ca.forget(lost)  # signed, never handed out, not saved yet
    ca.forget(kept[1])  # saved already
    ca.save_state(tmp_path)
    assert kept[0] not in ca.issued and kept[1] not in ca.issued
    assert _live(tmp_path) == [*kept[2:], newest]
    assert (tmp_path / CA_ISSUED_FILE).read_bytes().startswith(before)
    assert all(format(lost, "x") not in line.get("serial", line.get("forget", ""))
               for line in _lines(tmp_path))
    assert MeshCA.load(tmp_path, None).issued == ca.issued


def test_a_journal_of_mostly_tombstones_is_compacted(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The file is rewritten once it holds more than twice the live entries plus the
    slack — not on every drop (before the tombstones, each drop at the bound rewrote the
    whole log: ~300 ms per issuance at 100,000 entries)."""
    monkeypatch.setattr(ca_log, "SLACK_LINES", 4)
    ca = MeshCA.create(TD)
    serials = [_issue(ca, i) for i in range(6)]
    ca.save(tmp_path, None)
    sizes = []
    for s in serials[:5]:
        ca.forget(s)
        ca.save_state(tmp_path)
        sizes.append(len(_lines(tmp_path)))
    # 6 entries + a tombstone per drop while lines <= 2 x live + 4 (7 <= 14, 8 <= 12,
    # 9 <= 10); the fourth would make 10 > 8: rewritten to the 2 live; then appended
    assert sizes == [7, 8, 9, 2, 3], sizes
    assert _live(tmp_path) == [serials[5]]
    assert MeshCA.load(tmp_path, None).issued == ca.issued
