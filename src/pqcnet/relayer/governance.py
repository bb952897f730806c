"""Governance gRPC service ``VolumeMetrics`` (grpcio, asyncio) and its client.

``GetVolume`` and ``WatchVolume`` read the same :class:`~pqcnet.relayer.metering.VolumeMeter`
that feeds Prometheus, so a governance pull and a scrape agree by construction;
``GetPerformanceReport`` returns the node's signed report.

Transport security, honestly: grpcio bundles BoringSSL, which cannot load ML-DSA
certificates, so this endpoint cannot use the mesh CA's post-quantum identity.
It serves either TLS with a *classical* certificate (``grpc_tls_cert``/``_key``) or
plaintext bound to loopback only, to be reached through a QSTP sidecar from other
hosts. Plaintext on a non-loopback address is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError

from pqcnet.errors import PqcnetError
from pqcnet.identity.node import NodeIdentity
from pqcnet.proto import qsdag_pb2_grpc as qsdag_grpc
from pqcnet.proto import relayer_pb2 as pb
from pqcnet.proto import relayer_pb2_grpc as pb_grpc
from pqcnet.proto.qsdag_pb2_grpc import LedgerServicer
from pqcnet.qstp import aio
from pqcnet.qstp.aio.forward import LocalForward
from pqcnet.qstp.tls import TlsPolicy
from pqcnet.relayer.errors import ConfigError, GovernanceError, ProofError
from pqcnet.relayer.metering import VolumeMeter, VolumeRecord
from pqcnet.relayer.proof import PerformanceReport, record_from_pb, record_to_pb

#: concurrent WatchVolume streams; bounds per-watcher polling work
MAX_WATCHERS = 64
#: seconds between WatchVolume change checks
WATCH_INTERVAL = 0.5
#: GetVolume records per page when the query names no page_size, and the most it may ask
DEFAULT_PAGE_SIZE = 10_000
MAX_PAGE_SIZE = 50_000
#: a page stops once its records' encoded size passes this (ids up to the frame limits
#: make a record up to ~600 bytes; gRPC clients refuse messages over 4 MiB by default)
MAX_PAGE_BYTES = 2 << 20
#: the largest response a governance client accepts (a performance report carries the
#: records of every proof in its range); the server refuses to build a bigger one
MAX_MESSAGE_BYTES = 64 << 20
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]


@dataclass(frozen=True, slots=True)
class VolumeFilter:
    """The query of GetVolume / WatchVolume as a dataclass."""

    customer: str | None = None
    channel: str | None = None
    epoch_from: int = 0
    epoch_to: int | None = None

    @classmethod
    def from_pb(cls, q: pb.VolumeQuery) -> VolumeFilter:
        return cls(q.customer if q.HasField("customer") else None,
                   q.channel if q.HasField("channel") else None, q.epoch_from,
                   q.epoch_to if q.HasField("epoch_to") else None)

    def to_pb(self) -> pb.VolumeQuery:
        q = pb.VolumeQuery(epoch_from=self.epoch_from)
        if self.customer is not None:
            q.customer = self.customer
        if self.channel is not None:
            q.channel = self.channel
        if self.epoch_to is not None:
            q.epoch_to = self.epoch_to
        return q


class VolumeMetricsService(pb_grpc.VolumeMetricsServicer):
    """Serves one node's meter and reports."""

    def __init__(self, meter: VolumeMeter,
                 report: Callable[[int, int | None], PerformanceReport]) -> None:
        self.meter = meter
        self._report = report
        self._watchers = 0

    def _changed(self, f: VolumeFilter, sealed_sent: dict[int, int]) -> list[VolumeRecord]:
        """Records of the open epochs in ``f``'s range, and of the sealed ones not sent
        yet at their current seal version (``sealed_sent`` updated)."""
        m = self.meter
        out: list[VolumeRecord] = []
        held = set()
        for e in m.epochs():
            if e < f.epoch_from or (f.epoch_to is not None and e > f.epoch_to):
                continue
            held.add(e)
            if m.sealed(e):
                if sealed_sent.get(e) == m.seal_version(e):
                    continue
                sealed_sent[e] = m.seal_version(e)
            out += [r for r in m.records(e)
                    if (f.customer is None or r.customer == f.customer)
                    and (f.channel is None or r.channel == f.channel)]
        for e in [e for e in sealed_sent if e not in held]:
            del sealed_sent[e]  # pruned
        return out

    async def GetVolume(self, request: pb.VolumeQuery,
                        context: grpc.aio.ServicerContext[pb.VolumeQuery, pb.VolumeResponse],
                        ) -> pb.VolumeResponse:
        f = VolumeFilter.from_pb(request)
        after = None
        if request.page_token:
            try:
                cur = pb.VolumeCursor.FromString(request.page_token)
            except DecodeError:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed page_token")
                raise  # abort raises; this line is for the type checker
            after = (cur.epoch, cur.customer, cur.channel, cur.qos)
        limit = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        try:  # a proven epoch's records are read from its proof file
            recs, last = self.meter.page(f.customer, f.channel, f.epoch_from, f.epoch_to,
                                         after, limit, MAX_PAGE_BYTES)
        except ProofError as exc:
            await context.abort(grpc.StatusCode.DATA_LOSS, str(exc))
            raise  # abort raises; this line is for the type checker
        token = b"" if last is None else pb.VolumeCursor(
            epoch=last[0], customer=last[1], channel=last[2], qos=last[3]).SerializeToString()
        return pb.VolumeResponse(records=[record_to_pb(r) for r in recs],
                                 total_bytes=sum(r.bytes for r in recs),
                                 total_frames=sum(r.frames for r in recs),
                                 next_page_token=token)

    async def WatchVolume(self, request: pb.VolumeQuery,
                          context: grpc.aio.ServicerContext[pb.VolumeQuery, pb.VolumeRecord],
                          ) -> AsyncIterator[pb.VolumeRecord]:
        if self._watchers >= MAX_WATCHERS:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{MAX_WATCHERS} watchers already")
        self._watchers += 1
        try:
            f = VolumeFilter.from_pb(request)
            #: what was sent of the epochs still open to change (a sealed — proven —
            #: epoch is sent once, and again whole only if a late frame changes it)
            sent: dict[tuple[str, str, int, int], tuple[int, int]] = {}
            sealed_sent: dict[int, int] = {}  # epoch -> its seal version when sent
            version = -1
            while True:
                if self.meter.version != version:
                    version = self.meter.version
                    try:
                        changed = self._changed(f, sealed_sent)
                    except ProofError as exc:
                        await context.abort(grpc.StatusCode.DATA_LOSS, str(exc))
                        raise  # abort raises; this line is for the type checker
                    for r in changed:
                        key = (r.customer, r.channel, r.qos, r.epoch)
                        if sent.get(key) != (r.bytes, r.frames):
                            sent[key] = (r.bytes, r.frames)
                            yield record_to_pb(r)
                    # a sealed epoch was compared once against what was sent while it
                    # was open; forget it: ``sent`` is bounded by the open epochs
                    for key in [k for k in sent if k[3] in sealed_sent]:
                        del sent[key]
                await asyncio.sleep(WATCH_INTERVAL)
        finally:
            self._watchers -= 1

    async def GetPerformanceReport(
        self, request: pb.ReportQuery,
        context: grpc.aio.ServicerContext[pb.ReportQuery, pb.RelayerPerformanceReport],
    ) -> pb.RelayerPerformanceReport:
        epoch_to = request.epoch_to if request.HasField("epoch_to") else None
        try:  # the proven records are read from the proof files
            report = self._report(request.epoch_from, epoch_to).to_pb()
        except ProofError as exc:
            await context.abort(grpc.StatusCode.DATA_LOSS, str(exc))
            raise  # abort raises; this line is for the type checker
        if report.ByteSize() > MAX_MESSAGE_BYTES:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"the report of epochs {request.epoch_from}..{epoch_to} is "
                                f"{report.ByteSize()} bytes (at most {MAX_MESSAGE_BYTES}): "
                                "ask for fewer epochs")
        return report


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def serve_governance(service: VolumeMetricsService, host: str, port: int, *,
                           tls: tuple[bytes, bytes] | None = None,
                           ledger: LedgerServicer | None = None,
                           ) -> tuple[grpc.aio.Server, int]:
    """Start the gRPC server (``tls`` = (key PEM, cert PEM)) with ``VolumeMetrics`` and,
    when given, the ``Ledger`` query service; returns it and the bound port."""
    server = grpc.aio.server()
    pb_grpc.add_VolumeMetricsServicer_to_server(service, server)  # type: ignore[no-untyped-call]
    if ledger is not None:
        qsdag_grpc.add_LedgerServicer_to_server(ledger, server)  # type: ignore[no-untyped-call]
    address = f"{host}:{port}"
    if tls is not None:
        creds = grpc.ssl_server_credentials([tls])
        bound = server.add_secure_port(address, creds)
    else:
        if not _is_loopback(host):
            raise ConfigError(f"grpc_host {host}: plaintext governance gRPC only on loopback; "
                              "set grpc_tls_cert/grpc_tls_key or use a QSTP sidecar")
        bound = server.add_insecure_port(address)
    if not bound:
        raise ConfigError(f"cannot bind governance gRPC on {address}")
    await server.start()
    return server, bound


