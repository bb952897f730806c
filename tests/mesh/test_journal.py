"""The id journal the slashing pipeline remembers its actions in, across a crash."""

from __future__ import annotations

from pathlib import Path

from pqcnet.mesh.journal import IdJournal


def test_an_id_recorded_after_a_torn_line_is_remembered_at_the_next_start(
        tmp_path: Path) -> None:
    """A crash mid-append leaves the file ending inside a line. Before, the next id was
    appended right after the fragment — one line holding both, a wrong id on disk — so
    after the following restart the journal did not know the new id and its action
    (a slash) was made again. Now the fragment is dropped and the file rewritten."""
    path = tmp_path / "journal"
    first = IdJournal(path)
    first.add(b"\x01" * 16)
    with path.open("a", encoding="ascii") as fh:
        fh.write("0202")  # the crash: half of the next id's line
    after_crash = IdJournal(path)
    assert list(after_crash._ids) == [b"\x01" * 16]
    after_crash.add(b"\x03" * 16)
    assert path.read_text() == (b"\x01" * 16).hex() + "\n" + (b"\x03" * 16).hex() + "\n"
    again = IdJournal(path)
    assert b"\x03" * 16 in again and b"\x01" * 16 in again and len(again) == 2
    again.add(b"\x04" * 16)  # an intact file is appended to, not rewritten
    assert path.read_text().endswith((b"\x03" * 16).hex() + "\n" + (b"\x04" * 16).hex() + "\n")
    assert len(IdJournal(path)) == 3
