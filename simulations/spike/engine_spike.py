"""Engine spike for ADR 0010: one toy gossip workload on four discrete-event engines.

Workload (identical on every engine, same seed): N nodes on a random D-regular-ish
mesh (each node dials D random peers, links symmetric), 100 ms +- 20 ms links, a
heartbeat timer per node every 1 s, one message per simulated second published by a
random node and flooded over the mesh with a seen-set (what GossipSub's eager push
does). Counted events = deliveries + heartbeats.

Engines:
  heapq    — a 60-line callback engine: heap of (time, seq, fn, arg)
  simpy    — SimPy 4: a process per node reading a Store, deliveries as timeouts
  salabim  — salabim: a Component per node (yieldless mode), deliveries as timeouts
  asyncio  — a real asyncio loop with virtual time: a task per node on an
             asyncio.Queue, deliveries by call_later, heartbeats by asyncio.sleep

Run: python simulations/spike/engine_spike.py --nodes 1000 --seconds 60
Each engine runs in a fresh subprocess so RSS numbers do not mix.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import random
import resource
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

D = 6


def topology(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    peers: list[set[int]] = [set() for _ in range(n)]
    for i in range(n):
        while len(peers[i]) < D // 2 + 1:
            j = rng.randrange(n)
            if j != i:
                peers[i].add(j)
                peers[j].add(i)
    return [sorted(p) for p in peers]


class Toy:
    """Per-node state shared by all engines (the engine only supplies time)."""

    __slots__ = ("heartbeats", "peers", "seen")

    def __init__(self, peers: list[int]) -> None:
        self.peers = peers
        self.seen: set[int] = set()
        self.heartbeats = 0


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# ------------------------------------------------------------------ heapq
def run_heapq(n: int, seconds: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    nodes = [Toy(p) for p in topology(n, seed)]
    heap: list[tuple[float, int, Callable[[Any], None], Any]] = []
    seq = 0
    now = 0.0
    events = 0

    def at(t: float, fn: Callable[[Any], None], arg: Any) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(heap, (t, seq, fn, arg))

    def deliver(arg: tuple[int, int, int]) -> None:
        nonlocal events
        events += 1
        dst, src, mid = arg
        node = nodes[dst]
        if mid in node.seen:
            return
        node.seen.add(mid)
        for p in node.peers:
            if p != src:
                at(now + rng.gauss(0.1, 0.02), deliver, (p, dst, mid))

    def heartbeat(i: int) -> None:
        nonlocal events
        events += 1
        nodes[i].heartbeats += 1
        at(now + 1.0, heartbeat, i)

    def publish(mid: int) -> None:
        src = rng.randrange(n)
        deliver((src, src, mid))
        at(now + 1.0, publish, mid + 1)

    for i in range(n):
        at(rng.random(), heartbeat, i)
    at(0.5, publish, 0)
    t0 = time.perf_counter()
    while heap and heap[0][0] <= seconds:
        now, _, fn, arg = heapq.heappop(heap)
        fn(arg)
    return {"events": events, "wall": time.perf_counter() - t0,
            "delivered": sum(len(x.seen) for x in nodes)}


# ------------------------------------------------------------------ simpy
def run_simpy(n: int, seconds: float, seed: int) -> dict[str, Any]:
    import simpy

    rng = random.Random(seed)
    env = simpy.Environment()
    tops = topology(n, seed)
    nodes = [Toy(p) for p in tops]
    inbox = [simpy.Store(env) for _ in range(n)]
    counter = {"events": 0}

    def send(dst: int, src: int, mid: int) -> None:
        ev = env.timeout(rng.gauss(0.1, 0.02))
        ev.callbacks.append(lambda _e: inbox[dst].put((src, mid)))

    def receiver(i: int) -> Any:
        node = nodes[i]
        while True:
            src, mid = yield inbox[i].get()
            counter["events"] += 1
            if mid in node.seen:
                continue
            node.seen.add(mid)
            for p in node.peers:
                if p != src:
                    send(p, i, mid)

    def heart(i: int) -> Any:
        yield env.timeout(rng.random())
        while True:
            counter["events"] += 1
            nodes[i].heartbeats += 1
            yield env.timeout(1.0)

    def publisher() -> Any:
        yield env.timeout(0.5)
        mid = 0
        while True:
            src = rng.randrange(n)
            inbox[src].put((src, mid))
            mid += 1
            yield env.timeout(1.0)

    for i in range(n):
        env.process(receiver(i))
        env.process(heart(i))
    env.process(publisher())
    t0 = time.perf_counter()
    env.run(until=seconds)
    return {"events": counter["events"], "wall": time.perf_counter() - t0,
            "delivered": sum(len(x.seen) for x in nodes)}


# ------------------------------------------------------------------ salabim
def run_salabim(n: int, seconds: float, seed: int) -> dict[str, Any]:
    import salabim as sim

    sim.yieldless(False)
    rng = random.Random(seed)
    env = sim.Environment(trace=False, random_seed=seed)
    tops = topology(n, seed)
    nodes = [Toy(p) for p in tops]
    counter = {"events": 0}

    class Delivery(sim.Component):  # type: ignore[misc]
        def setup(self, dst: int, src: int, mid: int) -> None:
            self.dst, self.src, self.mid = dst, src, mid

        def process(self) -> Any:
            yield self.hold(rng.gauss(0.1, 0.02))
            on_receive(self.dst, self.src, self.mid)

    def on_receive(i: int, src: int, mid: int) -> None:
        counter["events"] += 1
        node = nodes[i]
        if mid in node.seen:
            return
        node.seen.add(mid)
        for p in node.peers:
            if p != src:
                Delivery(dst=p, src=i, mid=mid, env=env)

    class Heart(sim.Component):  # type: ignore[misc]
        def setup(self, i: int) -> None:
            self.i = i

        def process(self) -> Any:
            yield self.hold(rng.random())
            while True:
                counter["events"] += 1
                nodes[self.i].heartbeats += 1
                yield self.hold(1.0)

    class Publisher(sim.Component):  # type: ignore[misc]
        def process(self) -> Any:
            yield self.hold(0.5)
            mid = 0
            while True:
                src = rng.randrange(n)
                on_receive(src, src, mid)
                mid += 1
                yield self.hold(1.0)

    for i in range(n):
        Heart(i=i, env=env)
    Publisher(env=env)
    t0 = time.perf_counter()
    env.run(till=seconds)
    return {"events": counter["events"], "wall": time.perf_counter() - t0,
            "delivered": sum(len(x.seen) for x in nodes)}


# ------------------------------------------------------------------ asyncio virtual time
class _VirtualSelector:
    """A selector with nothing to watch: select(timeout) jumps the clock instead of sleeping."""

    def __init__(self, loop: VirtualLoop) -> None:
        self.loop = loop

    def select(self, timeout: float | None = None) -> list[Any]:
        if timeout:
            self.loop.virtual += timeout
        return []

    def register(self, *a: Any, **k: Any) -> None:  # the self-pipe of the loop
        return None

    def unregister(self, *a: Any) -> None:
        return None

    def get_map(self) -> dict[Any, Any]:
        return {}

    def get_key(self, fd: Any) -> Any:
        raise KeyError(fd)

    def close(self) -> None:
        return None


class VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self.virtual = 0.0
        super().__init__(_VirtualSelector(self))  # type: ignore[arg-type]

    def time(self) -> float:
        return self.virtual


def run_asyncio(n: int, seconds: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    nodes = [Toy(p) for p in topology(n, seed)]
    counter = {"events": 0}
    loop = VirtualLoop()

    async def main() -> None:
        queues: list[asyncio.Queue[tuple[int, int]]] = [asyncio.Queue() for _ in range(n)]

        async def receiver(i: int) -> None:
            node = nodes[i]
            q = queues[i]
            while True:
                src, mid = await q.get()
                counter["events"] += 1
                if mid in node.seen:
                    continue
                node.seen.add(mid)
                for p in node.peers:
                    if p != src:
                        loop.call_later(rng.gauss(0.1, 0.02), queues[p].put_nowait, (i, mid))

        async def heart(i: int) -> None:
            await asyncio.sleep(rng.random())
            while True:
                counter["events"] += 1
                nodes[i].heartbeats += 1
                await asyncio.sleep(1.0)

        async def publisher() -> None:
            await asyncio.sleep(0.5)
            mid = 0
            while True:
                src = rng.randrange(n)
                queues[src].put_nowait((src, mid))
                mid += 1
                await asyncio.sleep(1.0)

        tasks = [asyncio.create_task(receiver(i)) for i in range(n)]
        tasks += [asyncio.create_task(heart(i)) for i in range(n)]
        tasks.append(asyncio.create_task(publisher()))
        await asyncio.sleep(seconds)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    t0 = time.perf_counter()
    loop.run_until_complete(main())
    loop.close()
    return {"events": counter["events"], "wall": time.perf_counter() - t0,
            "delivered": sum(len(x.seen) for x in nodes)}


ENGINES = {"heapq": run_heapq, "simpy": run_simpy, "salabim": run_salabim,
           "asyncio": run_asyncio}


def one(engine: str, n: int, seconds: float, seed: int) -> dict[str, Any]:
    base = rss_kib()
    tracemalloc.start()
    out = ENGINES[engine](n, seconds, seed)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out.update(engine=engine, nodes=n, seconds=seconds,
               events_per_s=round(out["events"] / out["wall"]),
               peak_traced_bytes_per_node=round(peak / n),
               rss_delta_kib=rss_kib() - base,
               maxrss_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    out["wall"] = round(out["wall"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--engine", choices=sorted(ENGINES))
    args = ap.parse_args()
    if args.engine:
        # tracemalloc slows everything: time without it, then measure memory with it
        timed = ENGINES[args.engine](args.nodes, args.seconds, args.seed)
        mem = one(args.engine, args.nodes, args.seconds, args.seed)
        mem.update(wall=round(timed["wall"], 3),
                   events_per_s=round(timed["events"] / timed["wall"]))
        print(json.dumps(mem))
        return
    for engine in ENGINES:
        res = subprocess.run([sys.executable, __file__, "--engine", engine,
                              "--nodes", str(args.nodes), "--seconds", str(args.seconds),
                              "--seed", str(args.seed)], capture_output=True, text=True,
                             check=False)
        print(res.stdout.strip() or res.stderr.strip()[-400:])


if __name__ == "__main__":
    main()
