"""A thread writing 300-byte batches to RocksDB in a loop, beside a main thread that only
ticks: how long the main thread is stalled, with ``WriteOptions.sync`` against an
unsynced write plus ``flush_wal(True)``. Run: ``.venv/bin/python stall.py``."""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time

from rocksdict import Options, Rdict, WriteBatch, WriteOptions

sys.setswitchinterval(0.0005)
db = Rdict(tempfile.mkdtemp(), Options(raw_mode=True))
SYNCED = WriteOptions()
SYNCED.sync = True
UNSYNCED = WriteOptions()
UNSYNCED.sync = False


def write(mode: str) -> None:
    wb = WriteBatch(raw_mode=True)
    wb.put(os.urandom(16), b"x" * 300)
    if mode == "sync_write":
        db.write(wb, SYNCED)
    else:
        db.write(wb, UNSYNCED)
        db.flush_wal(True)


def measure(mode: str) -> str:
    start = time.perf_counter()
    for _ in range(300):
        write(mode)
    alone = (time.perf_counter() - start) / 300
    stop = threading.Event()
    count = [0]

    def writer() -> None:
        while not stop.is_set():
            write(mode)
            count[0] += 1

    thread = threading.Thread(target=writer)
    thread.start()
    gaps = []
    last = time.perf_counter()
    end = last + 2
    while last < end:
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    stop.set()
    thread.join()
    stalled = sum(g for g in gaps if g > 1e-4)
    return (f"{mode}: alone {alone * 1e3:.3f} ms/write; beside the ticking thread "
            f"{count[0]} writes; longest stall {max(gaps) * 1e3:.2f} ms; stalled "
            f"{stalled:.3f} s of 2")


for m in ("sync_write", "flush_wal", "sync_write", "flush_wal"):
    print(measure(m))
