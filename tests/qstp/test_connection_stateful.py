"""A QSTP ``Connection`` pair under a hypothesis state machine (sans-IO, fake clock).

Both ends are real (TLS 1.3 over memory BIOs, ML-DSA identities); hypothesis drives
them through any interleaving of: open a stream, send, move bytes (whole or in
pieces, so records arrive split), consume (the receiver's ACKs), pause/resume, end or
reset a stream, GOAWAY, rekey, a PING, garbage on the wire or inside TLS, and time
passing (keepalives, rekey and idle timers). The model is independent of the
connection's own counters: it records what each application sent and what the other
application was handed, and checks after every step that

* nothing but a typed ``PqcnetError`` ever escapes a call;
* per stream, the data delivered is a prefix of the data sent — in order, no
  duplicates, sequence numbers counting 0, 1, 2, ..., nothing after END_STREAM;
* flow control holds: no stream or connection has more un-consumed bytes in flight
  than its window, and the send window is never negative;
* each end reports at most one ``ConnectionTerminated``; after garbage the receiver
  has ended with one (never an exception), and a closed end refuses further work
  with a typed error.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Literal

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from pqcnet.errors import PqcnetError
from pqcnet.qstp import events as ev
from pqcnet.qstp import frames as fr
from pqcnet.qstp.config import QstpConfiguration
from pqcnet.qstp.connection import Connection, ConnectionState, StreamState
from pqcnet.qstp.errors import TunnelClosed

from .test_connection import new_pair, pump

pytestmark = pytest.mark.timeout(120)

Side = Literal["c", "s"]
SIDES: tuple[Side, Side] = ("c", "s")
PEER: dict[Side, Side] = {"c": "s", "s": "c"}
#: Stream windows at their minimum so a few sends exhaust credit.
STREAM_WINDOW = 64 * 1024
CONN_WINDOW = 128 * 1024
#: What the applications send (a stream's bytes are a slice of it at its own offset).
PATTERN = random.Random(7).randbytes(2 * 1024 * 1024)
#: Send sizes: edge cases (a full frame, one past it, a whole stream window) and any.
SIZES = st.one_of(st.sampled_from([0, 1, 8 * 1024, 8 * 1024 + 1, STREAM_WINDOW]),
                  st.integers(0, 20_000))
#: Steps before the rules that end a run's interesting part may fire (garbage ends the
#: connection; GOAWAY, from half of it, stops new streams).
CALM_STEPS = 20
#: TLS record content types are 20..24; a first byte outside them is never a record.
NOT_A_RECORD = st.integers(0, 255).filter(lambda b: not 20 <= b <= 24)


def config(key_update: bool) -> QstpConfiguration:
    return QstpConfiguration(
        stream_window=STREAM_WINDOW, connection_window=CONN_WINDOW, max_streams=4,
        max_data_chunk=8 * 1024, idle_timeout=60.0, rekey_interval=25.0,  # see time_passes
        rekey_after_bytes=96 * 1024, tls_key_update=key_update)


class ConnectionPair(RuleBasedStateMachine):
    """Client ``c`` and server ``s`` plus the model of what their applications did."""

    def __init__(self) -> None:
        super().__init__()
        self.conns: dict[Side, Connection] = {}
        self.now = 0.0
        self.wire: dict[Side, bytearray] = {"c": bytearray(), "s": bytearray()}  # from side
        self.sent: dict[tuple[Side, int], bytearray] = defaultdict(bytearray)
        self.got: dict[tuple[Side, int], bytearray] = defaultdict(bytearray)
        self.next_seq: dict[tuple[Side, int], int] = defaultdict(int)
        self.ended: set[tuple[Side, int]] = set()  # END_STREAM received
        self.consumed: dict[tuple[Side, int], int] = defaultdict(int)
        self.opened: dict[Side, list[int]] = {"c": [], "s": []}  # streams each side knows
        self.terminated: dict[Side, ev.ConnectionTerminated | None] = {"c": None, "s": None}
        self.garbled: Side | None = None  # the side that just got garbage
        self.steps = 0

    # ------------------------------------------------------------------ setup

    @initialize(key_update=st.booleans(),
                warm=st.lists(st.tuples(st.sampled_from(SIDES), SIZES),
                              min_size=1, max_size=4))
    def handshake(self, key_update: bool, warm: list[tuple[Side, int]]) -> None:
        """A fresh pair, with a few streams already carrying data in flight (so the
        rules start from traffic, not from an idle tunnel)."""
        c, s = new_pair(config(key_update))
        c.start(0.0)
        s.start(0.0)
        pump(c, s)
        self.conns = {"c": c, "s": s}
        for side in SIDES:
            self._absorb(side)
        assert all(conn.state is ConnectionState.OPEN for conn in self.conns.values())
        for side, size in warm:
            self.send(side, 0, True, size, False, False, False)

    # ------------------------------------------------------------------ helpers

    def _absorb(self, side: Side) -> None:
        """Take every event ``side`` produced into the model, checking each one."""
        conn = self.conns[side]
        peer = PEER[side]
        while (e := conn.next_event()) is not None:
            if isinstance(e, ev.DataReceived):
                key = (side, e.stream_id)
                assert key not in self.ended, f"data after END_STREAM on {key}"
                assert e.seq == self.next_seq[key], (key, e.seq, self.next_seq[key])
                self.next_seq[key] += 1
                self.got[key] += e.data
                event("data delivered", f"{len(self.got[key]) // 16384 * 16} KiB+")
                sent = self.sent[(peer, e.stream_id)]
                assert self.got[key] == sent[: len(self.got[key])], f"not a prefix on {key}"
                if e.end_stream:
                    self.ended.add(key)
            elif isinstance(e, ev.StreamOpened):
                assert (e.stream_id % 2 == 1) == (side == "s"), "peer used our id parity"
                if e.stream_id not in self.opened[side]:
                    self.opened[side].append(e.stream_id)
            elif isinstance(e, ev.ConnectionTerminated):
                assert self.terminated[side] is None, f"{side} terminated twice"
                event("terminated", f"code {e.error_code}")
                self.terminated[side] = e

    def _call(self, side: Side, fn_name: str, *args: object) -> bool:
        """Call a Connection method; a typed error is allowed, anything else fails."""
        try:
            getattr(self.conns[side], fn_name)(*args)
        except PqcnetError as exc:
            event("typed error", type(exc).__name__)
            return False
        finally:
            self._absorb(side)
        return True

    def _transmit(self, side: Side) -> None:
        self.wire[side] += self.conns[side].data_to_send()
        self._absorb(side)

    def _deliver(self, side: Side, n: int | None = None) -> None:
        """Hand ``n`` (default: all) bytes on the wire from ``side`` to its peer."""
        self._transmit(side)
        wire = self.wire[side]
        n = len(wire) if n is None else min(n, len(wire))
        chunk, self.wire[side] = bytes(wire[:n]), wire[n:]
        if chunk:
            self.conns[PEER[side]].receive_data(chunk, self.now)
            self._absorb(PEER[side])

    def _streams(self, side: Side) -> list[int]:
        return self.opened[side]

    # ------------------------------------------------------------------ rules
    # Few rules, so the ones that move data (send, deliver, consume) are drawn often.

    def _open(self, side: Side) -> None:
        try:
            sid = self.conns[side].open_stream()
        except PqcnetError:
            return
        self.opened[side].append(sid)

    @rule(side=st.sampled_from(SIDES), pick=st.integers(0, 7), new=st.booleans(),
          size=SIZES, end=st.booleans(),
          overshoot=st.booleans(), flush=st.booleans())
    def send(self, side: Side, pick: int, new: bool, size: int, end: bool,
             overshoot: bool, flush: bool) -> None:
        """Open a stream (``new``) or pick one, and send on it; ``overshoot`` ignores
        the send window (a typed error is then expected); ``flush`` delivers at once."""
        if new or not self._streams(side):
            self._open(side)
        streams = self._streams(side)
        if not streams:
            return
        sid = streams[-1] if new else streams[pick % len(streams)]
        conn = self.conns[side]
        # bytes that differ by position and stream: a duplicate or reordered piece
        # cannot look like the right one
        start = len(self.sent[(side, sid)]) + sid * 4099
        data = PATTERN[start : start + size]
        if not overshoot:
            data = data[: conn.send_window(sid)]
        was_open = not conn.closed
        try:
            conn.send_data(sid, data, end_stream=end)
        except PqcnetError as exc:
            event("typed error", type(exc).__name__)
            if was_open and conn.closed:  # closed mid-write (keys overdue): a prefix
                self.sent[(side, sid)] += data  # of data may have gone out
        else:
            self.sent[(side, sid)] += data
        finally:
            self._absorb(side)
        if flush:
            self._deliver(side)

    @rule(side=st.sampled_from(SIDES), n=st.one_of(st.none(), st.integers(1, 40_000)),
          both=st.booleans())
    def deliver(self, side: Side, n: int | None, both: bool) -> None:
        """Move ``n`` bytes (all when None) from ``side`` to its peer: records may split;
        with ``both``, then everything the peer has back (its ACKs, answers)."""
        self._deliver(side, n)
        if both:
            self._deliver(PEER[side])

    @rule(side=st.sampled_from(SIDES), pick=st.integers(0, 7), fraction=st.floats(0.0, 1.0))
    def consume(self, side: Side, pick: int, fraction: float) -> None:
        """The application reads part of what a stream received (credit goes back)."""
        keys = [k for k in self.got if k[0] == side and len(self.got[k]) > self.consumed[k]]
        if not keys:
            return
        key = keys[pick % len(keys)]
        n = max(1, int((len(self.got[key]) - self.consumed[key]) * fraction))
        self.consumed[key] += n
        self._call(side, "consumed", key[1], n)

    @rule(side=st.sampled_from(SIDES), op=st.sampled_from(["pause", "resume", "ping", "rekey"]),
          pick=st.integers(0, 8), retry=st.floats(0.0, 5.0))
    def control(self, side: Side, op: str, pick: int, retry: float) -> None:
        """PAUSE / RESUME (a stream, or 0: all), PING, or a rekey (KeyUpdate or fallback)."""
        streams = [0, *self._streams(side)]
        sid = streams[pick % len(streams)]
        if op == "pause":
            self._call(side, "pause", sid, 1, retry)
        elif op == "resume":
            self._call(side, "resume", sid, 1)
        else:
            self._call(side, op, self.now)

    @rule(side=st.sampled_from(SIDES), pick=st.integers(0, 7), reset=st.booleans())
    def close_stream(self, side: Side, pick: int, reset: bool) -> None:
        """END_STREAM, or reset the stream (ERROR frame on it)."""
        streams = self._streams(side)
        if not streams:
            return
        sid = streams[pick % len(streams)]
        self._call(side, "reset_stream" if reset else "end_stream", sid)

    @rule(dt=st.one_of(st.floats(0.0, 3.0), st.sampled_from([13.0, 26.0, 31.0])))
    def time_passes(self, dt: float) -> None:
        """The clock moves; due timers fire (keepalive PING, rekey, idle close)."""
        self.now += dt
        for side in SIDES:
            timer = self.conns[side].get_timer()
            if timer is not None and timer <= self.now:
                self.conns[side].handle_timer(self.now)
                self._absorb(side)

    @precondition(lambda self: self.steps >= CALM_STEPS // 2)
    @rule(side=st.sampled_from(SIDES))
    def goaway(self, side: Side) -> None:
        """No new streams from the peer from now on (late in a run: it stops openings)."""
        self._call(side, "goaway")

    @precondition(lambda self: self.steps >= CALM_STEPS)
    @rule(side=st.sampled_from(SIDES), inside_tls=st.booleans(), first=NOT_A_RECORD,
          rest=st.binary(min_size=fr.HEADER_SIZE, max_size=64))
    def garbage(self, side: Side, inside_tls: bool, first: int, rest: bytes) -> None:
        """Garbage into ``side`` at a boundary (everything before it arrives whole):
        bytes that are not a TLS record, or — from a peer whose TLS is fine — a frame
        with a wrong version. Late in a run: it ends the connection."""
        sender = self.conns[PEER[side]]
        self._deliver(PEER[side])
        if self.conns[side].closed or (inside_tls and sender.closed):
            return
        if inside_tls:
            sender.tls.sendall(bytes([first if first != fr.VERSION else 0]) + rest)
            self._deliver(PEER[side])
        else:
            self.conns[side].receive_data(bytes([first]) + rest, self.now)
            self._absorb(side)
        self.garbled = side

    # ------------------------------------------------------------------ invariants

    @invariant()
    def count_steps(self) -> None:  # runs after every step: the clock of the preconditions
        self.steps += 1

    @invariant()
    def garbage_ends_the_receiver_with_an_event(self) -> None:
        if self.garbled is not None:
            side, self.garbled = self.garbled, None
            term = self.terminated[side]
            assert self.conns[side].closed and term is not None
            assert not term.by_peer  # our side decided the bytes were bad
            with pytest.raises(TunnelClosed):
                self.conns[side].open_stream()

    @invariant()
    def flow_control_holds(self) -> None:
        if not self.conns:
            return
        for side in SIDES:
            conn = self.conns[side]
            in_flight_total = 0
            for sid in self._streams(side):
                assert conn.send_window(sid) >= 0
                sent = len(self.sent[(side, sid)])
                consumed = self.consumed[(PEER[side], sid)]
                assert sent - consumed <= STREAM_WINDOW, (side, sid, sent, consumed)
                in_flight_total += sent - consumed
            # data the peer dropped (a stream it refused at max_streams, like h2's
            # REFUSED_STREAM) is credited back without being consumed
            in_flight_total -= self.conns[PEER[side]].dropped_data_bytes
            assert in_flight_total <= CONN_WINDOW

    @invariant()
    def stream_states_match_the_model(self) -> None:
        for side in SIDES:
            if not self.conns or self.conns[side].closed:
                continue
            for sid in self._streams(side):
                if (side, sid) in self.ended:
                    assert self.conns[side].stream_state(sid) in (
                        None, StreamState.HALF_CLOSED_REMOTE, StreamState.CLOSED)


TestConnectionPair = ConnectionPair.TestCase
TestConnectionPair.settings = settings(
    max_examples=60, stateful_step_count=CALM_STEPS + 15, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
