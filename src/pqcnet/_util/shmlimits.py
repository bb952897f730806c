"""Token buckets in shared memory, for the worker processes of one host (``--workers N``).

With N workers on one port (SO_REUSEPORT), a client's token bucket must stay *one*
bucket, or a client spreading its tunnels over the workers would get N times its plan.
The state lives in **shared memory** (an anonymous ``memfd`` of the supervisor that
every worker maps; a file in ``/dev/shm`` where there is no memfd) guarded by one
lock, :class:`SegmentLock` (a robust mutex: a worker's death releases it) — not in
Redis: a take is a lock, a few struct reads/writes and an unlock (≈ 2 µs), where a
Redis round trip per request would cost more than the request's CPU budget and add a
network dependency.
Workers are processes on one host; several hosts remain independent (each host its own
limits). Users: the sentry's rate limiter and concurrency gate with its per-tenant caps
(:mod:`pqcnet.sentry.shared`) and the relayer's per-customer quotas
(:mod:`pqcnet.relayer.authz`).

Layout (little-endian)::

    header   magic u64 ‖ slots u32 ‖ workers u32 ‖ held slots u32 ‖ spare u32, to 64
    lock     64 bytes: a process-shared robust pthread mutex (:class:`SegmentLock`)
    gate     workers x i64   in-flight per worker (a dead worker's count is zeroed by
                             the supervisor, so a crash cannot leak gate capacity)
    table    slots x (fingerprint u64 ‖ tokens f64 ‖ last f64 ‖ spare u64)
    held     held slots x (fingerprint u64 ‖ workers x i32)   in-flight per key
                             (a tenant) per worker, zeroed with the worker's gate count

A bucket is found by an 8-byte BLAKE2b :func:`fingerprint` in an open-addressed table
probed :data:`PROBE` slots deep; a full window evicts its least recently used bucket,
which comes back full — the same forgetting as a single-process limiter's LRU bound.
A held row is found the same way, but is never evicted while it counts anything (that
would free slots still held): a row whose counts are all zero is free for another key,
and a window of :data:`PROBE` rows all in use refuses the take (as a full gate would).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import mmap
import os
import struct
import tempfile
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

from pqcnet.errors import PqcnetError


class SharedStateError(PqcnetError):
    """The shared segment cannot be created or attached (bad size, not ours)."""


class Rate(Protocol):
    """What a bucket needs: a sustained rate and a capacity."""

    @property
    def rate(self) -> float: ...

    @property
    def burst(self) -> float: ...


#: buckets in a segment by default (clients x 2: subject and tenant-wide buckets)
DEFAULT_SLOTS = 200_000
#: held rows by default: keys (tenants) with something in flight at once
DEFAULT_HELD_SLOTS = 4096
MAGIC = 0x70716353_4C494D33  # "pqcSLIM3"
#: Slots probed per lookup before the least recently used one is evicted.
PROBE = 16
#: Most worker processes one sentry may run.
MAX_WORKERS = 64
_HEAD = struct.Struct("<QIIII")
#: where the mutex lives (a cache line of its own) and the room it has: a
#: ``pthread_mutex_t`` is 40 bytes on x86-64 and 48 on arm64
_MUTEX_AT, _MUTEX_ROOM = 64, 64
_DATA_AT = _MUTEX_AT + _MUTEX_ROOM
_I64 = struct.Struct("<q")
_I32 = struct.Struct("<i")
_U64 = struct.Struct("<Q")
_SLOT = struct.Struct("<QddQ")


def _new_segment(prefix: str) -> tuple[int, str, bool]:
    """A fresh segment: ``(fd, path workers open, named)``. Where Linux allows, an
    anonymous ``memfd`` the workers open as ``/proc/<pid>/fd/<fd>``: nothing in
    ``/dev/shm`` outlives the processes, even when the supervisor is SIGKILLed. Else a
    0600 file with a random name (``/dev/shm`` where it exists) the owner unlinks."""
    proc_fd = f"/proc/{os.getpid()}/fd"
    if hasattr(os, "memfd_create") and os.path.isdir(proc_fd):
        with contextlib.suppress(OSError):
            fd = os.memfd_create(prefix.rstrip("-"), os.MFD_CLOEXEC)
            return fd, f"{proc_fd}/{fd}", False
    shm_dir = "/dev/shm"  # noqa: S108
    fd, path = tempfile.mkstemp(prefix=prefix, dir=shm_dir if os.path.isdir(shm_dir) else None)
    return fd, path, True


def fingerprint(*parts: str) -> int:
    """Stable 64-bit bucket key of ``parts`` (Python's ``hash`` differs per process;
    never 0: 0 marks an empty slot)."""
    d = hashlib.blake2b("\x00".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(d, "little") or 1


class _Pthread(NamedTuple):
    lock: Any
    unlock: Any
    consistent: Any
    init: Any
    attr_init: Any
    attr_setpshared: Any
    attr_setrobust: Any


def _pthread() -> _Pthread | None:
    """The C library's mutex calls (None where it has no robust mutexes)."""
    try:
        libc = ctypes.CDLL(None)
        calls = _Pthread(*(getattr(libc, f"pthread_{name}") for name in (
            "mutex_lock", "mutex_unlock", "mutex_consistent", "mutex_init",
            "mutexattr_init", "mutexattr_setpshared", "mutexattr_setrobust")))
    except (OSError, AttributeError):
        return None
    for call in calls:
        call.restype = ctypes.c_int
    for call in (calls.lock, calls.unlock, calls.consistent):
        call.argtypes = [ctypes.c_void_p]
    return calls


