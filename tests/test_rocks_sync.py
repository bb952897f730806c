"""Synced RocksDB writes (``sync=True`` stores: the CA's ledger, the relayer's embedded
bus, overflow and sequence stores, the DTN bundle store) go through
:mod:`pqcnet._util.rocks`: written unsynced, then ``flush_wal(True)``.

Two things must hold. The durability is unchanged: every synced write fsyncs the WAL
before it returns — counted from outside with ``strace`` on a child process, by file
name. And the rest of the process runs during that fsync: rocksdict's ``sync`` write
kept the GIL through it: below, a thread writing in a loop stalled the ticking main
thread for 1.06-1.09 s of 2 s with it, 0.003-0.010 s now; the check allows 0.5 s."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pqcnet.qsdag.store import Batch, Store

WRITES = 40

_CHILD = f"""
import asyncio, sys
from pqcnet.qsdag.store import Batch, Store
from pqcnet.relayer.bus.embedded import EmbeddedBus
sync = sys.argv[2] == "sync"
store = Store(sys.argv[1] + "/ledger", sync=sync)
print("ready", flush=True)
sys.stdin.readline()                       # strace is attached from here on
for i in range({WRITES}):
    b = Batch()
    b.put("meta", b"k%d" % i, b"v" * 100)
    store.commit(b)
store.close()
bus = EmbeddedBus(sys.argv[1] + "/bus", shards=2, sync=sync)
async def main():
    for i in range({WRITES}):
        await bus.publish(i % 2, [b"frame %d" % i])
    await bus.close()
asyncio.run(main())
print("done", flush=True)
"""


def _wal_syncs(tmp_path: Path, mode: str) -> dict[str, int]:
    """fsync/fdatasync calls on each database's WAL (``*.log``) while the child writes
    ``WRITES`` times to a ledger store and ``WRITES`` times to an embedded bus."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.fail("strace is not installed (scripts/services install puts it there)")
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path), mode],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    trace = tmp_path / f"strace-{mode}.txt"
    tracer = subprocess.Popen([strace, "-f", "-y", "-e", "trace=fsync,fdatasync", "-o",
                               str(trace), "-p", str(child.pid)], stderr=subprocess.PIPE)
    try:
        time.sleep(1.0)  # attached (strace prints nothing to wait on reliably)
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "done"
        assert child.wait(60) == 0
    finally:
        if child.poll() is None:
            child.kill()
        tracer.wait(30)
    counts = {"ledger": 0, "bus": 0}
    for line in trace.read_text().splitlines():
        m = re.search(r"(fsync|fdatasync)\(\d+<([^>]*)>", line)
        if m and m.group(2).endswith(".log"):
            for name in counts:
                if f"/{name}/" in m.group(2):
                    counts[name] += 1
    return counts


@pytest.mark.timeout(120)
def test_every_synced_write_fsyncs_the_wal_and_unsynced_ones_do_not(tmp_path: Path) -> None:
    synced = _wal_syncs(tmp_path / "s", "sync")
    assert synced["ledger"] >= WRITES and synced["bus"] >= WRITES, synced
    unsynced = _wal_syncs(tmp_path / "u", "nosync")  # closing the database syncs once or so
    assert all(n <= 3 for n in unsynced.values()), unsynced


@pytest.mark.timeout(60)
def test_a_thread_writing_synced_does_not_stall_the_others(tmp_path: Path) -> None:
    store = Store(tmp_path / "ledger", sync=True)
    stop = threading.Event()
    writes = [0]

    def writer() -> None:
        i = 0
        while not stop.is_set():
            b = Batch()
            b.put("meta", b"k%d" % i, b"v" * 300)
            store.commit(b)
            i += 1
        writes[0] = i

    old = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    thread = threading.Thread(target=writer)
    try:
        thread.start()
        stalled, last = 0.0, time.perf_counter()
        end = last + 2.0
        while last < end:
            now = time.perf_counter()
            if now - last > 1e-4:
                stalled += now - last
            last = now
    finally:
        stop.set()
        thread.join(30)
        sys.setswitchinterval(old)
        store.close()
    assert writes[0] > 20, "the writer hardly wrote: nothing was measured"
    assert stalled < 0.5, f"main thread stalled {stalled:.2f} s of 2 s beside synced writes"