# ------------------------------------------------------------------ client


@dataclass(frozen=True, slots=True)
class VolumeSummary:
    """What ``pqcnet governance pull`` prints."""

    records: tuple[VolumeRecord, ...]
    total_bytes: int
    total_frames: int


@contextlib.asynccontextmanager
async def open_channel(target: str, *, identity: NodeIdentity | None = None,
                       expect_peer: str | None = None, ca_cert: str | None = None,
                       ) -> AsyncIterator[grpc.aio.Channel]:
    """A gRPC channel to a governance / ledger endpoint ``target`` (host:port).

    With ``identity`` (the default for remote targets): ``target`` is the node's QSTP
    forward listener (:func:`pqcnet.qstp.aio.forward.serve_forward`); the tunnel is
    mutually authenticated with ML-DSA certificates and ML-KEM key exchange, and grpcio
    talks to a local forward (:class:`~pqcnet.qstp.aio.forward.LocalForward`).
    ``expect_peer``: SPIFFE ID or glob the server must present. With ``ca_cert``:
    classical TLS, an explicit opt-in. With neither: plaintext, loopback targets only.
    """
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise GovernanceError(f"target {target!r}: expected host:port")
    if identity is not None:
        policy = TlsPolicy(allowed_peers=(expect_peer,) if expect_peer else ())
        try:
            tunnel = await aio.connect(host, int(port), identity, policy)
        except PqcnetError as exc:
            raise GovernanceError(f"QSTP to {target}: {exc}") from None
        try:
            async with LocalForward(tunnel) as fwd, \
                    grpc.aio.insecure_channel(fwd.address, options=_CHANNEL_OPTIONS) as channel:
                yield channel
        finally:
            with contextlib.suppress(PqcnetError):
                await tunnel.close()
    elif ca_cert:
        pem = await asyncio.to_thread(Path(ca_cert).read_bytes)
        creds = grpc.ssl_channel_credentials(pem)
        async with grpc.aio.secure_channel(target, creds, options=_CHANNEL_OPTIONS) as channel:
            yield channel
    else:
        if not _is_loopback(host):
            raise GovernanceError(
                f"target {target}: plaintext gRPC is for loopback only; give --identity "
                "(post-quantum, through the node's QSTP governance listener) or --ca-cert "
                "(classical TLS)")
        async with grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS) as channel:
            yield channel