_PTHREAD = _pthread()


class SegmentLock:
    """The segment's lock: a process-shared **robust** ``pthread`` mutex kept in the
    segment, called through ctypes (which lets go of the GIL while it waits).

    Why not a ``multiprocessing`` lock (a POSIX semaphore): a worker killed while it
    holds a semaphore — the OOM killer, ``kill -9`` between two struct writes — leaves
    it taken for ever, and every worker and the supervisor then block on their next
    request. A robust mutex whose holder died goes to the next taker with
    ``EOWNERDEAD``, which marks it consistent and goes on; what the dead worker left
    half-written is at most some buckets' tokens and its own in-flight counts, which
    the supervisor zeroes (``reset_worker``) before it restarts the worker. Costs per
    take (lock + unlock, one process): semaphore 0.16 µs, this 0.47 µs, an ``flock(2)``
    plus a thread lock (the other lock a death releases) 1.2 µs. Threads of one
    process exclude each other too (a mutex has one owner thread). Not re-entrant."""

    __slots__ = ("_at", "_c")

    def __init__(self, address: int) -> None:
        if _PTHREAD is None:
            raise SharedStateError("shared limits need robust pthread mutexes "
                                   "(a Linux C library)")
        self._c = _PTHREAD
        self._at = ctypes.c_void_p(address)

    def initialize(self) -> None:
        """Make the mutex (once, in a fresh segment, before any process takes it)."""
        c, attr = self._c, ctypes.create_string_buffer(64)  # a mutexattr is 4-8 bytes
        steps = ((c.attr_init, attr), (c.attr_setpshared, attr, 1),
                 (c.attr_setrobust, attr, 1), (c.init, self._at, attr))
        for call, *args in steps:
            if rc := call(*args):
                raise SharedStateError(f"shared segment lock: {os.strerror(rc)}")

    def __enter__(self) -> None:
        rc = self._c.lock(self._at)
        if rc == errno.EOWNERDEAD:  # its holder died: ours now, and usable again
            self._c.consistent(self._at)
        elif rc:
            raise SharedStateError(f"shared segment lock: {os.strerror(rc)}")

    def __exit__(self, *_exc: object) -> None:
        self._c.unlock(self._at)


