"""The real agent's Transport, simulated: publish goes into the relay model.

:class:`SimTransport` implements :class:`pqcnet.mesh.transport.Transport`, so a real
:class:`~pqcnet.mesh.agent.ControlPlaneAgent` runs on it unchanged. Its ``publish`` never
suspends: it hands the payload to the node's GossipSub router and returns. That makes
every agent coroutine (``handle``, ``tick``, ``announce``, ``issue_directive`` ...)
complete in one step, so :func:`drive` runs it from a simulator callback without an
event loop — the agent's code runs, the agent's tasks (``start()``) do not: the
simulator calls ``tick`` and ``handle`` itself, on virtual time.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from pqcnet.mesh.errors import WakuUnavailable
from pqcnet.mesh.transport import Subscription
from pqcnet.sim.errors import SimStateError

_T = TypeVar("_T")

#: publish(node index, content topic, payload) -> message id, or -1 when the node is down
PublishFn = Callable[[int, str, bytes], int]


def drive(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run a coroutine that never suspends to completion and return its result."""
    try:
        coro.send(None)
    except StopIteration as done:
        result: _T = done.value
        return result
    coro.close()
    raise SimStateError("a real coroutine suspended under the simulator (it awaited I/O "
                        "the simulated transport does not provide)")


class SimTransport:
    """One node's view of the simulated Waku relay network."""

    def __init__(self, idx: int, publish: PublishFn) -> None:
        self.idx = idx
        self._publish = publish
        self.published = 0

    async def publish(self, content_topic: str, payload: bytes) -> None:
        if self._publish(self.idx, content_topic, payload) < 0:
            raise WakuUnavailable(f"simulated node {self.idx} is down")
        self.published += 1

    async def subscribe(self, content_topics: Sequence[str]) -> Subscription:
        # The simulator delivers straight into ``agent.handle``; a subscription is only
        # handed out to honour the protocol (nobody reads it).
        return Subscription(content_topics, 1)

    async def close(self) -> None:
        return None
