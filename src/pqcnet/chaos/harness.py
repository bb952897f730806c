"""The fault harness: real processes, a seeded fault schedule, then the checker.

``run_chaos`` starts (as subprocesses) one relayer (``pqcnet relayer run``) — or a
cluster of ``relayers`` on one Redis or Kafka bus (Redis shard leases; a Kafka group
with its marks in the private Redis) —, a private ``redis-server`` on its own port for
the Redis backend and for a Kafka cluster (so broker faults never touch a shared
instance), publisher and subscriber clients (``pqcnet chaos publisher`` /
``subscriber``: the publishers fail over along the relayers, the subscriber listens to
all of them), then applies faults at seeded times while they run:

=================  ==============================================================
``kill-relayer``   SIGKILL (a random relayer of a cluster: its shards move to the
                   others), restart on the same ports (process start included)
``pause-relayer``  SIGSTOP for a while, then SIGCONT
``kill-subscriber`` / ``kill-publisher``  SIGKILL, restart (resumes from its files)
``pause-subscriber`` / ``pause-publisher``  SIGSTOP / SIGCONT
``restart-broker`` private redis-server: SIGKILL, restart on the same port and AOF
``add-relayer``    a cluster: start a relayer that is not running (the spare every
                   cluster run has, or one removed before); it takes shards over
``remove-relayer`` a cluster: stop a running relayer for good (SIGTERM: it hands its
                   shards over and leaves; at least one keeps running)
=================  ==============================================================

A cluster run configures one relayer more than ``relayers``, a spare that starts down;
the clients know all of them (a publisher fails over past one that is down, the
subscriber keeps reconnecting to it). Relayers that are down at the end are started
again only to read their metering, which lives in their data directories.

Recovery time of a fault = from the moment the fault ended (restart / SIGCONT issued)
until the application takes its next frame. After the schedule, the clients finish,
the subscriber drains, metering is pulled over the governance gRPC service, and
:func:`pqcnet.chaos.checker.check` reads the histories.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import random
import shutil
import signal
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pqcnet._util.orphans import ending_with_us
from pqcnet.chaos.checker import Report, check
from pqcnet.errors import PqcnetError
from pqcnet.identity import dev_identities
from pqcnet.relayer.frame import Topic

#: faults the schedule draws from, per backend
FAULTS = ("kill-relayer", "pause-relayer", "kill-subscriber", "pause-subscriber",
          "kill-publisher", "pause-publisher")
BROKER_FAULTS = {"redis": ("restart-broker",), "kafka": (), "embedded": ()}
#: faults only a cluster has (membership changes)
CLUSTER_FAULTS = ("add-relayer", "remove-relayer")
#: seconds a process may take to print its ready line
START_LIMIT = 60.0
#: seconds the subscriber may take to drain after the publishers finished
DRAIN_LIMIT = 90.0


class ChaosError(PqcnetError):
    """The harness could not run (a process did not start, a client failed)."""


@dataclass
class ChaosConfig:
    """One chaos run."""

    backend: str = "embedded"
    workdir: Path = Path("chaos-run")
    seed: int = 1
    #: seconds the fault schedule lasts (publishers are paced to outlast it)
    duration: float = 20.0
    #: faults in the schedule (0: a fault-free run)
    faults: int = 4
    #: which faults (default: all that apply to the backend)
    kinds: tuple[str, ...] = ()
    #: an explicit fault sequence (overrides ``faults``/``kinds``; times still seeded)
    schedule: tuple[str, ...] = ()
    publishers: int = 2
    channels: int = 4
    #: frames per second per publisher (paced); count = rate x duration
    rate: float = 100.0
    size: int = 64
    kafka_bootstrap: str = ""
    gap_timeout: float = 5.0
    #: relayer processes (more than one: a cluster; Redis or Kafka only)
    relayers: int = 1
    #: a Redis cluster's shard lease, seconds (how soon a killed relayer's shards move)
    lease: float = 2.0


@dataclass
class FaultRecord:
    """One applied fault and its measured recovery."""

    kind: str
    at: float
    recovery: float | None = None
    #: the process it hit (``relayer-2``, ``publisher-0``, …)
    victim: str = ""


@dataclass
class ChaosResult:
    """What a run produced."""

    config: ChaosConfig
    report: Report
    seconds: float
    frames: int
    faults: list[FaultRecord] = field(default_factory=list)

    @property
    def frames_per_s(self) -> float:
        """Frames the application took per second of the run."""
        return self.frames / self.seconds if self.seconds else 0.0

    def recovery(self, q: float) -> float | None:
        """Recovery time quantile over faults (seconds)."""
        xs = sorted(f.recovery for f in self.faults if f.recovery is not None)
        if not xs:
            return None
        if len(xs) == 1:
            return xs[0]
        return statistics.quantiles(xs, n=100, method="inclusive")[int(q * 100) - 1]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        p50, p99 = self.recovery(0.5), self.recovery(0.99)
        return {"backend": self.config.backend, "relayers": self.config.relayers,
                "seed": self.config.seed,
                "seconds": round(self.seconds, 2), "frames": self.frames,
                "frames_per_s": round(self.frames_per_s, 1),
                "faults": [{"kind": f.kind, "at": round(f.at, 2), "victim": f.victim,
                            "recovery_s": None if f.recovery is None else round(f.recovery, 3)}
                           for f in self.faults],
                "recovery_p50_s": None if p50 is None else round(p50, 3),
                "recovery_p99_s": None if p99 is None else round(p99, 3),
                "check": self.report.as_dict()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pqcnet() -> list[str]:
    script = Path(sys.executable).parent / "pqcnet"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from pqcnet.cli import main; sys.exit(main())"]


class Proc:
    """One managed subprocess (restartable with the same arguments)."""

    def __init__(self, name: str, argv: list[str], log: Path, *, ready_line: bool = False,
                 env: dict[str, str] | None = None) -> None:
        self.name, self.argv, self.log, self.ready_line = name, argv, log, ready_line
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.ready: dict[str, Any] = {}
        self.paused = False

    async def start(self) -> None:
        with self.log.open("ab") as err:
            # SIGKILL when the harness dies, even SIGKILLed: the child may be paused
            self.proc = await asyncio.create_subprocess_exec(
                *ending_with_us(self.argv, signal.SIGKILL),
                stdout=asyncio.subprocess.PIPE if self.ready_line else err,
                stderr=err, env={**os.environ, "PYTHONUNBUFFERED": "1", **(self.env or {})},
                start_new_session=True)
        if self.ready_line:
            assert self.proc.stdout is not None
            try:
                async with asyncio.timeout(START_LIMIT):
                    line = await self.proc.stdout.readline()
            except TimeoutError:
                line = b""
            if not line:
                raise ChaosError(f"{self.name} did not start: "
                                 f"{self.log.read_text(errors='replace')[-1500:]}")
            self.ready = json.loads(line)

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    async def kill(self) -> None:
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            await self.proc.wait()

    async def stop(self, grace: float = 15.0) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(grace):
                await self.proc.wait()
        except TimeoutError:
            await self.kill()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


def _victim(kind: str, rng: random.Random, *, relayers: list[Proc], subscriber: Proc,
            pubs: list[Proc], broker: Proc | None, backend: str) -> Proc:
    """The process a fault of ``kind`` (``kill-*``, ``pause-*``, ``restart-broker``,
    ``add-relayer``, ``remove-relayer``) hits; relayer faults pick among the running
    relayers, an addition the first one that is down."""
    verb, _, role = kind.partition("-")
    up = [r for r in relayers if r.running]
    if verb in ("kill", "pause"):
        if role == "publisher":
            return rng.choice(pubs)
        if role == "relayer" and up:
            return up[0] if len(up) == 1 else rng.choice(up)
        if role == "subscriber":
            return subscriber
    if kind == "remove-relayer" and len(up) > 1:
        return rng.choice(up)
    if kind == "add-relayer" and (down := [r for r in relayers if not r.running]):
        return down[0]
    if kind == "restart-broker" and broker is not None:
        return broker
    raise ChaosError(f"fault {kind!r} does not apply to {backend} now (relayers running: "
                     f"{len(up)} of {len(relayers)})")


async def _wait_port(port: int, limit: float = 30.0) -> None:
    async with asyncio.timeout(limit):
        while True:
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                return
            except OSError:
                await asyncio.sleep(0.05)


def _journal_frames(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open("rb") as fh:
        return sum(1 for line in fh if line.endswith(b"\n"))


async def run_chaos(cfg: ChaosConfig) -> ChaosResult:
    """Run one chaos experiment and check its histories."""
    work = cfg.workdir.resolve()  # the relayer resolves paths against its config file
    if work.exists():
        shutil.rmtree(work)
    (work / "history").mkdir(parents=True)
    rng = random.Random(cfg.seed)
    _, ids = dev_identities("pqcnet.chaos", "spiffe://pqcnet.chaos/acme/relayer/r1",
                            "spiffe://pqcnet.chaos/acme/publisher/p1",
                            "spiffe://pqcnet.chaos/acme/subscriber/s1")
    for name, ident in zip(("relayer", "publisher", "subscriber"), ids, strict=True):
        ident.save(work / "ident" / name, None)
    if cfg.relayers > 1 and cfg.backend == "embedded":
        raise ChaosError("a relayer cluster needs a shared bus: --backend redis or kafka")
    relayer_cfg: dict[str, Any] = {
        "identity_dir": str(work / "ident" / "relayer"), "shards": 8,
        "gap_timeout": cfg.gap_timeout, "publish_timeout": 0.5}
    procs: list[Proc] = []
    broker: Proc | None = None
    redis_url = ""
    if cfg.backend == "redis" or (cfg.backend == "kafka" and cfg.relayers > 1):
        rport = _free_port()
        (work / "redis").mkdir()
        broker = Proc("redis", ["redis-server", "--port", str(rport), "--bind", "127.0.0.1",
                                "--dir", str(work / "redis"), "--appendonly", "yes",
                                "--appendfsync", "always", "--save", ""],
                      work / "redis.log")
        await broker.start()
        procs.append(broker)
        await _wait_port(rport)
        redis_url = f"redis://127.0.0.1:{rport}/0"
    if cfg.backend == "redis":
        relayer_cfg |= {"backend": "redis", "redis_url": redis_url,
                        "redis_prefix": f"chaos{cfg.seed}"}
        if cfg.relayers > 1:
            relayer_cfg["redis_lease"] = cfg.lease
    elif cfg.backend == "kafka":
        if not cfg.kafka_bootstrap:
            raise ChaosError("kafka backend: give --kafka-bootstrap (scripts/services start)")
        name = f"pqcnet-chaos-{os.getpid()}-{cfg.seed}-{int(time.time())}"
        relayer_cfg |= {"backend": "kafka", "kafka_bootstrap": cfg.kafka_bootstrap,
                        "kafka_topic": name}
        if cfg.relayers > 1:  # a group; the marks and volume shared in the private Redis
            relayer_cfg |= {"group": name, "redis_url": redis_url,
                            "redis_prefix": f"chaos{cfg.seed}"}
    elif cfg.backend != "embedded":
        raise ChaosError(f"unknown backend {cfg.backend!r}")
    relayers: list[Proc] = []
    grpc_ports: list[int] = []
    targets: list[str] = []
    for i in range(cfg.relayers + (1 if cfg.relayers > 1 else 0)):  # a cluster: a spare
        port, grpc_port = _free_port(), _free_port()
        suffix = "" if cfg.relayers == 1 else f"-{i + 1}"
        conf = work / f"relayer{suffix}.yaml"
        conf.write_text(yaml.safe_dump({"relayer": relayer_cfg | {
            "node_id": f"chaos-r{i + 1}", "listen_port": port, "grpc_port": grpc_port,
            "data_dir": str(work / f"relayer{suffix}")}}))
        relayers.append(Proc(f"relayer{suffix}", [*_pqcnet(), "relayer", "run", "--config",
                                                  str(conf)], work / f"relayer{suffix}.log",
                             ready_line=True))
        grpc_ports.append(grpc_port)
        targets.append(f"127.0.0.1:{port}")
    procs += relayers
    count = max(10, int(cfg.rate * cfg.duration / max(1, cfg.channels // cfg.publishers)))
    topics: list[Topic] = [("acme", f"ch{i}") for i in range(cfg.channels)]
    relayer_args = [a for t in targets for a in ("--relayer", t)]
    pubs: list[Proc] = []
    for k in range(cfg.publishers):
        chans = [ch for (_, ch) in topics[k::cfg.publishers]]
        per_request = 10
        pace = per_request * len(chans) / cfg.rate  # one request per pace seconds
        pubs.append(Proc(f"publisher-{k}", [
            *_pqcnet(), "chaos", "publisher", *relayer_args,
            "--identity", str(work / "ident" / "publisher"),
            "--history", str(work / "history" / f"publisher-{k}.jsonl"),
            "--customer", "acme", *[a for ch in chans for a in ("--channel", ch)],
            "--count", str(count), "--seed", str(cfg.seed), "--size", str(cfg.size),
            "--batch", str(per_request), "--pace", f"{pace:.4f}"],
            work / f"publisher-{k}.log"))
    journal = work / "history" / "subscriber.jsonl"
    sub = Proc("subscriber", [*_pqcnet(), "chaos", "subscriber", *relayer_args,
                              "--identity", str(work / "ident" / "subscriber"),
                              "--journal", str(journal), "--customer", "acme"],
               work / "subscriber.log")
    procs += [*pubs, sub]
    kinds = cfg.kinds or (FAULTS + BROKER_FAULTS.get(cfg.backend, ())
                          + (CLUSTER_FAULTS if cfg.relayers > 1 else ()))
    expected = count * len(topics)
    records: list[FaultRecord] = []
    t0 = time.monotonic()
    try:
        for r in relayers[:cfg.relayers]:  # the spare starts down
            await r.start()
        await sub.start()
        for p in pubs:
            await p.start()
        n_faults = len(cfg.schedule) or cfg.faults
        times = sorted(rng.uniform(0.15, 0.85) * cfg.duration for _ in range(n_faults))
        for i, at in enumerate(times):
            await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
            if not cfg.schedule and _journal_frames(journal) >= expected:
                break  # a drawn schedule ends with the workload; an explicit one is applied whole
            kind = cfg.schedule[i] if cfg.schedule else rng.choice(kinds)
            at = time.monotonic() - t0
            hold = rng.uniform(0.3, 1.5)
            pick = functools.partial(_victim, rng=rng, relayers=relayers, subscriber=sub,
                                     pubs=pubs, broker=broker, backend=cfg.backend)
            try:
                victim = pick(kind)
            except ChaosError:
                if cfg.schedule or kind not in CLUSTER_FAULTS:
                    raise
                kind = "kill-relayer"  # a drawn membership change that cannot happen now
                victim = pick(kind)
            rec = FaultRecord(kind, at, victim=victim.name)
            records.append(rec)
            if kind == "add-relayer":
                await victim.start()
            elif kind == "remove-relayer":
                await victim.stop()
                assert victim.proc is not None
                if victim.proc.returncode != 0:  # killed after the grace: not a clean stop
                    raise ChaosError(f"{victim.name} did not stop cleanly (exit "
                                     f"{victim.proc.returncode}): "
                                     f"{victim.log.read_text(errors='replace')[-1500:]}")
            elif kind.startswith("pause-"):
                victim.signal(signal.SIGSTOP)
                await asyncio.sleep(hold)
                victim.signal(signal.SIGCONT)
            elif victim.running or victim not in pubs:  # a publisher may have finished
                await victim.kill()
                await asyncio.sleep(hold)
                await victim.start()
            ended = time.monotonic()
            before = _journal_frames(journal)
            rec.recovery = await _recovery(journal, before, ended, expected)
        for p in pubs:  # publishers finish (restarting one killed by a late fault)
            while True:
                assert p.proc is not None
                code = await p.proc.wait()
                if code == 0:
                    break
                if code in (-signal.SIGKILL, -signal.SIGTERM):
                    await p.start()
                    continue
                raise ChaosError(f"{p.name} failed (exit {code}): "
                                 f"{p.log.read_text(errors='replace')[-1500:]}")
        acked = _acked(work / "history")
        async with asyncio.timeout(DRAIN_LIMIT):
            while _journal_frames(journal) < acked:
                if not sub.running:
                    raise ChaosError("subscriber exited: "
                                     f"{sub.log.read_text(errors='replace')[-1500:]}")
                await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # anything extra (a duplicate) has time to show
        seconds = time.monotonic() - t0
        await sub.stop()
        ran = [r for r in relayers if r.proc is not None]
        for r in ran:  # a removed relayer's metering is in its data directory
            if not r.running:
                await r.start()
        metering = await _metering([f"127.0.0.1:{p}" for r, p in zip(relayers, grpc_ports,
                                                                      strict=True)
                                    if r in ran])
        (work / "metering.json").write_text(json.dumps(
            [[c, ch, f, b] for (c, ch), (f, b) in sorted(metering.items())]))
    finally:
        for p in reversed(procs):
            await p.stop()
    report = check(sorted((work / "history").glob("*.jsonl")), metering)
    return ChaosResult(cfg, report, seconds, _journal_frames(journal), records)


async def _recovery(journal: Path, before: int, ended: float, expected: int) -> float | None:
    """Seconds from ``ended`` until the application took a frame past ``before``."""
    if before >= expected:
        return None
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(60):
            while _journal_frames(journal) <= before:  # noqa: ASYNC110 - a file other processes write
                await asyncio.sleep(0.02)
            return time.monotonic() - ended
    return None


def _acked(history: Path) -> int:
    from pqcnet.chaos.history import read_history

    seen: set[tuple[str, str, int]] = set()
    for path in history.glob("publisher-*.jsonl"):
        for row in read_history(path):
            if row["op"] == "ack":
                seen.add((row["customer"], row["channel"], int(row["seq"])))
    return len(seen)


async def _metering(targets: list[str]) -> dict[Topic, tuple[int, int]]:
    """Frames and bytes the relayers metered per topic (governance gRPC), summed: each
    relayer of a cluster reports what its own workers delivered."""
    from pqcnet.relayer.governance import VolumeFilter, pull_volume

    out: dict[Topic, tuple[int, int]] = {}
    for target in targets:
        vol = await pull_volume(target, VolumeFilter())
        for r in vol.records:
            f, b = out.get((r.customer, r.channel), (0, 0))
            out[(r.customer, r.channel)] = (f + r.frames, b + r.bytes)
    return out


def load_metering(path: Path) -> dict[Topic, tuple[int, int]]:
    """Read the metering file a run wrote (for ``pqcnet chaos check``)."""
    return {(str(c), str(ch)): (int(f), int(b)) for c, ch, f, b in json.loads(path.read_text())}