async def pull_volume(target: str, query: VolumeFilter, *, ca_cert: str | None = None,
                      identity: NodeIdentity | None = None, expect_peer: str | None = None,
                      deadline: float = 10.0, page_size: int = 0) -> VolumeSummary:
    """Call GetVolume page by page (``deadline`` per page; ``page_size`` 0: the server's
    default) until the last; :class:`GovernanceError` with the gRPC status on failure."""
    records: list[VolumeRecord] = []
    nbytes = frames = 0
    async with open_channel(target, identity=identity, expect_peer=expect_peer,
                            ca_cert=ca_cert) as channel:
        stub = pb_grpc.VolumeMetricsStub(channel)  # type: ignore[no-untyped-call]
        q = query.to_pb()
        q.page_size = page_size
        while True:
            try:
                resp = await stub.GetVolume(q, timeout=deadline)
            except grpc.aio.AioRpcError as exc:
                raise GovernanceError(f"GetVolume on {target}: {exc.code().name}: "
                                      f"{exc.details()}") from None
            records += (record_from_pb(r) for r in resp.records)
            nbytes += resp.total_bytes
            frames += resp.total_frames
            if not resp.next_page_token:
                break
            if resp.next_page_token == q.page_token:  # a server that does not move on
                raise GovernanceError(f"GetVolume on {target}: the same page token twice")
            q.page_token = resp.next_page_token
    return VolumeSummary(tuple(records), nbytes, frames)


async def pull_report(target: str, epoch_from: int = 0, epoch_to: int | None = None, *,
                      ca_cert: str | None = None, identity: NodeIdentity | None = None,
                      expect_peer: str | None = None,
                      deadline: float = 10.0) -> PerformanceReport:
    """Call GetPerformanceReport."""
    q = pb.ReportQuery(epoch_from=epoch_from)
    if epoch_to is not None:
        q.epoch_to = epoch_to
    async with open_channel(target, identity=identity, expect_peer=expect_peer,
                            ca_cert=ca_cert) as channel:
        stub = pb_grpc.VolumeMetricsStub(channel)  # type: ignore[no-untyped-call]
        try:
            resp = await stub.GetPerformanceReport(q, timeout=deadline)
        except grpc.aio.AioRpcError as exc:
            raise GovernanceError(f"GetPerformanceReport on {target}: {exc.code().name}: "
                                  f"{exc.details()}") from None
    return PerformanceReport.from_pb(resp)


__all__ = ["VolumeFilter", "VolumeMetricsService", "VolumeSummary", "open_channel", "pull_report",
           "pull_volume", "serve_governance"]
