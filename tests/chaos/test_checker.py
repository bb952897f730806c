"""The history checker finds each anomaly it names, and nothing on a clean history."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from pqcnet.chaos.checker import check
from pqcnet.chaos.history import HistoryWriter, payload_digest, payload_for
from pqcnet.cli import app
from pqcnet.relayer.cursor import JournalCursor
from pqcnet.relayer.frame import Frame


def _frames(seqs: list[int], ch: str = "c") -> list[Frame]:
    return [Frame("acme", ch, s, payload_for(7, "acme", ch, s, 16)) for s in seqs]


def _write(tmp: Path, acked: list[int], taken: list[Frame]) -> list[Path]:
    pub = HistoryWriter(tmp / "publisher.jsonl")
    pub.record("publish", _frames(list(range(1, 6))))
    pub.record("ack", _frames(acked))
    pub.close()
    j = JournalCursor(tmp / "subscriber.jsonl", fsync=False)
    j.commit(taken, {})
    j.close()
    return [tmp / "publisher.jsonl", tmp / "subscriber.jsonl"]


def test_clean_history_is_ok(tmp_path: Path) -> None:
    files = _write(tmp_path, [1, 2, 3, 4, 5], _frames([1, 2, 3, 4, 5]))
    r = check(files, {("acme", "c"): (5, 80)})
    assert r.ok, r.table()
    assert r.total("taken") == 5 and "OK: no anomaly" in r.table()


def test_each_anomaly_is_counted(tmp_path: Path) -> None:
    forged = Frame("acme", "c", 4, b"not what was published")
    taken = [*_frames([1, 3, 2, 3]), forged, *_frames([9])]
    files = _write(tmp_path, [1, 2, 3, 4, 5], taken)
    r = check(files, {("acme", "c"): (7, 999)})
    t = r.topics[("acme", "c")]
    assert t.duplicated == 1 and t.examples["duplicated"] == [3]
    assert t.out_of_order == 1 and t.examples["out_of_order"] == [2]
    assert t.phantom == 2 and sorted(t.examples["phantom"]) == [4, 9]  # altered, unpublished
    assert t.lost_acked == 1 and t.examples["lost_acked"] == [5]
    assert t.misbilled == 2  # 7 metered, 5 distinct frames taken
    assert not r.ok


def test_cli_check(tmp_path: Path) -> None:
    files = _write(tmp_path, [1, 2], _frames([1, 2, 2]))
    res = CliRunner().invoke(app, ["chaos", "check", "--json", *map(str, files)])
    assert res.exit_code == 1
    assert json.loads(res.output)["totals"]["duplicated"] == 1
    assert payload_digest(b"x") == payload_digest(b"x")
