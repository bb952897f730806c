"""Streaming gRPC (server-streaming, client-streaming, bidirectional) over one QSTP stream.

The sidecar cannot tell a unary call from a streaming one: gRPC's cardinality lives in
the client's stub, and on HTTP/2 every call is a stream of length-prefixed messages
ended by trailers. So the sidecar's gRPC face forwards *every* call this way, with
``RequestHead(kind="grpc", method=STREAM)``; the older unary form (``method=""``, one
raw message each way, status in the response head) stays for direct wire clients.

Framing after the heads (gRPC-Web style: a flag byte, a u32 big-endian length)::

    client → sentry:  0x00 ‖ len ‖ message  …  END          (END = the client half-closed)
    sentry → client:  RpcResponseHead (initial metadata)
                      0x00 ‖ len ‖ message  …
                      0x80 ‖ len ‖ RpcResponseHead (grpc_code, reason, trailing metadata) END

A response that ends without the 0x80 trailer block was cut off (the client reports
UNAVAILABLE, never a clean OK). Messages are bounded by
:data:`~pqcnet.sentry.backends.MAX_GRPC_MESSAGE`; a bigger length prefix is refused
before any of it is buffered.

Flow control is end to end and bounded: each hop reads the next message only after the
previous one was handed on — the sentry calls the backend's ``read()`` only when the
QSTP ``send()`` (which waits for the sidecar's credit) returned, the sidecar ``recv()``\\ s
(returning credit) only after the local client's HTTP/2 ``write()`` completed. A fast
producer behind a slow reader therefore waits, with at most the QSTP stream window plus
the two HTTP/2 windows in flight. Cancellation travels both ways: a client cancel (or
deadline) resets the QSTP stream, and the sentry cancels the backend call; a backend
that aborts, fails or is cancelled ends in a trailer with its status. A call that
moves no message either way for ``bounds.grpc_stream_idle_timeout`` is ended by the
sentry (it holds a gate slot for its life): the backend call is cancelled and the
client gets UNAVAILABLE in a trailer (:class:`~pqcnet.sentry.errors.StreamIdle`).

:class:`FrameDecoder` is sans-IO; :func:`proxy_stream` is the sentry's side (the
sidecar's side is in :mod:`pqcnet.sentry.sidecar`).
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Iterable
from typing import Any

import grpc
import grpc.aio

from pqcnet._util.tasks import cancel_and_wait
from pqcnet.errors import PqcnetError
from pqcnet.sentry.backends import MAX_GRPC_MESSAGE, metadata_to_wire
from pqcnet.sentry.errors import RequestTooLarge, StreamIdle, WireError
from pqcnet.sentry.usage import Usage
from pqcnet.sentry.wire import ResponseHead, decode_response, encode_response
from pqcnet.sentry.writewatch import WriteWatch, until_quiet

log = logging.getLogger("pqcnet.sentry")

#: ``RequestHead.method`` of a gRPC call carried as framed messages (this module).
STREAM = "stream"
#: Flag byte of a message frame.
MESSAGE = 0x00
#: Flag byte of the trailer frame (the last frame of a response).
TRAILERS = 0x80
_PREFIX = struct.Struct(">BI")
#: What ``read()`` returns at the end of a gRPC message stream (untyped in the stubs).
EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]


def message_frame(message: bytes) -> bytes:
    """One message as a frame."""
    if len(message) > MAX_GRPC_MESSAGE:
        raise RequestTooLarge(f"gRPC message of {len(message)} bytes exceeds "
                              f"{MAX_GRPC_MESSAGE}")
    return _PREFIX.pack(MESSAGE, len(message)) + message


def trailer_frame(code: int, details: str, metadata: Iterable[tuple[str, str]] = ()) -> bytes:
    """The status frame that ends a response (``encode_response`` is itself u32-prefixed)."""
    head = ResponseHead(200, tuple(metadata), reason=details[:500], grpc_code=code)
    return bytes((TRAILERS,)) + encode_response(head)


class FrameDecoder:
    """Bytes in, ``(flag, payload)`` frames out; bounded by ``max_message``.

    ``trailers_allowed`` is False for the request direction (a client sends messages
    only). After a trailer frame nothing more may follow."""

    __slots__ = ("_buf", "_done", "_max", "_trailers")

    def __init__(self, max_message: int = MAX_GRPC_MESSAGE, *,
                 trailers_allowed: bool = True) -> None:
        self._buf = bytearray()
        self._max = max_message
        self._trailers = trailers_allowed
        self._done = False

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held (at most one message + prefix)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Add bytes; returns the frames they completed (:class:`WireError` on bad input)."""
        buf = self._buf
        buf += data
        out: list[tuple[int, bytes]] = []
        while len(buf) >= _PREFIX.size:
            flag, n = _PREFIX.unpack_from(buf)
            if self._done:
                raise WireError("data after the gRPC trailer frame")
            if flag not in (MESSAGE, TRAILERS) or (flag == TRAILERS and not self._trailers):
                raise WireError(f"unknown gRPC frame flag {flag:#04x}")
            if n > self._max:
                raise RequestTooLarge(f"gRPC message of {n} bytes exceeds {self._max}")
            if len(buf) < _PREFIX.size + n:
                break
            out.append((flag, bytes(buf[_PREFIX.size:_PREFIX.size + n])))
            del buf[:_PREFIX.size + n]
            self._done = flag == TRAILERS
        return out


