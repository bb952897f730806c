"""Async client for the Waku relay REST API of one node (nwaku, go-waku).

The REST API is poll-based: ``POST /relay/v1/auto/subscriptions`` registers content
topics, and each ``GET /relay/v1/auto/messages/{contentTopic}`` drains what arrived
since the previous GET (bounded by the node's ``--rest-relay-cache-capacity``).
:class:`~pqcnet.mesh.waku.WakuTransport` turns one or more of these clients into the
push-style :class:`~pqcnet.mesh.transport.Transport` seam.

HTTP is :class:`~pqcnet.mesh.http1.HttpClient` (keep-alive sockets, llhttp parsing;
see there for why not httpx). Failure policy: connection errors, timeouts and 5xx
answers are retried with
exponential backoff up to ``retries`` times and then raised as
:class:`~pqcnet.mesh.errors.WakuUnavailable` (retriable); 4xx answers raise
:class:`~pqcnet.mesh.errors.WakuError` at once (a GET for a content topic the node does
not know — it restarted and forgot our subscription — is a 404).

go-waku v0.10.0 facts the callers rely on: every subscription POST creates a *new*
subscription with its own buffer (1000 messages), a GET drains one matching
subscription, and a subscription nobody drains eventually blocks the node's single
broadcaster (all delivery on that node stops). A DELETE removes every subscription
of those content topics on the node, and answers 500 when there is none.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from pqcnet.mesh import metrics
from pqcnet.mesh.errors import ConfigError, WakuError, WakuUnavailable
from pqcnet.mesh.http1 import DEFAULT_MAX_CONNECTIONS, HttpClient, HttpResponse
from pqcnet.mesh.transport import WakuMessage


@dataclass(frozen=True, slots=True)
class WakuClientConfig:
    """Timeouts and retry bounds of one REST endpoint."""

    base_url: str
    #: per-request timeout; bounds how long one dead node stalls a caller
    timeout_s: float = 5.0
    #: extra attempts after the first for retriable failures
    retries: int = 3
    #: first backoff; doubles per attempt
    backoff_s: float = 0.1
    #: idle pause between empty polls
    poll_interval_s: float = 0.05
    #: longest pause between polls while the node is down
    max_backoff_s: float = 2.0
    #: keep-alive sockets to the node; bounds concurrent requests (more wait)
    max_connections: int = DEFAULT_MAX_CONNECTIONS

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"Waku REST URL must be http(s): {self.base_url!r}")
        if self.timeout_s <= 0 or self.retries < 0 or self.poll_interval_s <= 0:
            raise ConfigError("Waku timeouts must be > 0 and retries >= 0")
        if self.max_connections < 1:
            raise ConfigError("Waku max_connections must be >= 1")


def _b64decode(text: str) -> bytes:
    """Waku nodes emit standard or URL-safe base64, padded or not."""
    padded = text + "=" * (-len(text) % 4)
    try:
        if "-" in text or "_" in text:
            return base64.urlsafe_b64decode(padded)
        return base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise WakuError(f"node returned a payload that is not base64: {exc}") from None


def _json_object(resp: HttpResponse) -> dict[str, Any]:
    try:
        data = json.loads(resp.body)
    except ValueError:
        raise WakuError("node returned an answer that is not JSON") from None
    if not isinstance(data, dict):
        raise WakuError("node returned a non-object answer")
    return data


class WakuRestClient:
    """Relay, health and debug endpoints of one Waku node."""

    def __init__(self, config: WakuClientConfig | str) -> None:
        self.config = WakuClientConfig(config) if isinstance(config, str) else config
        self._http = HttpClient(self.config.base_url, timeout_s=self.config.timeout_s,
                                max_connections=self.config.max_connections)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, *, op: str,
                       json_body: Any = None, ok: tuple[int, ...] = (200,)) -> HttpResponse:
        body = None if json_body is None else json.dumps(
            json_body, separators=(",", ":")).encode()
        delay = self.config.backoff_s
        last: str = ""
        for attempt in range(self.config.retries + 1):
            try:
                resp = await self._http.request(method, path, body)
            except WakuUnavailable as exc:
                if self._http.closed:
                    raise  # closed by us: retrying cannot help
                last = str(exc)
            else:
                if resp.status in ok:
                    return resp
                if resp.status < 500:
                    metrics.WAKU_ERRORS.labels(op).inc()
                    raise WakuError(
                        f"waku {op} {path}: HTTP {resp.status} {resp.text[:200]!r}",
                        status=resp.status,
                    )
                last = f"HTTP {resp.status} {resp.text[:200]!r}"
            if attempt < self.config.retries:
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.config.max_backoff_s)
        metrics.WAKU_ERRORS.labels(op).inc()
        raise WakuUnavailable(f"waku {op} at {self.config.base_url} failed: {last}")

    # ------------------------------------------------------------------ node info

    async def health(self) -> str:
        """The node's health text. go-waku without RLN answers 501 "not implemented",
        which still proves the REST server is up."""
        resp = await self._request("GET", "/health", op="health", ok=(200, 501))
        try:
            return str(json.loads(resp.body))
        except ValueError:
            return resp.text

    async def info(self) -> dict[str, Any]:
        """``/debug/v1/info``: ENR and listen addresses."""
        resp = await self._request("GET", "/debug/v1/info", op="info")
        return _json_object(resp)

    async def version(self) -> str:
        resp = await self._request("GET", "/debug/v1/version", op="version")
        try:
            return str(json.loads(resp.body))
        except ValueError:
            raise WakuError("node returned a version that is not JSON") from None

    # ------------------------------------------------------------------ auto-sharded relay

    async def subscribe(self, content_topics: Sequence[str]) -> None:
        # One topic per request: go-waku v0.10.0 answers 200 to a multi-topic POST
        # but then 404s every one of those topics on GET (checked against the nodes
        # scripts/services runs); single-topic requests work on nwaku and go-waku.
        for topic in content_topics:
            await self._request("POST", "/relay/v1/auto/subscriptions", op="subscribe",
                                json_body=[topic])

    async def unsubscribe(self, content_topics: Sequence[str]) -> None:
        """Remove every subscription to these topics on the node. A 500 answer (go-waku:
        "not subscribed", e.g. after a restart) means there is nothing left to drain."""
        for topic in content_topics:
            await self._request("DELETE", "/relay/v1/auto/subscriptions", op="unsubscribe",
                                json_body=[topic], ok=(200, 500))

    async def publish(self, content_topic: str, payload: bytes,
                      *, timestamp_ns: int | None = None) -> None:
        await self._request("POST", "/relay/v1/auto/messages", op="publish",
                            json_body=self._message_json(content_topic, payload, timestamp_ns))

    async def messages(self, content_topic: str) -> list[WakuMessage]:
        """Messages received on ``content_topic`` since the previous call."""
        resp = await self._request(
            "GET", "/relay/v1/auto/messages/" + quote(content_topic, safe=""), op="poll"
        )
        return self._parse_messages(resp)

    # ------------------------------------------------------------------ named pubsub topics

    async def subscribe_pubsub(self, pubsub_topics: Sequence[str]) -> None:
        await self._request("POST", "/relay/v1/subscriptions", op="subscribe",
                            json_body=list(pubsub_topics))

    async def unsubscribe_pubsub(self, pubsub_topics: Sequence[str]) -> None:
        await self._request("DELETE", "/relay/v1/subscriptions", op="unsubscribe",
                            json_body=list(pubsub_topics))

    async def publish_pubsub(self, pubsub_topic: str, content_topic: str, payload: bytes,
                             *, timestamp_ns: int | None = None) -> None:
        await self._request("POST", "/relay/v1/messages/" + quote(pubsub_topic, safe=""),
                            op="publish",
                            json_body=self._message_json(content_topic, payload, timestamp_ns))

    async def messages_pubsub(self, pubsub_topic: str) -> list[WakuMessage]:
        resp = await self._request(
            "GET", "/relay/v1/messages/" + quote(pubsub_topic, safe=""), op="poll"
        )
        return self._parse_messages(resp)

    # ------------------------------------------------------------------ JSON

    @staticmethod
    def _message_json(content_topic: str, payload: bytes, ts: int | None) -> dict[str, Any]:
        return {
            "payload": base64.b64encode(payload).decode(),
            "contentTopic": content_topic,
            "version": 0,
            "timestamp": ts if ts is not None else time.time_ns(),
        }

    @staticmethod
    def _parse_messages(resp: HttpResponse) -> list[WakuMessage]:
        try:
            data = json.loads(resp.body)
        except ValueError:
            raise WakuError("node returned messages that are not JSON") from None
        if data is None:
            return []
        if not isinstance(data, list):
            raise WakuError("node returned a non-list messages answer")
        out = []
        for item in data:
            if not isinstance(item, dict):
                raise WakuError("node returned a message that is not an object")
            out.append(WakuMessage(
                content_topic=str(item.get("contentTopic", "")),
                payload=_b64decode(str(item.get("payload") or "")),
                timestamp_ns=int(item.get("timestamp") or 0),
            ))
        return out