class SharedLimitState:
    """The shared segment (anonymous memory, mapped by every process) plus its lock.
    The supervisor :meth:`create` s it (and makes the mutex in it); each worker
    :meth:`attach` es by :attr:`path` and takes the same mutex."""

    def __init__(self, path: str, *, owner: bool) -> None:
        self.path = path
        self.owner = owner
        self._memfd: int | None = None
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), 0)
        if len(self._map) < _DATA_AT:
            self._map.close()
            raise SharedStateError(f"shared limiter segment {path!r} is not ours")
        self._mutex: Any = ctypes.c_char.from_buffer(self._map, _MUTEX_AT)  # pins the map
        self.lock = SegmentLock(ctypes.addressof(self._mutex))
        self.buf = memoryview(self._map)
        magic, self.slots, self.workers, self.held_slots, _ = _HEAD.unpack_from(self.buf, 0)
        if magic != MAGIC:
            self.close()
            raise SharedStateError(f"shared limiter segment {path!r} is not ours")
        self._gate_at = _DATA_AT
        self._table_at = self._gate_at + _I64.size * self.workers
        self._held_at = self._table_at + _SLOT.size * self.slots
        self._held_row = struct.Struct(f"<Q{self.workers}i")

    @classmethod
    def create(cls, *, workers: int, slots: int = DEFAULT_SLOTS,
               held_slots: int = DEFAULT_HELD_SLOTS,
               prefix: str = "pqcnet-limits-") -> SharedLimitState:
        """A zeroed segment for ``workers`` processes, ``slots`` buckets and
        ``held_slots`` in-flight rows."""
        if not 1 <= workers <= MAX_WORKERS:
            raise SharedStateError(f"workers must be 1..{MAX_WORKERS}, got {workers}")
        if slots < 1 or held_slots < 1:
            raise SharedStateError(f"slots and held_slots must be >= 1, got {slots}, "
                                   f"{held_slots}")
        size = (_DATA_AT + _I64.size * workers + _SLOT.size * slots
                + (8 + 4 * workers) * held_slots)
        fd, path, named = _new_segment(prefix)
        try:
            os.ftruncate(fd, size)  # zero-filled
            os.pwrite(fd, _HEAD.pack(MAGIC, slots, workers, held_slots, 0), 0)
            state = cls(path, owner=named)
            state.lock.initialize()
        except BaseException:
            os.close(fd)
            if named:
                os.unlink(path)
            raise
        if named:
            os.close(fd)
        else:
            state._memfd = fd  # workers open it through /proc/<pid>/fd while it is open
        return state

    @classmethod
    def attach(cls, path: str) -> SharedLimitState:
        """Map the supervisor's segment (in a worker)."""
        return cls(path, owner=False)

    # -- gate (caller holds the lock)

    def gate_total(self) -> int:
        buf, at = self.buf, self._gate_at
        return sum(int(_I64.unpack_from(buf, at + 8 * w)[0]) for w in range(self.workers))

    def gate_add(self, worker: int, n: int) -> None:
        at = self._gate_at + 8 * worker
        _I64.pack_into(self.buf, at, _I64.unpack_from(self.buf, at)[0] + n)

    def reset_worker(self, worker: int) -> None:
        """Forget a dead worker's in-flight counts, the gate's and every key's
        (supervisor)."""
        with self.lock:
            _I64.pack_into(self.buf, self._gate_at + 8 * worker, 0)
            col = 8 + 4 * worker
            for row in range(self.held_slots):
                _I32.pack_into(self.buf, self._held_at + self._held_row.size * row + col, 0)

    # -- in flight per key (caller holds the lock)

    def _held(self, fp: int, claim: bool) -> int:
        """Offset of ``fp``'s held row; with ``claim`` a free row (all counts zero) of
        its window is taken when it has none. -1: not found / no free row."""
        buf, row, key_of = self.buf, self._held_row, _U64.unpack_from
        base = fp % self.held_slots
        free = -1
        for i in range(PROBE):
            at: int = self._held_at + row.size * ((base + i) % self.held_slots)
            key = key_of(buf, at)[0]
            if key == fp:
                return at
            if key == 0:  # never used: nothing of fp's lies further on
                if free < 0:
                    free = at
                break
            if free < 0 and not any(row.unpack_from(buf, at)[1:]):
                free = at
        if claim and free >= 0:
            row.pack_into(buf, free, fp, *([0] * self.workers))
            return free
        return -1

    def held_total(self, fp: int) -> int:
        """What ``fp`` holds in flight over every worker."""
        at = self._held(fp, claim=False)
        return 0 if at < 0 else int(sum(self._held_row.unpack_from(self.buf, at)[1:]))

    def held_take(self, fp: int, worker: int, cap: int) -> int:
        """One more in flight for ``fp`` on ``worker`` if it holds fewer than ``cap``
        over every worker. Returns what it held before (``>= cap``: nothing taken), or
        -1 (nothing taken) when every row of its window is in use."""
        at = self._held(fp, claim=True)
        if at < 0:
            return -1
        held = int(sum(self._held_row.unpack_from(self.buf, at)[1:]))
        if held < cap:
            at += 8 + 4 * worker
            _I32.pack_into(self.buf, at, _I32.unpack_from(self.buf, at)[0] + 1)
        return held

    def held_give(self, fp: int, worker: int) -> None:
        """One fewer in flight for ``fp`` on ``worker`` (never below zero: a count the
        supervisor zeroed stays zero)."""
        at = self._held(fp, claim=False)
        if at >= 0:
            at += 8 + 4 * worker
            _I32.pack_into(self.buf, at, max(0, _I32.unpack_from(self.buf, at)[0] - 1))

    # -- buckets (caller holds the lock)

    def _slot(self, fp: int, now: float, plan: Rate) -> int:
        """Offset of ``fp``'s slot, claiming (full bucket) or evicting as needed."""
        buf = self.buf
        base = fp % self.slots
        victim, oldest = -1, float("inf")
        for i in range(PROBE):
            at: int = self._table_at + _SLOT.size * ((base + i) % self.slots)
            key, _tokens, last, _spare = _SLOT.unpack_from(buf, at)
            if key == fp:
                return at
            if key == 0:
                victim = at
                break
            if last < oldest:
                victim, oldest = at, last
        _SLOT.pack_into(buf, victim, fp, plan.burst, now, 0)
        return victim

    def _refilled(self, at: int, plan: Rate, now: float) -> tuple[float, float]:
        """The slot's (tokens, last) refilled up to ``now``; a lowered plan clamps the
        tokens at once (caller holds the lock)."""
        _key, tokens, last, _spare = _SLOT.unpack_from(self.buf, at)
        if now > last:
            tokens = min(plan.burst, tokens + (now - last) * plan.rate)
            last = now
        return min(tokens, plan.burst), last

    def take(self, fp: int, plan: Rate, now: float, n: float = 1.0) -> tuple[float, float]:
        """Refill + take ``n`` atomically: (wait seconds, 0.0 = taken; tokens left)."""
        with self.lock:
            at = self._slot(fp, now, plan)
            tokens, last = self._refilled(at, plan, now)
            wait = 0.0
            if tokens >= n:
                tokens -= n
            else:
                wait = (n - tokens) / plan.rate
            _SLOT.pack_into(self.buf, at, fp, tokens, last, 0)
            return wait, tokens

    def take_all(self, buckets: Sequence[tuple[int, Rate]], now: float) -> tuple[float, float]:
        """One token from every bucket or from none, atomically (the subject bucket and
        the tenant-wide / per-tunnel buckets above it): (wait seconds, 0.0 = taken;
        tokens left in the first bucket)."""
        with self.lock:
            rows = []
            wait = 0.0
            for fp, plan in buckets:
                at = self._slot(fp, now, plan)
                tokens, last = self._refilled(at, plan, now)
                if tokens < 1.0:
                    wait = max(wait, (1.0 - tokens) / plan.rate)
                rows.append((at, fp, tokens, last))
            for at, fp, tokens, last in rows:
                _SLOT.pack_into(self.buf, at, fp, tokens - (0.0 if wait else 1.0), last, 0)
            first = rows[0][2] - (0.0 if wait else 1.0)
            return wait, first

    def take_counts(self, rows: Sequence[tuple[int, Rate, float]], now: float
                    ) -> tuple[float, int]:
        """``n`` tokens from each ``(fp, rate, n)`` bucket, all or none, atomically:
        (0.0, -1) when taken, else (seconds to wait, index of the bucket that lacked
        the most time)."""
        with self.lock:
            got = []
            wait, short = 0.0, -1
            for i, (fp, plan, n) in enumerate(rows):
                at = self._slot(fp, now, plan)
                tokens, last = self._refilled(at, plan, now)
                if tokens < n and (n - tokens) / plan.rate > wait:
                    wait, short = (n - tokens) / plan.rate, i
                got.append((at, fp, tokens, last, n))
            for at, fp, tokens, last, n in got:
                _SLOT.pack_into(self.buf, at, fp, tokens - (0.0 if wait else n), last, 0)
            return wait, short

    def level(self, fp: int, plan: Rate, now: float) -> float:
        """Tokens available (a full bucket if it is not in the table)."""
        with self.lock:
            base = fp % self.slots
            for i in range(PROBE):
                at = self._table_at + _SLOT.size * ((base + i) % self.slots)
                key, tokens, last, _spare = _SLOT.unpack_from(self.buf, at)
                if key == fp:
                    return float(min(plan.burst, tokens + max(0.0, now - last) * plan.rate))
                if key == 0:
                    break
        return plan.burst

    def close(self) -> None:
        """Unmap; the owner also removes the segment."""
        self.buf.release()
        self._mutex = None  # the last export of the map
        self._map.close()
        if self._memfd is not None:
            os.close(self._memfd)
            self._memfd = None
        if self.owner:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


__all__ = ["DEFAULT_HELD_SLOTS", "DEFAULT_SLOTS", "MAX_WORKERS", "PROBE", "Rate",
           "SegmentLock", "SharedLimitState", "SharedStateError", "fingerprint"]