def decode_trailers(payload: bytes) -> ResponseHead:
    """The status carried by a trailer frame."""
    return decode_response(payload)


# ---------------------------------------------------------------------------- sentry side


class _Activity:
    """When the call last moved something (loop time), the idle timeout that cut it
    (0: not cut), and the tenant's usage row its messages are counted into."""

    __slots__ = ("cut", "moved", "usage")

    def __init__(self, now: float, usage: Usage) -> None:
        self.moved = now
        self.cut = 0.0
        self.usage = usage


async def proxy_stream(stream: Any, call: grpc.aio.StreamStreamCall[bytes, bytes],
                       rest: bytes, watch: WriteWatch, *, idle: float = 0.0,
                       usage: Usage | None = None) -> int:
    """Relay one streaming call between a tunnel stream and a backend call until the
    backend's status is sent (or either side goes away); returns the gRPC code. Each
    write to the client is under ``watch``: a client that stops reading is cut
    (:class:`~pqcnet.sentry.errors.ClientTooSlow`) and the backend call cancelled.
    ``idle`` > 0: a call that moves no message (a byte from the client, a message from
    the backend) for that long is ended with :class:`StreamIdle`. Message bytes are
    counted into ``usage`` each way (:mod:`pqcnet.sentry.usage`)."""
    gone = asyncio.Event()  # set when the client side ended the call
    act = _Activity(asyncio.get_running_loop().time(), usage or Usage())
    up = asyncio.create_task(_client_to_backend(stream, call, rest, gone, act))
    dog = asyncio.create_task(_cut_when_idle(call, act, idle)) if idle > 0 else None
    try:
        return await _backend_to_client(stream, call, gone, watch, act)
    finally:
        if not call.done():
            call.cancel()
        await cancel_and_wait(up, dog)


async def _cut_when_idle(call: grpc.aio.StreamStreamCall[bytes, bytes], act: _Activity,
                         idle: float) -> None:
    await until_quiet(lambda: act.moved, idle)
    if call.cancel():  # the backend's read ends; _backend_to_client tells the client
        act.cut = idle


async def _client_to_backend(stream: Any, call: grpc.aio.StreamStreamCall[bytes, bytes],
                             data: bytes, gone: asyncio.Event, act: _Activity) -> None:
    dec = FrameDecoder(trailers_allowed=False)
    loop = asyncio.get_running_loop()
    try:
        while True:
            for _flag, message in dec.feed(data):
                await call.write(message)  # waits on the backend's HTTP/2 window
                act.usage.up += len(message)
            data = await stream.recv()
            act.moved = loop.time()
            if not data:
                if dec.pending:
                    raise WireError("request stream ended inside a gRPC message")
                await call.done_writing()
                # a client that cancels after its last message resets the stream only
                # now (grpc reports a cancel to the sidecar as end of input first)
                raise await stream.wait_failed()
    except (PqcnetError, OSError) as exc:
        # the client cancelled (stream reset), its tunnel died, or it sent garbage
        log.info("grpc stream: client side ended, cancelling the backend call",
                 extra={"reason": str(exc)})
        gone.set()
        call.cancel()
    except (grpc.RpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
        return  # the backend already finished the call; its status goes back as trailers


async def _backend_to_client(stream: Any, call: grpc.aio.StreamStreamCall[bytes, bytes],
                             gone: asyncio.Event, watch: WriteWatch, act: _Activity) -> int:
    loop = asyncio.get_running_loop()
    head_sent = False
    try:
        initial = await call.initial_metadata()
        await watch.send(stream, encode_response(ResponseHead(
            200, metadata_to_wire(initial or ()))))
        head_sent = True
        while True:
            message = await call.read()  # asked for only when the last send returned
            if message is EOF or not isinstance(message, bytes):
                break
            act.moved = loop.time()
            await watch.send(stream, message_frame(message))
            act.usage.down += len(message)
    except grpc.RpcError:
        pass  # the status is read below
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # we are being cancelled, not the call
    if gone.is_set():  # we cancelled the call because the client went: nobody to tell
        return int(grpc.StatusCode.CANCELLED.value[0])
    if act.cut:  # we cancelled it for idling: the client is told why, in a trailer
        idle = StreamIdle(f"grpc stream moved no message for {act.cut:g}s")
        if head_sent:  # else the caller answers with an error head
            await watch.send(stream, trailer_frame(idle.grpc_code, str(idle)), end=True)
        raise idle
    code = await call.code()
    details = await call.details() or ""
    trailing = await call.trailing_metadata()
    value = int(code.value[0])
    await watch.send(stream, trailer_frame(value, details, metadata_to_wire(trailing or ())),
                     end=True)
    return value


__all__ = ["EOF", "MESSAGE", "STREAM", "TRAILERS", "FrameDecoder", "decode_trailers",
           "message_frame", "proxy_stream", "trailer_frame"]
