"""go-waku from ``scripts/services``: three linked nodes that relay pqcnet content topics.

The mesh control plane publishes on ``/pqcnet/1/<name>/proto`` through one node's REST
API and reads through another's, using the autosharding relay endpoints. This shows
that the cluster/shard configuration the script picks makes that path work end to end,
between every ordered pair of nodes.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import time
import uuid
from urllib.parse import quote, urlparse

import httpx
import pytest

pytestmark = [pytest.mark.services, pytest.mark.timeout(120)]

#: How long a published message may take to show up at another node's REST cache.
DELIVERY_WAIT_S = 10.0


async def _messages(client: httpx.AsyncClient, url: str, topic: str) -> list[bytes]:
    resp = await client.get(f"{url}/relay/v1/auto/messages/{quote(topic, safe='')}")
    resp.raise_for_status()
    # go-waku answers JSON `null` (not `[]`) when nothing arrived since the last poll.
    return [base64.b64decode(m["payload"]) for m in resp.json() or []]


async def _await_payload(
    client: httpx.AsyncClient, url: str, topic: str, payload: bytes
) -> list[bytes]:
    seen: list[bytes] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DELIVERY_WAIT_S
    while payload not in seen and loop.time() < deadline:
        seen.extend(await _messages(client, url, topic))
        if payload not in seen:
            await asyncio.sleep(0.2)
    return seen


async def test_nodes_are_up_on_loopback_and_peered(waku_rest_urls: list[str]) -> None:
    assert len(waku_rest_urls) == 3
    async with httpx.AsyncClient(timeout=5.0) as client:
        for url in waku_rest_urls:
            assert urlparse(url).hostname == "127.0.0.1"
            info = (await client.get(f"{url}/debug/v1/info")).json()
            assert info["listenAddresses"]
            assert all("/ip4/127.0.0.1/" in a for a in info["listenAddresses"])
            peers = (await client.get(f"{url}/admin/v1/peers")).json()
            assert sum(1 for p in peers if p["connected"]) >= 2


async def test_publish_on_one_node_arrives_at_the_others(waku_rest_urls: list[str]) -> None:
    topic = f"/pqcnet/1/smoke-{uuid.uuid4().hex[:8]}/proto"
    async with httpx.AsyncClient(timeout=5.0) as client:
        for url in waku_rest_urls:
            resp = await client.post(f"{url}/relay/v1/auto/subscriptions", json=[topic])
            resp.raise_for_status()
        for src, dst in itertools.permutations(waku_rest_urls, 2):
            payload = f"{src}->{dst}:{uuid.uuid4().hex}".encode()
            msg = {
                "payload": base64.b64encode(payload).decode(),
                "contentTopic": topic,
                "timestamp": time.time_ns(),
            }
            resp = await client.post(f"{src}/relay/v1/auto/messages", json=msg)
            assert resp.status_code == 200, resp.text
            seen = await _await_payload(client, dst, topic, payload)
            assert payload in seen, f"{src} -> {dst}: not delivered; saw {seen!r}"
        for url in waku_rest_urls:
            await client.request("DELETE", f"{url}/relay/v1/auto/subscriptions", json=[topic])


async def test_other_content_topics_are_not_delivered(waku_rest_urls: list[str]) -> None:
    a, b = waku_rest_urls[0], waku_rest_urls[1]
    wanted = f"/pqcnet/1/wanted-{uuid.uuid4().hex[:8]}/proto"
    other = f"/pqcnet/1/other-{uuid.uuid4().hex[:8]}/proto"
    async with httpx.AsyncClient(timeout=5.0) as client:
        (await client.post(f"{b}/relay/v1/auto/subscriptions", json=[wanted])).raise_for_status()
        (await client.post(f"{a}/relay/v1/auto/subscriptions", json=[other])).raise_for_status()
        for topic, body in ((other, b"not-for-b"), (wanted, b"for-b")):
            msg = {"payload": base64.b64encode(body).decode(), "contentTopic": topic}
            (await client.post(f"{a}/relay/v1/auto/messages", json=msg)).raise_for_status()
        seen = await _await_payload(client, b, wanted, b"for-b")
        assert seen == [b"for-b"]
        await client.request("DELETE", f"{b}/relay/v1/auto/subscriptions", json=[wanted])
        await client.request("DELETE", f"{a}/relay/v1/auto/subscriptions", json=[other])
